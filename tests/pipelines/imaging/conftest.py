"""Helpers for comparing volumes with ground-truth NIfTI files in world space."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from pipelines.imaging.volume import Volume


def canonical(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine after nibabel.as_closest_canonical (RGB: trailing channel kept)."""
    array = volume.array
    if volume.metadata.get("ColorChannels"):
        channels = [canonical(Volume(array[..., c], volume.affine))[0] for c in range(3)]
        image = nib.as_closest_canonical(nib.Nifti1Image(array[..., 0], volume.affine))
        return np.stack(channels, axis=-1), image.affine
    image = nib.as_closest_canonical(nib.Nifti1Image(array, volume.affine))
    return np.asarray(image.dataobj), image.affine


def canonical_truth(path) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Ground-truth array (RGBA structured -> (..., 3)) and affine, canonical."""
    image = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(image.dataobj)
    if data.dtype.names:
        data = np.stack([data[c] for c in ("R", "G", "B")], axis=-1)
    return data, image.affine
