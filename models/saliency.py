"""Image saliency by occlusion, in units of the fused calibrated logit.

Why occlusion rather than Grad-CAM: the fusion model reads the image through the
(cross-fitted) encoders' mean auxiliary logit and a non-linear branch, so a
gradient map of one encoder's last convolution would not be in the units of the
prediction. Occluding a block and re-scoring the whole model gives, per block,
the change in the calibrated logit the clinician's risk is computed from.

Each block (``patch`` voxels) is replaced by the image's median intensity (typical
tissue, not an artificial black hole) and the image re-scored; the block's value
is ``logit(image) - logit(occluded)``: positive where the region raises the risk.
All occluded copies are scored in batches through ``score``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Saliency", "default_patch", "occlusion_saliency"]


@dataclass(frozen=True)
class Saliency:
    """Occlusion map of one image.

    Attributes
    ----------
    heatmap : ndarray, the image's spatial shape
        Calibrated-logit change per voxel's block (positive: raises risk).
    logit : float
        The unoccluded image's fused calibrated logit.
    top_slices : list of int
        Indices along the last spatial axis (3-D) with the most positive
        attribution, best first; ``[0]`` for 2-D images.
    slice_scores : ndarray
        Sum of positive attribution per slice (3-D) or one entry (2-D).
    patch : tuple of int
    """

    heatmap: np.ndarray
    logit: float
    top_slices: list[int]
    slice_scores: np.ndarray
    patch: tuple[int, ...]


def default_patch(spatial: Sequence[int]) -> tuple[int, ...]:
    """About 4 blocks along each axis (at least 1 voxel): 64-512 re-scorings."""
    return tuple(max(1, int(s) // 4) for s in spatial)


def occlusion_saliency(image: torch.Tensor | np.ndarray,
                       score: Callable[[torch.Tensor], np.ndarray], *,
                       patch: Sequence[int] | None = None, top: int = 3,
                       batch_size: int = 32) -> Saliency:
    """Occlusion saliency of one image ``(C, *spatial)``.

    Parameters
    ----------
    image : tensor or array (C, X, Y[, Z])
    score : callable
        ``(N, C, *spatial) float32 tensor -> (N,)`` fused calibrated logits.
    patch : sequence of int, optional
        Block size per spatial axis; :func:`default_patch` when omitted.
    top : int, default 3
        How many slices to name.
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if x.ndim not in (3, 4):
        raise ValueError(f"image must be (C, X, Y) or (C, X, Y, Z), got shape {tuple(x.shape)}")
    spatial = tuple(int(s) for s in x.shape[1:])
    size = tuple(int(p) for p in (patch or default_patch(spatial)))
    if len(size) != len(spatial) or any(p < 1 for p in size):
        raise ValueError(f"patch must have {len(spatial)} positive entries, got {size}")
    fill = float(x.median())
    starts = list(itertools.product(*(range(0, s, p) for s, p in zip(spatial, size,
                                                                     strict=True))))
    base = float(np.asarray(score(x[None]))[0])
    heat = np.zeros(spatial, dtype=np.float32)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        batch = x[None].repeat(len(chunk), *([1] * x.ndim))
        for b, start in enumerate(chunk):
            region = tuple(slice(s, s + p) for s, p in zip(start, size, strict=True))
            batch[(b, slice(None), *region)] = fill  # type: ignore[index]
        deltas = base - np.asarray(score(batch), dtype=np.float64)
        for start, delta in zip(chunk, deltas, strict=True):
            region = tuple(slice(s, s + p) for s, p in zip(start, size, strict=True))
            heat[region] = delta
    if len(spatial) == 3:
        scores = np.clip(heat, 0, None).sum(axis=(0, 1))
        order = [int(k) for k in np.argsort(-scores, kind="stable")[:top]]
    else:
        scores = np.array([float(np.clip(heat, 0, None).sum())])
        order = [0]
    return Saliency(heatmap=heat, logit=base, top_slices=order, slice_scores=scores,
                    patch=size)
