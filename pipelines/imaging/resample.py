"""Resample a stack of parallel slices (tilted or unevenly spaced) onto a regular grid.

The grid follows dicom2nifti's construction: in-plane axes kept, third axis along the
slice normal, extent covering every slice corner. Because each output plane is parallel to
the input planes, a voxel is a bilinear sample of the two input slices that bracket it,
blended linearly by distance along the normal: trilinear interpolation in the stack's own
(sheared, uneven) geometry.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["regular_grid", "resample_stack"]


def regular_grid(
    shape_ij: tuple[int, int],
    positions: np.ndarray,
    row_cosine: np.ndarray,
    col_cosine: np.ndarray,
    spacing: tuple[float, float],
    slice_spacing: float | None = None,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """The orthogonal grid covering every slice corner: ``(shape, LPS affine)``.

    Spacing is kept in-plane; along the normal it is the smallest gap between slices
    unless ``slice_spacing`` is given.
    """
    normal = np.cross(row_cosine, col_cosine)
    normal /= np.linalg.norm(normal)
    row_spacing, col_spacing = spacing
    s = positions @ normal
    dz = float(slice_spacing if slice_spacing is not None else np.diff(s).min())
    u0, v0 = positions @ row_cosine, positions @ col_cosine
    extents = (u0.max() + (shape_ij[0] - 1) * col_spacing - u0.min(),
               v0.max() + (shape_ij[1] - 1) * row_spacing - v0.min(), s.max() - s.min())
    # Same rounding as dicom2nifti so grids agree when the geometry does.
    shape = tuple(int(np.ceil(np.round(extent / step + 1, 2)))
                  for extent, step in zip(extents, (col_spacing, row_spacing, dz), strict=True))
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * col_spacing
    affine[:3, 1] = col_cosine * row_spacing
    affine[:3, 2] = normal * dz
    affine[:3, 3] = u0.min() * row_cosine + v0.min() * col_cosine + s.min() * normal
    return (shape[0], shape[1], shape[2]), affine


def resample_stack(
    slices: np.ndarray,
    positions: np.ndarray,
    row_cosine: np.ndarray,
    col_cosine: np.ndarray,
    spacing: tuple[float, float],
    *,
    grid: tuple[tuple[int, int, int], np.ndarray] | None = None,
    padding: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``(k, i, j)`` at LPS ``positions`` -> ``(array (i, j, k), LPS affine)``.

    Parameters
    ----------
    slices : ndarray
        Slices in stack order (ascending along the normal), indexed (k, i, j).
    positions : ndarray
        ``(k, 3)`` LPS positions of each slice's first pixel.
    row_cosine, col_cosine : ndarray
        In-plane unit vectors shared by all slices.
    spacing : tuple of float
        PixelSpacing: (between rows, between columns).
    grid : (shape, affine), optional
        Target grid in LPS; its first two axes must lie in the slice plane. Default
        :func:`regular_grid`.
    padding : float, optional
        Value outside the acquired slab; default the data minimum.
    """
    normal = np.cross(row_cosine, col_cosine)
    normal /= np.linalg.norm(normal)
    shape, affine = grid or regular_grid(slices.shape[1:3], positions, row_cosine,
                                         col_cosine, spacing)
    axes = affine[:3, :3]
    if abs(axes[:, 0] @ normal) > 1e-4 * np.linalg.norm(axes[:, 0]) or \
            abs(axes[:, 1] @ normal) > 1e-4 * np.linalg.norm(axes[:, 1]):
        raise ValueError("target grid's first two axes must lie in the slice plane")
    row_spacing, col_spacing = spacing
    s = positions @ normal
    pad = float(np.nanmin(slices)) if padding is None else float(padding)
    out = np.full(shape, pad, dtype=np.float32)
    gx, gy = np.meshgrid(np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float),
                         indexing="ij")
    tolerance = 1e-3 * float(np.min(np.abs(np.diff(s))))

    def sample(k: int, origin: np.ndarray) -> np.ndarray:
        # Within a plane parallel to the slices, source indices are affine in (x, y).
        offset = origin - positions[k]
        ci = (offset @ row_cosine + gx * (axes[:, 0] @ row_cosine)
              + gy * (axes[:, 1] @ row_cosine)) / col_spacing
        cj = (offset @ col_cosine + gx * (axes[:, 0] @ col_cosine)
              + gy * (axes[:, 1] @ col_cosine)) / row_spacing
        return ndimage.map_coordinates(slices[k].astype(np.float64), [ci, cj], order=1,
                                       mode="constant", cval=np.nan)

    for z in range(shape[2]):
        origin = affine[:3, 3] + z * axes[:, 2]
        target = float(origin @ normal)
        if target < s[0] - tolerance or target > s[-1] + tolerance:
            continue
        k = int(np.clip(np.searchsorted(s, target, side="right") - 1, 0, len(s) - 2))
        w = float(np.clip((target - s[k]) / (s[k + 1] - s[k]), 0.0, 1.0))
        if w <= 1e-6:
            plane = sample(k, origin)
        elif w >= 1.0 - 1e-6:
            plane = sample(k + 1, origin)
        else:
            plane = (1.0 - w) * sample(k, origin) + w * sample(k + 1, origin)
        out[:, :, z] = np.where(np.isnan(plane), pad, plane)
    return out, affine
