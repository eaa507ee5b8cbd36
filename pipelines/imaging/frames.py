"""One 2-D image plane with its geometry: the unit that series assembly orders and stacks.

A classic single-frame file is one :class:`Frame`; an enhanced multi-frame object yields
one per frame (:mod:`pipelines.imaging.multiframe`), a Siemens MOSAIC one per tile
(:mod:`pipelines.imaging.mosaic`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pipelines.imaging.decode import decode_pixels
from pipelines.imaging.header import header_value
from pipelines.imaging.spacing import pixel_spacing, positive_number
from pipelines.imaging.volume import ImageError

__all__ = ["Frame", "FrameLoader", "classic_frame", "float_list", "frames_from_dataset"]


class FrameLoader:
    """Decode a file's pixels once and hand out frames; multi-frame files share it."""

    def __init__(self, ds: Dataset, source: str) -> None:
        self.ds = ds
        self.source = source
        self._pixels: np.ndarray | None = None

    def __call__(self, index: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = decode_pixels(self.ds, self.source)
        if index >= len(self._pixels):
            raise ImageError(f"frame {index + 1} requested but the pixel data hold "
                             f"{len(self._pixels)} frames", source=self.source)
        return self._pixels[index]


@dataclass
class Frame:
    """A 2-D plane: stored pixels on demand, LPS geometry, value transform, sort keys."""

    source: str
    rows: int
    cols: int
    #: LPS position (mm) of the centre of the first transmitted pixel.
    position: np.ndarray
    #: Unit vector along a row (increasing column index), then along a column.
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    #: PixelSpacing order: (between rows, between columns) in mm.
    spacing: tuple[float, float]
    slope: float
    intercept: float
    #: Orders repeats at one position (time, echo, ...) for 4-D series.
    temporal: tuple[Any, ...]
    load: Callable[[], np.ndarray]
    series_uid: str
    frame_of_reference: str
    photometric: str
    samples: int
    bits_stored: int
    signed: bool
    slice_thickness: float | None = None
    #: Why ``spacing`` is the 1 mm stand-in (PixelSpacing missing, zero, ...); None if read.
    spacing_unknown: str | None = None


def float_list(value: Any, n: int, name: str, source: str) -> list[float]:
    """A multi-valued DS as floats, refusing wrong counts and non-numbers (wrong VR)."""
    try:
        scalar = isinstance(value, str | bytes | int | float) or not hasattr(value, "__iter__")
        values = [float(v) for v in ([value] if scalar else list(value))]
    except (TypeError, ValueError) as exc:
        # The value itself is not quoted: a garbled header can hold anything, names included.
        raise ImageError(f"{name} is not {n} numbers (wrong VR or garbled)",
                         source=source) from exc
    if len(values) != n or not all(np.isfinite(values)):
        raise ImageError(f"{name} has {len(values)} value(s), not {n} finite numbers",
                         source=source)
    return values


def _number(ds: Dataset, keyword: str, default: float | None, source: str) -> float | None:
    value = header_value(ds, keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"{keyword} is not a number (wrong VR or garbled)",
                         source=source) from exc


def _int(ds: Dataset, keyword: str, source: str, default: int | None = None) -> int:
    value = header_value(ds, keyword, default)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"{keyword} is not an integer (wrong VR or missing)",
                         source=source) from exc


def image_attributes(ds: Dataset, source: str) -> dict[str, Any]:
    """Group-0028 attributes every frame of a file shares, validated."""
    return {
        "rows": _int(ds, "Rows", source),
        "cols": _int(ds, "Columns", source),
        "photometric": str(header_value(ds, "PhotometricInterpretation",
                                        "MONOCHROME2")).strip(),
        "samples": _int(ds, "SamplesPerPixel", source, 1),
        "bits_stored": _int(ds, "BitsStored", source, _int(ds, "BitsAllocated", source, 16)),
        "signed": _int(ds, "PixelRepresentation", source, 0) == 1,
        "series_uid": str(header_value(ds, "SeriesInstanceUID", "")),
        "frame_of_reference": str(header_value(ds, "FrameOfReferenceUID", "")),
    }


def classic_frame(ds: Dataset, source: str, loader: FrameLoader) -> Frame:
    """The one frame of a classic single-frame image with ImagePositionPatient."""
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
        if keyword not in ds:
            raise ImageError(f"{keyword} is missing, so the image cannot be placed in a "
                             "volume", source=source)
    iop = float_list(header_value(ds, "ImageOrientationPatient"), 6,
                     "ImageOrientationPatient", source)
    temporal = (
        _number(ds, "TemporalPositionIdentifier", 0.0, source),
        _number(ds, "EchoNumbers", 0.0, source) if not isinstance(
            header_value(ds, "EchoNumbers"), list) else 0.0,
        _number(ds, "TriggerTime", 0.0, source),
        str(header_value(ds, "AcquisitionTime", "")),
        _number(ds, "InstanceNumber", 0.0, source),
    )
    # Missing or unusable PixelSpacing: 1 mm, flagged (pipelines.imaging.spacing).
    spacing = pixel_spacing(ds, source, ("PixelSpacing",), warn=False)
    return Frame(
        source=source,
        position=np.array(float_list(header_value(ds, "ImagePositionPatient"), 3,
                                     "ImagePositionPatient", source)),
        row_cosine=_unit(iop[:3], source), col_cosine=_unit(iop[3:], source),
        spacing=spacing.values,
        slope=_number(ds, "RescaleSlope", 1.0, source) or 1.0,
        intercept=_number(ds, "RescaleIntercept", 0.0, source) or 0.0,
        temporal=temporal,
        load=lambda: loader(0),
        slice_thickness=positive_number(header_value(ds, "SpacingBetweenSlices")) or
        positive_number(header_value(ds, "SliceThickness")),
        spacing_unknown=None if spacing.known else spacing.reason,
        **image_attributes(ds, source),
    )


def _unit(vector: list[float], source: str) -> np.ndarray:
    v = np.asarray(vector, dtype=float)
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        raise ImageError(f"ImageOrientationPatient has a zero direction cosine {vector}",
                         source=source)
    return v / norm


def frames_from_dataset(ds: Dataset, source: str) -> list[Frame]:
    """All frames of one file: enhanced multi-frame, Siemens MOSAIC, or classic single-frame."""
    from pipelines.imaging.mosaic import is_mosaic, mosaic_frames
    from pipelines.imaging.multiframe import enhanced_frames, is_enhanced

    loader = FrameLoader(ds, source)
    if is_enhanced(ds):
        return enhanced_frames(ds, source, loader)
    if is_mosaic(ds):
        return mosaic_frames(ds, source, loader)
    frames = int(ds.get("NumberOfFrames", 1) or 1) if str(
        ds.get("NumberOfFrames", "1")).strip().isdigit() else None
    if frames is None:
        raise ImageError("NumberOfFrames is not an integer (wrong VR or value)",
                         source=source)
    if frames > 1:
        raise ImageError(f"{frames}-frame object without per-frame geometry "
                         "(PerFrameFunctionalGroupsSequence); it is not a volume this "
                         "reader can place", source=source)
    return [classic_frame(ds, source, loader)]
