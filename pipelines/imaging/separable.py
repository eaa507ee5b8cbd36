"""Axis-by-axis resampling for grids whose axes map onto the input's axes.

When the output voxel -> input voxel map is a permutation of the axes with a scale
and offset on each (no rotation or shear), trilinear interpolation is a product of
1-D linear interpolations, one per axis, and so is nearest neighbour. Doing the axes
one at a time touches each voxel a few times instead of gathering eight corners per
output voxel, and works on the input's own memory layout, so reorientation (flips,
axis swaps) costs no copy.

The maps here reproduce what MONAI's resamplers compute on the same grids:

* :func:`grid_sample_map`: ``torch.nn.functional.grid_sample`` as MONAI's ``Spacing``
  and ``Orientation`` call it (voxel-exact coordinates, ``padding_mode="zeros"``).
* :func:`interpolate_map`: ``torch.nn.functional.interpolate`` as MONAI's ``Resize``
  calls it (``align_corners=False``, edge-clamped; legacy ``"nearest"``).
* :func:`shift_map`: integer shifts with zero fill, as ``ResizeWithPadOrCrop``.

Values agree with those to float32 rounding; tests hold them to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["AxisMap", "affine_axis_maps", "apply_maps", "grid_sample_map", "interpolate_map",
           "shift_map"]

Mode = Literal["bilinear", "nearest"]


@dataclass(frozen=True)
class AxisMap:
    """Output position ``j`` along one axis = ``w0[j] * in[i0[j]] + w1[j] * in[i1[j]]``.

    ``source`` is the input axis that this output axis is read from; ``i1``/``w1`` are
    None for one-tap (nearest, shift) maps. Out-of-range taps have weight 0 and a
    clamped index.
    """

    source: int
    i0: np.ndarray
    w0: np.ndarray
    i1: np.ndarray | None = None
    w1: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.i0)


def _taps(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    inside = (index >= 0) & (index <= n - 1)
    return np.clip(index, 0, n - 1).astype(np.intp), inside


def grid_sample_map(source: int, coords: np.ndarray, n: int, mode: Mode) -> AxisMap:
    """Sample input voxel coordinates ``coords`` (float64) with zero padding outside."""
    if mode == "nearest":
        # grid_sample rounds half to even (nearbyint), as np.rint does.
        index, inside = _taps(np.rint(coords), n)
        return AxisMap(source, index, inside.astype(np.float32))
    floor = np.floor(coords)
    frac = coords - floor
    i0, in0 = _taps(floor, n)
    i1, in1 = _taps(floor + 1, n)
    return AxisMap(source, i0, np.where(in0, 1.0 - frac, 0.0).astype(np.float32),
                   i1, np.where(in1, frac, 0.0).astype(np.float32))


def interpolate_map(source: int, n_in: int, n_out: int, mode: Mode) -> AxisMap:
    """``F.interpolate(size=...)`` along one axis: linear or legacy nearest."""
    # torch computes the source position in float32 for float32 images.
    scale = np.float32(n_in / n_out)
    j = np.arange(n_out, dtype=np.float32)
    if mode == "nearest":
        index = np.minimum(np.floor(j * scale).astype(np.intp), n_in - 1)
        return AxisMap(source, index, np.ones(n_out, np.float32))
    if n_in == n_out:
        return AxisMap(source, np.arange(n_out, dtype=np.intp), np.ones(n_out, np.float32))
    src = np.maximum(scale * (j + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = src.astype(np.intp)  # src >= 0, so truncation is floor
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return AxisMap(source, i0, (np.float32(1.0) - frac).astype(np.float32), i1, frac)


def shift_map(source: int, offset: int, n_in: int, n_out: int) -> AxisMap:
    """Output ``j`` = input ``j + offset``, zero outside the input (pad/crop)."""
    index, inside = _taps(np.arange(n_out) + offset, n_in)
    return AxisMap(source, index, inside.astype(np.float32))


def affine_axis_maps(src_to_dst: np.ndarray, in_shape: tuple[int, ...],
                     out_shape: tuple[int, ...], mode: Mode, *, tol: float = 1e-6
                     ) -> list[AxisMap] | None:
    """Per-axis grid_sample maps for ``dst voxel -> src voxel`` (4x4), or None if rotated.

    Parameters
    ----------
    src_to_dst : ndarray (4, 4)
        ``inv(src_affine) @ dst_affine``: output voxel indices to input voxel indices.
    in_shape, out_shape : tuple of 3 int
        Spatial shapes.
    mode : {"bilinear", "nearest"}
    tol : float
        Largest off-axis coefficient, relative to the column's largest, still taken as 0.

    Returns
    -------
    list of AxisMap or None
        One map per output axis, or None when some output axis mixes input axes.
    """
    linear = np.asarray(src_to_dst, dtype=np.float64)[:3, :3]
    sources = np.argmax(np.abs(linear), axis=0)
    if sorted(sources.tolist()) != [0, 1, 2]:
        return None
    maps = []
    for d in range(3):
        column = linear[:, d]
        p = int(sources[d])
        if np.abs(np.delete(column, p)).max() > tol * abs(column[p]):
            return None
        coords = column[p] * np.arange(out_shape[d], dtype=np.float64) + src_to_dst[p, 3]
        if mode == "nearest" and column[p] < 0:
            # MONAI flips this axis (Orientation) before resampling, and rounding ties
            # to even must break the way they do on the flipped axis.
            last = in_shape[p] - 1
            flipped = grid_sample_map(p, last - coords, in_shape[p], mode)
            maps.append(AxisMap(p, last - flipped.i0, flipped.w0))
            continue
        maps.append(grid_sample_map(p, coords, in_shape[p], mode))
    return maps


def apply_maps(data: np.ndarray, maps: list[AxisMap]) -> np.ndarray:
    """Resample ``data`` (C, X, Y, Z) float32 with one map per output spatial axis.

    Returns a C-ordered float32 array (C, X', Y', Z') where output axis ``d`` is read
    from input axis ``maps[d].source``. The input may be in any memory layout; each pass
    runs on whatever layout it finds (``np.take`` copies whole rows or planes when the
    axis is not the innermost one), and only the last step reorders.
    """
    if data.ndim != 4 or len(maps) != 3:
        raise ValueError(f"expected (C, X, Y, Z) data and 3 maps, got {data.shape} and "
                         f"{len(maps)} maps")
    # Channel by channel: with the channel axis innermost (a Fortran-ordered volume),
    # every gather would copy single elements.
    out = np.empty((data.shape[0], *(m.size for m in maps)), dtype=np.float32)
    for c in range(data.shape[0]):
        out[c] = _apply_3d(data[c], maps)
    return out


def _apply_3d(data: np.ndarray, maps: list[AxisMap]) -> np.ndarray:
    # Work on a C-ordered view: `axes[b]` is the data axis held in buffer axis b.
    if data.flags.c_contiguous:
        buf, axes = data, [0, 1, 2]
    elif data.flags.f_contiguous:
        buf, axes = data.T, [2, 1, 0]
    else:
        buf, axes = np.ascontiguousarray(data), [0, 1, 2]
    inner = axes[-1]

    def cost(m: AxisMap) -> tuple[bool, bool, float]:
        # Shrinking passes first (less data for the rest); gathers along the innermost
        # axis copy element by element, so they go last among equals.
        ratio = m.size / data.shape[m.source]
        return ratio > 1.0, m.source == inner, ratio

    for m in sorted(maps, key=cost):
        b = axes.index(m.source)
        shape = [1, 1, 1]
        shape[b] = -1
        out = np.take(buf, m.i0, axis=b)
        out *= m.w0.reshape(shape)
        if m.i1 is not None and m.w1 is not None:
            second = np.take(buf, m.i1, axis=b)
            second *= m.w1.reshape(shape)
            out += second
        buf = out
    # Buffer axis b now holds output axis d where maps[d].source == axes[b].
    return buf.transpose([axes.index(m.source) for m in maps])
