"""Saliency overlays as PNG, computed once per series and cached.

The cache folder is ``<cache>/saliency/<series key>-<model key>/`` holding
``saliency.npz`` (heatmap, slice scores), ``saliency.json`` (top slices, PNG
names, alt text) and the overlay PNGs. The series key is the model-input key of
:mod:`pipelines.model_inputs` (series files + preprocessing); the model key hashes
the image encoders' and fusion weights, so a retrained model never reuses a map.

Overlays are drawn on the model-input slice (windowed and resized as the model
saw it), so heatmap and anatomy line up voxel for voxel.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.saliency import Saliency, occlusion_saliency

__all__ = ["cached_saliency", "render_overlays"]


def render_overlays(image: np.ndarray, saliency: Saliency, out_dir: Path, *,
                    points_per_logit: float = 1.0) -> list[dict[str, Any]]:
    """Write one overlay PNG per top slice; returns ``[{file, slice, alt_text}]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    img = np.asarray(image, dtype=np.float32)[0]  # first channel
    heat = saliency.heatmap
    is_3d = heat.ndim == 3
    n_slices = heat.shape[-1] if is_3d else 1
    vmax = float(np.abs(heat).max()) or 1.0
    entries = []
    for rank, k in enumerate(saliency.top_slices):
        anatomy = img[..., k] if is_3d else img
        h = heat[..., k] if is_3d else heat
        fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
        ax.imshow(anatomy.T, cmap="gray", origin="lower")
        # Only risk-raising regions are coloured: a clinician checks where to look.
        ax.imshow(np.ma.masked_less_equal(h, 0).T, cmap="inferno", alpha=0.5, vmin=0,
                  vmax=vmax, origin="lower")
        ax.set_axis_off()
        name = f"overlay_{rank + 1}_slice{k}.png"
        fig.savefig(out_dir / name, bbox_inches="tight", pad_inches=0)
        plt.close(fig)
        peak = float(np.clip(h, 0, None).max()) * points_per_logit
        where = f"slice {k + 1} of {n_slices}" if is_3d else "the image"
        entries.append({
            "file": name, "slice": int(k) if is_3d else None, "rank": rank + 1,
            "alt_text": (f"Model-input view of {where}, greyscale, with the regions whose "
                         f"occlusion lowered the predicted risk most shaded in warm colours "
                         f"(strongest block about {peak:.1f} points).")})
    return entries


def cached_saliency(cache_dir: Path, series_key: str, model_key: str, image: torch.Tensor,
                    score: Callable[[torch.Tensor], np.ndarray], *,
                    points_per_logit: float = 1.0) -> tuple[dict[str, Any], Path]:
    """(saliency summary, folder with its PNGs), computing and caching on first use."""
    folder = Path(cache_dir) / "saliency" / f"{series_key}-{model_key}"
    meta = folder / "saliency.json"
    if meta.exists():
        return json.loads(meta.read_text()), folder
    tmp = folder.with_name(folder.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sal = occlusion_saliency(image, score)
    overlays = render_overlays(np.asarray(image, dtype=np.float32), sal, tmp,
                               points_per_logit=points_per_logit)
    np.savez_compressed(tmp / "saliency.npz", heatmap=sal.heatmap, slice_scores=sal.slice_scores)
    summary = {"method": "occlusion (median fill), fused calibrated logit",
               "patch": list(sal.patch), "shape": list(sal.heatmap.shape),
               "top_slices": sal.top_slices,
               "slice_scores_logit": [float(v) for v in sal.slice_scores],
               "max_block_logit": float(sal.heatmap.max()),
               "overlays": overlays}
    (tmp / "saliency.json").write_text(json.dumps(summary, indent=1))
    try:
        os.replace(tmp, folder)  # atomic: a concurrent writer's folder wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(meta.read_text()), folder
