"""The Volume: voxels plus the affine that places them in patient space.

Array axes follow NIfTI/nibabel: ``(i, j, k[, t])`` = (columns, rows, slices[, time]),
and ``affine`` maps voxel indices to RAS+ millimetres, as dcm2niix and
dicom2nifti write them. Colour images add a trailing RGB axis, flagged by
``metadata["ColorChannels"] == 3``; ``to_nifti`` writes those as NIfTI RGB24.

``array`` may be C- or Fortran-ordered: a grey DICOM series is the transposed view of
its frames as stored (slices, rows, columns), which saves a transposing copy of the
whole volume. Use ``np.ascontiguousarray`` where a C-ordered buffer is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ImageError", "Volume"]


class ImageError(ValueError):
    """An image or series that cannot become a volume; names the file and the problem."""

    def __init__(self, reason: str, *, source: str | None = None) -> None:
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


@dataclass
class Volume:
    """Voxels, their placement in RAS+ mm, and where they came from."""

    array: np.ndarray
    affine: np.ndarray
    #: DICOM-keyword metadata, e.g. Modality, SeriesInstanceUID, PhotometricInterpretation.
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Steps applied so far: name, arguments, package version (TorchIO-style history).
    provenance: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim not in (2, 3, 4):
            raise ValueError(f"array must be 2-D, 3-D or 4-D, got {self.array.ndim}-D")

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def is_color(self) -> bool:
        # Volumes cached by readers before READER_VERSION 3 say "RGB (trailing axis)".
        channels = self.metadata.get("ColorChannels")
        return channels == 3 or (isinstance(channels, str) and channels.startswith("RGB"))

    def to_nifti(self):  # type: ignore[no-untyped-def]
        """A nibabel Nifti1Image of this volume (RGB24 for colour)."""
        from pipelines.imaging.convert import volume_to_nifti

        return volume_to_nifti(self)
