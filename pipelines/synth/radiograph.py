"""``--realism hard`` images: a 2-D chest-radiograph-like picture whose signal is texture.

Geometry is in normalised coordinates (-1..1 across the image), so the picture means
the same at any size. Intensities are 0-1, bright = dense: air outside the body, soft
tissue with shoulders, two dark lung fields with diaphragm domes, a bright mediastinum
and heart, spine, clavicles and curved ribs; every shape varies from patient to patient
(position, rotation, scale, lung and heart size, rib spacing) with no effect on risk.

The risk signal is a **reticular texture** in the lung fields (the zero crossings of
band-pass noise: a net of thin bright lines) whose amplitude is
``HardModel.texture(z_img)``. It has mean zero, so neither a bright region's size nor
the mean intensity carries the signal. The site then blurs (detector), applies its
gain, offset and gamma, adds pixel noise and, for colour exports, a tint; the image is
quantised to 8 bits and saved in a fixed mix of formats (:data:`FORMAT_CYCLE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from pipelines.synth.hard_model import Site

__all__ = ["FORMAT_CYCLE", "FORMAT_SUFFIX", "ImageFormat", "RadiographSim", "draw_radiograph",
           "encode", "image_metadata", "render", "texture_statistic"]

ImageFormat = Literal["jpeg-rgb", "png-rgba", "png-grey", "png-palette"]

#: Patient ``i`` is written as ``FORMAT_CYCLE[i % 20]``: 40 % RGB JPEG (quality 90),
#: 20 % RGBA PNG, 25 % greyscale PNG, 15 % palette PNG.
FORMAT_CYCLE: tuple[ImageFormat, ...] = (
    "jpeg-rgb", "png-grey", "png-rgba", "jpeg-rgb", "png-palette",
    "jpeg-rgb", "png-grey", "png-rgba", "jpeg-rgb", "png-grey",
    "jpeg-rgb", "png-palette", "png-rgba", "jpeg-rgb", "png-grey",
    "jpeg-rgb", "png-rgba", "png-palette", "jpeg-rgb", "png-grey",
)
FORMAT_SUFFIX: dict[str, str] = {"jpeg-rgb": ".jpg", "png-rgba": ".png", "png-grey": ".png",
                                 "png-palette": ".png"}


@dataclass(frozen=True)
class RadiographSim:
    """Everything the renderer needs for one patient, drawn in ``simulate_hard_patient``."""

    texture: float  # amplitude of the lung texture (the signal)
    site: Site
    fmt: ImageFormat
    shift: tuple[float, float]
    scale: float
    rotation_deg: float
    body_width: float
    lung_width: float
    lung_height: float
    lung_offset: float
    dome: float
    heart_size: float
    rib_spacing: float
    rib_phase: float


def draw_radiograph(rng: np.random.Generator, texture: float, site: Site, fmt: ImageFormat
                    ) -> RadiographSim:
    """The patient's anatomy: nuisance shapes, independent of the outcome."""
    dx, dy = (float(v) for v in rng.uniform(-0.04, 0.04, 2))
    spacing = float(rng.uniform(0.105, 0.125))
    return RadiographSim(
        texture=texture, site=site, fmt=fmt, shift=(dx, dy),
        scale=float(np.clip(rng.normal(1.0, 0.03), 0.9, 1.1)),
        rotation_deg=float(rng.uniform(-3.0, 3.0)), body_width=float(rng.uniform(0.80, 0.92)),
        lung_width=float(rng.uniform(0.27, 0.32)), lung_height=float(rng.uniform(0.55, 0.63)),
        lung_offset=float(rng.uniform(0.37, 0.42)), dome=float(rng.uniform(0.38, 0.46)),
        heart_size=float(rng.uniform(0.21, 0.28)), rib_spacing=spacing,
        rib_phase=float(rng.uniform(0.0, spacing)),
    )


def _inside(d: np.ndarray, edge: float) -> np.ndarray:
    """Soft mask of ``d <= 1`` with an edge ``edge`` wide."""
    return np.clip((1.0 - d) / edge + 0.5, 0.0, 1.0)


def render(r: RadiographSim, rng: np.random.Generator, size: int) -> np.ndarray:
    """The 8-bit grey picture, shape (rows, columns)."""
    px = 256.0 / size  # filter widths are set at 256 px
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = (x + 0.5) / size * 2.0 - 1.0, (y + 0.5) / size * 2.0 - 1.0
    th = float(np.deg2rad(r.rotation_deg))
    x, y = x - r.shift[0], y - r.shift[1]
    xr = (x * np.cos(th) + y * np.sin(th)) / r.scale
    yr = (-x * np.sin(th) + y * np.cos(th)) / r.scale
    ax = np.abs(xr)

    bw = r.body_width
    trunk = np.sqrt((xr / bw) ** 2 + np.clip(yr - 0.15, 0.0, None) ** 6)
    shoulder = np.where(yr < -0.55, ax / (bw * (0.75 + 0.25 * np.clip((yr + 1.0) / 0.45, 0, 1))),
                        0.0)
    body = _inside(np.maximum(trunk, shoulder), 0.03)
    img = 0.06 + 0.52 * body

    lung = np.zeros_like(xr)
    for side in (-1.0, 1.0):
        cx = side * r.lung_offset
        d = np.sqrt(((xr - cx) / r.lung_width) ** 2 + ((yr + 0.05) / r.lung_height) ** 2)
        base = r.dome + 0.1 * np.cos((xr - cx) / r.lung_width * 1.4)
        d = np.maximum(d, (yr - base) / 0.05 + 1.0)
        lung = np.maximum(lung, _inside(d, 0.04))
    hs = r.heart_size
    heart = _inside(np.sqrt(((xr - 0.1) / (hs * 1.1)) ** 2 + ((yr - 0.26) / (hs * 0.8)) ** 2),
                    0.06)
    mediastinum = _inside(np.maximum(ax / 0.11, np.abs(yr + 0.15) / 0.75), 0.1)
    centre = np.maximum(heart, mediastinum)
    lung = lung * (1.0 - centre)
    img = img - 0.36 * lung * (1.0 - 0.15 * (yr + 0.6)) + 0.16 * centre * body
    img = img + 0.05 * _inside(ax / 0.05, 0.3) * (yr > -0.9)  # spine
    yy = yr - 0.45 * ax ** 1.4  # ribs run down and out from the spine
    band = np.abs(np.mod(yy + r.rib_phase, r.rib_spacing) - r.rib_spacing / 2.0)
    ribs = np.clip(1.0 - band / 0.016, 0.0, 1.0) * (ax > 0.06) * (ax < bw * 0.92)
    img = img + 0.08 * ribs * (yy > -0.85) * (yr < 0.5) * body
    clavicle = np.clip(1.0 - np.abs(yr + 0.62 + 0.12 * ax) / 0.02, 0.0, 1.0)
    img = img + 0.08 * clavicle * (ax < 0.6) * (ax > 0.08)

    # The signal: zero-mean, unit-sd reticular texture, scaled by the amplitude.
    white = rng.standard_normal((size, size), dtype=np.float32)
    band_pass = (ndimage.gaussian_filter(white, 1.2 / px)
                 - ndimage.gaussian_filter(white, 3.0 / px))
    band_pass /= band_pass.std()
    reticular = (np.sqrt(2.0 / np.pi) - np.abs(band_pass)) / np.sqrt(1.0 - 2.0 / np.pi)
    img = img + r.texture * reticular * lung

    s = r.site
    img = ndimage.gaussian_filter(img, s.blur_px / px)
    img = s.offset + s.gain * np.clip(img, 0.0, 1.0) ** s.gamma
    img = img + rng.standard_normal((size, size), dtype=np.float32) * s.noise
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def image_metadata(r: RadiographSim) -> dict[str, str]:
    """Text written into the file (PNG tEXt chunks, a JPEG comment): site, never outcome."""
    return {"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA",
            "InstitutionName": r.site.name, "Manufacturer": r.site.scanner,
            "Software": "clinfuse synth --realism hard"}


def encode(grey: np.ndarray, r: RadiographSim, path: Path, *, quality: int) -> None:
    """Save ``grey`` as ``r.fmt`` (RGB JPEG, RGBA / grey / palette PNG) with its metadata."""
    from PIL import Image, PngImagePlugin

    meta = image_metadata(r)
    if r.fmt == "jpeg-rgb":
        rgb = np.clip(np.rint(grey[..., None] * np.array(r.site.tint)), 0, 255).astype(np.uint8)
        comment = "; ".join(f"{k}={v}" for k, v in meta.items())
        Image.fromarray(rgb, "RGB").save(path, "JPEG", quality=quality, comment=comment)
        return
    info = PngImagePlugin.PngInfo()
    for key, value in meta.items():
        info.add_text(key, value)
    if r.fmt == "png-rgba":
        rgb = np.clip(np.rint(grey[..., None] * np.array(r.site.tint)), 0, 255).astype(np.uint8)
        alpha = np.full((*grey.shape, 1), 255, dtype=np.uint8)  # opaque, as exports are
        image = Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")
    elif r.fmt == "png-palette":
        image = Image.frombytes("P", (grey.shape[1], grey.shape[0]),
                                np.ascontiguousarray(grey).tobytes())
        image.putpalette([v for i in range(256) for v in (i, i, i)])
    else:
        image = Image.fromarray(grey, "L")
    image.save(path, "PNG", pnginfo=info, compress_level=3)


def texture_statistic(grey: np.ndarray) -> tuple[float, float]:
    """(log texture energy, mean intensity) in two fixed windows over the lung fields.

    Read from the written pixels, for the leakage check: the energy of a band-pass
    filtered copy tracks the texture amplitude (the signal); the mean intensity of the
    same windows should not track it.
    """
    g = np.asarray(grey, dtype=np.float64)
    size = g.shape[0]
    px = 256.0 / size
    band = ndimage.gaussian_filter(g, 1.0 / px) - ndimage.gaussian_filter(g, 3.0 / px)
    rows = slice(int(size * 0.35), int(size * 0.65))
    windows = [(rows, slice(int(size * 0.2), int(size * 0.38))),
               (rows, slice(int(size * 0.62), int(size * 0.8)))]
    energy = float(np.mean([np.median(np.abs(band[w])) for w in windows]))
    mean = float(np.mean([g[w].mean() for w in windows]))
    return float(np.log(max(energy, 1e-6))), mean
