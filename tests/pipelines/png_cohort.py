"""A small PNG + free-text-note + numeric-column manifest whose every modality carries signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

#: How real exports store radiographs: (Pillow mode, file suffix), cycled over patients.
EXPORT_FORMATS = (("RGB", ".png"), ("RGBA", ".png"), ("P", ".png"), ("L", ".png"),
                  ("RGB", ".jpg"), ("L", ".jpg"))


def write_png_cohort(out: Path, n: int = 160, *, seed: int = 0, size: int = 32,
                     min_age: float = 18.0,
                     formats: tuple[tuple[str, str], ...] = (("L", ".png"),)) -> Path:
    """Write ``out/images/*``, ``out/manifest.csv`` and ``out/manifest.yaml``.

    A latent risk drives the label; each image shows a bright disk whose radius
    grows with one noisy copy of the risk, the note mentions "breathless" more
    often with another, and ``lactate`` tracks a third. About 15 % of images and
    notes are left blank. ``formats`` (Pillow mode, suffix) are cycled over the
    images, e.g. :data:`EXPORT_FORMATS` for the RGB/RGBA/palette mix viewers export.
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    z = rng.normal(size=(n, 3))
    logit = 1.2 * z.sum(axis=1) - 1.0
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n):
        image = ""
        if rng.random() > 0.15:
            radius = size * (0.18 + 0.07 * np.clip(z[i, 0], -2, 2))
            disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius ** 2
            pixels = np.clip(40 + 150 * disk + rng.normal(0, 10, (size, size)), 0, 255)
            mode, suffix = formats[i % len(formats)]
            image = f"images/p{i:04d}{suffix}"
            _export(pixels.astype(np.uint8), mode).save(out / image)
        note = ""
        if rng.random() > 0.15:
            words = ["Patient seen on the ward."]
            words.append("Reports feeling breathless." if rng.random() < 1 / (1 + np.exp(
                -2 * z[i, 1])) else "Breathing comfortably.")
            words.append("Eating well." if rng.random() < 0.5 else "Family visited.")
            note = " ".join(words)
        rows.append({
            "patient_id": f"P{i:05d}", "label": int(label[i]),
            "index_time": "2024-01-01T00:00:00Z", "image": image, "note": note,
            "age_years": float(rng.integers(int(min_age), 95)),
            "lactate": float(np.exp(0.3 + 0.4 * z[i, 2] + 0.1 * rng.normal())),
            "sodium": float(rng.normal(139, 3)) if rng.random() > 0.1 else np.nan,
            "sex": rng.choice(["female", "male"]),
        })
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    (out / "manifest.yaml").write_text(
        "sensitive: [sex]\n"
        "feature_source: manifest\n"
        "outcome:\n  name: deterioration\n  definition: toy outcome\n  horizon_days: 30\n"
        "  population: adult inpatients (age >= 18)\n")
    return out / "manifest.csv"


def _export(grey: np.ndarray, mode: str) -> Image.Image:
    """The grey picture as a viewer would export it in ``mode`` (same luminance)."""
    image = Image.fromarray(grey)
    if mode == "RGBA":
        rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
        return Image.fromarray(rgba)
    if mode == "P":
        return image.convert("RGB").quantize(colors=64)  # an adaptive palette
    return image.convert(mode)
