"""Enhanced multi-frame objects: one :class:`Frame` per frame from the functional groups.

Each frame's PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence and
PixelValueTransformationSequence come from the per-frame group, falling back to the shared
group (PS3.3 C.7.6.16: an attribute lives in exactly one of the two).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pipelines.imaging.frames import Frame, FrameLoader, float_list, image_attributes
from pipelines.imaging.spacing import pixel_spacing, positive_number
from pipelines.imaging.volume import ImageError

__all__ = ["enhanced_frames", "is_enhanced"]


def is_enhanced(ds: Dataset) -> bool:
    """True for objects whose geometry lives in per-frame functional groups."""
    return "PerFrameFunctionalGroupsSequence" in ds


def _macro(per_frame: Dataset, shared: Dataset | None, keyword: str) -> Dataset | None:
    for group in (per_frame, shared):
        if group is not None and keyword in group and len(group[keyword].value) > 0:
            item: Dataset = group[keyword].value[0]
            return item
    return None


def _value(item: Dataset | None, keyword: str, default: Any = None) -> Any:
    return item.get(keyword, default) if item is not None else default


def enhanced_frames(ds: Dataset, source: str, loader: FrameLoader) -> list[Frame]:
    """Frames of an enhanced multi-frame image, each with its own geometry and rescale."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    try:
        n_frames = int(ds.get("NumberOfFrames", len(per_frame)))
    except (TypeError, ValueError) as exc:
        raise ImageError("NumberOfFrames is not an integer (wrong VR or value)",
                         source=source) from exc
    if n_frames != len(per_frame):
        raise ImageError(f"NumberOfFrames is {n_frames} but there are {len(per_frame)} "
                         "per-frame functional groups", source=source)
    attributes = image_attributes(ds, source)
    frames = []
    for index, group in enumerate(per_frame):
        where = f"{source} frame {index + 1}"
        position = _value(_macro(group, shared, "PlanePositionSequence"),
                          "ImagePositionPatient")
        orientation = _value(_macro(group, shared, "PlaneOrientationSequence"),
                             "ImageOrientationPatient")
        measures = _macro(group, shared, "PixelMeasuresSequence")
        if position is None or orientation is None:
            raise ImageError("frame lacks PlanePositionSequence or PlaneOrientationSequence "
                             "geometry", source=where)
        # Missing or unusable PixelSpacing: 1 mm, flagged (pipelines.imaging.spacing).
        spacing = pixel_spacing(measures, where, ("PixelSpacing",), warn=False)
        iop = float_list(orientation, 6, "ImageOrientationPatient", where)
        transform = _macro(group, shared, "PixelValueTransformationSequence")
        content = _macro(group, None, "FrameContentSequence")
        thickness = positive_number(_value(measures, "SpacingBetweenSlices")) or \
            positive_number(_value(measures, "SliceThickness"))
        frames.append(Frame(
            source=where,
            position=np.array(float_list(position, 3, "ImagePositionPatient", where)),
            row_cosine=np.asarray(iop[:3]) / np.linalg.norm(iop[:3]),
            col_cosine=np.asarray(iop[3:]) / np.linalg.norm(iop[3:]),
            spacing=spacing.values,
            spacing_unknown=None if spacing.known else spacing.reason,
            slope=float(_value(transform, "RescaleSlope", ds.get("RescaleSlope", 1.0)) or 1.0),
            intercept=float(_value(transform, "RescaleIntercept",
                                   ds.get("RescaleIntercept", 0.0)) or 0.0),
            temporal=(
                int(_value(content, "TemporalPositionIndex", 0) or 0),
                tuple(int(v) for v in (_value(content, "DimensionIndexValues", []) or [])
                      ) if not isinstance(_value(content, "DimensionIndexValues"), int)
                else (int(_value(content, "DimensionIndexValues")),),
                index,
            ),
            load=(lambda i=index: loader(i)),  # type: ignore[misc]
            slice_thickness=thickness,
            **attributes,
        ))
    return frames
