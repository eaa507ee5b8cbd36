"""Pixel and slice spacing as read from headers, with unusable values made unit and flagged.

Real headers carry ``PixelSpacing = 0\\0`` (a CR whose digitiser never calibrated),
negative or NaN values, text where a number belongs, or nothing at all. A zero
spacing gives a singular affine, which nibabel refuses ("Could not decompose
affine") and resampling divides by. The policy: an unusable spacing becomes 1 mm
with ``SpacingKnown = False`` and the reason (which tag, what was wrong, never the
value) in the Volume's metadata, and a logged warning naming the tag. The image
stays usable for models that resize to a fixed field of view, and anything that
measures in millimetres can see that it must not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["PLANAR_SPACING_TAGS", "Spacing", "flag_unknown", "pixel_spacing",
           "positive_number", "repair_affine"]

log = logging.getLogger(__name__)

#: Where a projection image's pixel size may be, best first: PixelSpacing (patient
#: plane), ImagerPixelSpacing (detector plane), NominalScannedPixelSpacing (film scans).
PLANAR_SPACING_TAGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")

UNIT_SOURCE = "none (1 mm assumed)"


@dataclass(frozen=True)
class Spacing:
    """(between rows, between columns) in mm, and whether the header really said so."""

    values: tuple[float, float]
    known: bool
    tag: str | None
    #: Why the spacing is unknown (or which tags were skipped), value-free; None if clean.
    reason: str | None = None

    def record(self, metadata: dict[str, Any]) -> None:
        """Write ``SpacingKnown``, ``SpacingSource`` and a reason into ``metadata``."""
        metadata["SpacingKnown"] = self.known
        metadata["SpacingSource"] = self.tag if self.known and self.tag else UNIT_SOURCE
        if self.reason:
            metadata["SpacingUnknownReason" if not self.known else "SpacingNote"] = self.reason


def _problem(value: Any, n: int) -> str | None:
    """What is wrong with a multi-valued DS meant to hold ``n`` positive mm, or None."""
    try:
        scalar = isinstance(value, str | bytes | int | float) or not hasattr(value, "__iter__")
        numbers = [float(v) for v in ([value] if scalar else list(value))]
    except (TypeError, ValueError):
        return "is not numeric"
    if len(numbers) != n:
        return f"has {len(numbers)} value(s), not {n}"
    if not all(math.isfinite(v) for v in numbers):
        return "is not finite"
    if any(v == 0 for v in numbers):
        return "is zero"
    if any(v < 0 for v in numbers):
        return "is negative"
    return None


def positive_number(value: Any) -> float | None:
    """``value`` as a finite positive float, else None (missing, zero, negative, NaN, text)."""
    if value is None or value == "":
        return None
    return None if _problem(value, 1) else float(value)


def pixel_spacing(ds: Dataset | None, source: str, tags: Sequence[str] = PLANAR_SPACING_TAGS,
                  *, warn: bool = True) -> Spacing:
    """The first usable spacing among ``tags``; else 1 mm, flagged, with the reason.

    With ``warn``, every present but unusable tag is logged as a warning naming the tag
    and the file; series assembly turns it off and warns once per series instead.
    """
    if ds is None:
        ds = Dataset()
    skipped: list[str] = []
    for tag in tags:
        value = ds.get(tag)
        if value is None or value == "":
            continue
        problem = _problem(value, 2)
        if problem is None:
            numbers = [float(v) for v in value]
            reason = "; ".join(skipped) or None
            return Spacing((numbers[0], numbers[1]), True, tag, reason)
        skipped.append(f"{tag} {problem}")
        if warn:
            log.warning("%s: %s %s; not used as the pixel spacing", source, tag, problem)
    if not skipped:
        skipped.append(f"no {' or '.join(tags)}")
    reason = "; ".join(skipped) + " (1 mm assumed)"
    if warn:
        log.warning("%s: pixel spacing unknown (%s)", source, reason)
    return Spacing((1.0, 1.0), False, None, reason)


def flag_unknown(metadata: dict[str, Any], reason: str) -> None:
    """Mark ``metadata`` as having (some) unit spacing that no header gave."""
    metadata["SpacingKnown"] = False
    previous = metadata.get("SpacingUnknownReason")
    metadata["SpacingUnknownReason"] = f"{previous}; {reason}" if previous else reason


def repair_affine(affine: np.ndarray, source: str, what: str = "pixdim"
                  ) -> tuple[np.ndarray, str | None]:
    """An affine whose axes all have a finite, non-zero length: (affine, reason or None).

    A zero, NaN or infinite axis (a NIfTI ``pixdim`` of 0, say) becomes a 1 mm step
    along the voxel axis itself; its direction is lost with its length. A translation
    that is not finite becomes 0.
    """
    out = np.array(affine, dtype=float)
    bad = []
    for axis in range(3):
        column = out[:3, axis]
        length = float(np.linalg.norm(column)) if np.all(np.isfinite(column)) else math.nan
        if not math.isfinite(length) or length < 1e-9:
            out[:3, axis] = 0.0
            out[axis, axis] = 1.0
            bad.append(axis)
    if not np.all(np.isfinite(out[:3, 3])):
        out[:3, 3] = 0.0
    if not bad and abs(np.linalg.det(out[:3, :3])) > 1e-12:
        return out, None
    if not bad:
        # Axes of proper length that are parallel: no direction can be trusted.
        out[:3, :3] = np.diag(np.linalg.norm(out[:3, :3], axis=0))
        reason = f"{what}: voxel axes are parallel (orientation lost; axis lengths kept)"
    else:
        names = ", ".join("ijk"[a] for a in bad)
        reason = f"{what}: zero or non-finite voxel size along {names} (1 mm assumed)"
    log.warning("%s: %s", source, reason)
    return out, reason
