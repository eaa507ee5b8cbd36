"""A chest-CT-like phantom in Hounsfield units, with one ellipsoid lesion.

Geometry is physical (mm), not in voxels, so the lesion volume means the same
at any matrix size: a 320 mm field of view in-plane and 160 mm along z.
Background air -1000 HU, a body ellipse of soft tissue -60 HU, two lungs
-850 HU, the lesion +45..+80 HU, Gaussian noise (sd 10 HU) everywhere.
Only the lesion exceeds ``LESION_THRESHOLD_HU`` in practice, so counting voxels
above it recovers the lesion volume: the imaging risk signal.
"""

from __future__ import annotations

import numpy as np

from pipelines.synth.patient import ImagingSim

__all__ = ["FOV_MM", "LESION_THRESHOLD_HU", "Z_EXTENT_MM", "geometry", "lesion_volume_ml",
           "render"]

FOV_MM = 320.0
Z_EXTENT_MM = 160.0
LESION_THRESHOLD_HU = 20.0
NOISE_HU = 10.0


def geometry(n_slices: int, size: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(pixel mm, slice mm, in-plane voxel centres, slice centres), centred on 0."""
    pixel = FOV_MM / size
    thickness = Z_EXTENT_MM / n_slices
    xy = (np.arange(size) + 0.5) * pixel - FOV_MM / 2
    z = (np.arange(n_slices) + 0.5) * thickness - Z_EXTENT_MM / 2
    return pixel, thickness, xy, z


def render(img: ImagingSim, rng: np.random.Generator, *, n_slices: int, size: int
           ) -> np.ndarray:
    """The HU volume, shape (n_slices, rows, columns), int16; slice k at z[k]."""
    _, _, xy, z = geometry(n_slices, size)
    zz = z[:, None, None]
    yy = xy[None, :, None]
    xx = xy[None, None, :]
    vol = np.full((n_slices, size, size), -1000.0, dtype=np.float32)
    body = (xx / 150.0) ** 2 + (yy / 105.0) ** 2 <= 1.0
    vol[np.broadcast_to(body, vol.shape)] = -60.0
    taper = np.sqrt(np.clip(1.0 - (zz / 120.0) ** 2, 0.2, None))
    for cx in (-65.0, 65.0):
        lung = ((xx - cx) / (45.0 * taper)) ** 2 + ((yy + 5.0) / (70.0 * taper)) ** 2 <= 1.0
        vol[lung] = -850.0
    (a, b, c), (cx, cy, cz) = img.semi_axes_mm, img.center_mm
    lesion = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 + ((zz - cz) / c) ** 2 <= 1.0
    vol[lesion] = img.lesion_hu
    vol += rng.standard_normal(vol.shape, dtype=np.float32) * NOISE_HU
    return np.rint(vol).astype(np.int16)


def lesion_volume_ml(hu: np.ndarray, *, n_slices: int, size: int) -> float:
    """The imaging statistic: volume (mL) of voxels above the lesion threshold."""
    pixel, thickness, _, _ = geometry(n_slices, size)
    return float((hu > LESION_THRESHOLD_HU).sum()) * pixel * pixel * thickness / 1000.0
