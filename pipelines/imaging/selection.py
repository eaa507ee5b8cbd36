"""Declarative series selection: which DICOM series a model may take as input.

A model's config names its rules; each rule is a small tree of conditions that
is evaluated against a :class:`SeriesInfo` (a header summary, no pixels)::

    series_selection:
      ct_chest_axial:
        all:
          - modality: CT
          - body_part: [CHEST, THORAX]
          - plane: axial
          - slice_thickness: {min: 0.5, max: 3.0}
          - min_slices: 40
      any_mr_or_pet:
        any: [{modality: MR}, {modality: PT}]

A mapping with several condition keys is an implicit ``all``; ``any``, ``all``
and ``not`` nest. A condition on an attribute the series lacks is false, so a
rule never matches by accident on missing data.

See Also
--------
pipelines.imaging.discovery : finding the series in a folder.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydicom import Dataset

from pipelines.imaging.volume import ImageError

__all__ = [
    "AllOf",
    "AnyOf",
    "BodyPartIs",
    "MinSlices",
    "ModalityIs",
    "Not",
    "Plane",
    "PlaneIs",
    "Rule",
    "SeriesInfo",
    "SliceThicknessIn",
    "acquisition_plane",
    "load_rules",
    "main_series",
    "matching_rules",
    "rule_from_dict",
    "rules_from_dict",
    "rules_to_dict",
    "series_info",
]


class Plane(StrEnum):
    """Acquisition plane, from the slice normal's dominant patient axis."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"


def acquisition_plane(orientation: Sequence[float] | None) -> Plane | None:
    """The plane of ImageOrientationPatient (row and column direction cosines).

    The slice normal is row x column; its largest component along the patient
    x (left-right), y (anterior-posterior) or z (head-feet) axis makes the plane
    sagittal, coronal or axial. An oblique slice takes its nearest plane.

    Returns
    -------
    Plane or None
        None when the orientation is missing, not six numbers or degenerate.
    """
    if orientation is None or len(orientation) != 6:
        return None
    try:
        cosines = np.asarray([float(v) for v in orientation], dtype=float)
    except (TypeError, ValueError):
        return None
    normal = np.cross(cosines[:3], cosines[3:])
    if not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 1e-6:
        return None
    return (Plane.SAGITTAL, Plane.CORONAL, Plane.AXIAL)[int(np.argmax(np.abs(normal)))]


@dataclass(frozen=True)
class SeriesInfo:
    """Header summary of one series: enough to select it without reading pixels.

    DICOM attributes keep their keyword spelling; derived state is lower-case.
    ``n_slices`` counts frames (a multi-frame instance contributes NumberOfFrames).
    """

    SeriesInstanceUID: str
    Modality: str | None = None
    BodyPartExamined: str | None = None
    ImageOrientationPatient: tuple[float, ...] | None = None
    SliceThickness: float | None = None
    SeriesDescription: str | None = None
    n_instances: int = 0
    n_slices: int = 0
    paths: tuple[Path, ...] = ()
    sop_instance_uids: tuple[str, ...] = ()

    @property
    def plane(self) -> Plane | None:
        """Acquisition plane from ImageOrientationPatient, or None."""
        return acquisition_plane(self.ImageOrientationPatient)


def _functional(ds: Dataset, sequence: str, keyword: str) -> Any:
    """An attribute of an enhanced multi-frame object's shared functional groups."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared:
        return None
    inner = shared[0].get(sequence)
    return inner[0].get(keyword) if inner else None


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _str_or_none(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _most_common(values: Iterable[Any]) -> Any:
    """The most frequent non-None value: one odd instance should not decide the series."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def series_info(datasets: Sequence[Dataset]) -> SeriesInfo:
    """Summarise the headers of one series' instances.

    Parameters
    ----------
    datasets : sequence of pydicom.Dataset
        The series' instances, typically read with ``stop_before_pixels=True``.
        ``ds.filename`` (set by ``dcmread``) supplies the paths.

    Returns
    -------
    SeriesInfo

    Raises
    ------
    ImageError
        When ``datasets`` is empty, or its instances belong to several series.
    """
    if not datasets:
        raise ImageError("no instances given; a series needs at least one")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) != 1 or "" in uids:
        raise ImageError(f"instances belong to {len(uids)} series ({sorted(uids)}); "
                         "group them by SeriesInstanceUID first")
    orientations: list[tuple[float, ...] | None] = []
    thicknesses: list[float | None] = []
    n_slices = 0
    for ds in datasets:
        iop = ds.get("ImageOrientationPatient") or _functional(
            ds, "PlaneOrientationSequence", "ImageOrientationPatient")
        orientations.append(tuple(round(float(v), 6) for v in iop) if iop else None)
        thickness = ds.get("SliceThickness")
        if thickness in (None, ""):
            thickness = _functional(ds, "PixelMeasuresSequence", "SliceThickness")
        thicknesses.append(_float_or_none(thickness))
        n_slices += int(ds.get("NumberOfFrames") or 1)
    first = datasets[0]
    paths = tuple(Path(str(ds.filename)) for ds in datasets
                  if isinstance(getattr(ds, "filename", None), str | Path))
    return SeriesInfo(
        SeriesInstanceUID=uids.pop(),
        Modality=_str_or_none(first.get("Modality")),
        BodyPartExamined=_str_or_none(first.get("BodyPartExamined")),
        ImageOrientationPatient=_most_common(orientations),
        SliceThickness=_most_common(thicknesses),
        SeriesDescription=_str_or_none(first.get("SeriesDescription")),
        n_instances=len(datasets),
        n_slices=n_slices,
        paths=paths,
        sop_instance_uids=tuple(str(ds.get("SOPInstanceUID", "")) for ds in datasets),
    )


# --------------------------------------------------------------------------- rules


class Rule:
    """A condition on a :class:`SeriesInfo`; serialises to a one-key dict."""

    key: ClassVar[str]

    def matches(self, info: SeriesInfo) -> bool:
        """Whether the series satisfies this rule."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form, which :func:`rule_from_dict` reads back."""
        raise NotImplementedError


def _names(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ValueError(f"{what} needs one or more non-empty strings, got {value!r}")
    # Code strings are upper-case in DICOM, but configs are typed by people.
    return tuple(v.strip().upper() for v in items)


@dataclass(frozen=True, init=False)
class ModalityIs(Rule):
    """Modality is one of ``values`` (case-insensitive)."""

    values: tuple[str, ...]
    key: ClassVar[str] = "modality"

    def __init__(self, values: str | Iterable[str]) -> None:
        object.__setattr__(self, "values", _names(values, "modality"))

    def matches(self, info: SeriesInfo) -> bool:
        return info.Modality is not None and info.Modality.upper() in self.values

    def to_dict(self) -> dict[str, Any]:
        return {self.key: list(self.values)}


@dataclass(frozen=True, init=False)
class BodyPartIs(Rule):
    """BodyPartExamined is one of ``values`` (case-insensitive)."""

    values: tuple[str, ...]
    key: ClassVar[str] = "body_part"

    def __init__(self, values: str | Iterable[str]) -> None:
        object.__setattr__(self, "values", _names(values, "body_part"))

    def matches(self, info: SeriesInfo) -> bool:
        return (info.BodyPartExamined is not None
                and info.BodyPartExamined.upper() in self.values)

    def to_dict(self) -> dict[str, Any]:
        return {self.key: list(self.values)}


@dataclass(frozen=True, init=False)
class PlaneIs(Rule):
    """The acquisition plane is one of ``planes``."""

    planes: tuple[Plane, ...]
    key: ClassVar[str] = "plane"

    def __init__(self, planes: Plane | str | Iterable[Plane | str]) -> None:
        items = (planes,) if isinstance(planes, str | Plane) else tuple(planes)
        try:
            parsed = tuple(Plane(str(p.value if isinstance(p, Plane) else p).lower())
                           for p in items)
        except ValueError:
            raise ValueError(f"plane must be among {[p.value for p in Plane]}, "
                             f"got {planes!r}") from None
        if not parsed:
            raise ValueError("plane needs at least one of axial, coronal, sagittal")
        object.__setattr__(self, "planes", parsed)

    def matches(self, info: SeriesInfo) -> bool:
        return info.plane in self.planes

    def to_dict(self) -> dict[str, Any]:
        return {self.key: [p.value for p in self.planes]}


@dataclass(frozen=True)
class SliceThicknessIn(Rule):
    """``min <= SliceThickness <= max`` in mm; either bound may be None (open)."""

    min: float | None = None
    max: float | None = None
    key: ClassVar[str] = "slice_thickness"

    def __post_init__(self) -> None:
        if self.min is None and self.max is None:
            raise ValueError("slice_thickness needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"slice_thickness min {self.min} exceeds max {self.max}")

    def matches(self, info: SeriesInfo) -> bool:
        t = info.SliceThickness
        if t is None:
            return False
        return (self.min is None or t >= self.min) and (self.max is None or t <= self.max)

    def to_dict(self) -> dict[str, Any]:
        bounds = {k: v for k, v in (("min", self.min), ("max", self.max)) if v is not None}
        return {self.key: bounds}


@dataclass(frozen=True)
class MinSlices(Rule):
    """At least ``count`` slices (frames) in the series."""

    count: int
    key: ClassVar[str] = "min_slices"

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"min_slices must be a positive integer, got {self.count!r}")

    def matches(self, info: SeriesInfo) -> bool:
        return info.n_slices >= self.count

    def to_dict(self) -> dict[str, Any]:
        return {self.key: self.count}


@dataclass(frozen=True, init=False)
class AllOf(Rule):
    """Every sub-rule matches (AND)."""

    rules: tuple[Rule, ...]
    key: ClassVar[str] = "all"

    def __init__(self, rules: Iterable[Rule]) -> None:
        items = tuple(rules)
        if not items:
            raise ValueError(f"{self.key} needs at least one rule")
        object.__setattr__(self, "rules", items)

    def matches(self, info: SeriesInfo) -> bool:
        return all(r.matches(info) for r in self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {self.key: [r.to_dict() for r in self.rules]}


@dataclass(frozen=True, init=False)
class AnyOf(AllOf):
    """At least one sub-rule matches (OR)."""

    key: ClassVar[str] = "any"

    def matches(self, info: SeriesInfo) -> bool:
        return any(r.matches(info) for r in self.rules)


@dataclass(frozen=True)
class Not(Rule):
    """The sub-rule does not match."""

    rule: Rule
    key: ClassVar[str] = "not"

    def matches(self, info: SeriesInfo) -> bool:
        return not self.rule.matches(info)

    def to_dict(self) -> dict[str, Any]:
        return {self.key: self.rule.to_dict()}


_LEAVES: dict[str, type[Rule]] = {
    c.key: c for c in (ModalityIs, BodyPartIs, PlaneIs, SliceThicknessIn, MinSlices)}


def rule_from_dict(data: Mapping[str, Any]) -> Rule:
    """Build a rule from its dict form (see the module docstring).

    Raises
    ------
    ValueError
        On an unknown key or a bad value; the message names both.
    """
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"a rule is a non-empty mapping, got {data!r}")
    if len(data) > 1:
        return AllOf(rule_from_dict({k: v}) for k, v in data.items())
    ((key, value),) = data.items()
    if key in ("all", "any"):
        if not isinstance(value, list):
            raise ValueError(f"{key!r} takes a list of rules, got {value!r}")
        subs = [rule_from_dict(v) for v in value]
        return AllOf(subs) if key == "all" else AnyOf(subs)
    if key == "not":
        return Not(rule_from_dict(value))
    if key == "slice_thickness":
        if not isinstance(value, Mapping) or set(value) - {"min", "max"}:
            raise ValueError(f"slice_thickness takes {{min: mm, max: mm}}, got {value!r}")
        return SliceThicknessIn(min=_float_or_none(value.get("min")),
                                max=_float_or_none(value.get("max")))
    if key == "min_slices":
        return MinSlices(value)
    if key in _LEAVES:
        return _LEAVES[key](value)  # type: ignore[call-arg]
    known = sorted([*_LEAVES, "all", "any", "not"])
    raise ValueError(f"unknown rule key {key!r}; expected one of {known}")


def rules_from_dict(data: Mapping[str, Any]) -> dict[str, Rule]:
    """Named rules from a mapping name -> rule dict (order kept)."""
    return {str(name): rule_from_dict(body) for name, body in data.items()}


def rules_to_dict(rules: Mapping[str, Rule]) -> dict[str, Any]:
    """The serialisable form of named rules; inverse of :func:`rules_from_dict`."""
    return {name: rule.to_dict() for name, rule in rules.items()}


def load_rules(path: Path) -> dict[str, Rule]:
    """Read named rules from YAML: either the rules at top level, or under a
    ``series_selection`` key so a whole model config can be given."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, Mapping) and "series_selection" in data:
        data = data["series_selection"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of rule name -> rule, got {type(data)}")
    try:
        return rules_from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def matching_rules(info: SeriesInfo, rules: Mapping[str, Rule]) -> list[str]:
    """Names of the rules the series matches, in the rules' order."""
    return [name for name, rule in rules.items() if rule.matches(info)]


# ----------------------------------------------------------------------- CLI helper


def _read_series(src: Path) -> tuple[list[SeriesInfo], int]:
    """The series under ``src`` (via :func:`pipelines.imaging.discovery.discover`) and
    the number of files it rejected."""
    from pipelines.imaging.discovery import discover

    found = discover(src)
    infos = [series_info([inst.dataset for inst in instances])
             for instances in found.series.values()]
    return infos, len(found.rejected)


def main_series(src: Path, rules_path: Path | None) -> int:
    """``clinfuse series SRC``: list the series under SRC and the rules each matches.

    Returns
    -------
    int
        0 when at least one series was found, 1 when none was, 2 on bad rules.
    """
    rules: dict[str, Rule] = {}
    if rules_path is not None:
        try:
            rules = load_rules(rules_path)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"error: {e}\n")
            return 2
    try:
        infos, n_rejected = _read_series(Path(src))
    except ImageError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    if not infos:
        skipped = f" ({n_rejected} file(s) skipped: not DICOM images)" if n_rejected else ""
        sys.stderr.write(f"error: no DICOM series found under {src}{skipped}\n")
        return 1
    if n_rejected:
        sys.stderr.write(f"{n_rejected} file(s) skipped (not DICOM images)\n")
    header = ("SeriesInstanceUID", "Modality", "BodyPart", "Plane", "Thick", "Slices", "Rules")
    rows = [header]
    for info in sorted(infos, key=lambda i: (i.Modality or "", i.SeriesInstanceUID)):
        rows.append((
            info.SeriesInstanceUID,
            info.Modality or "-",
            info.BodyPartExamined or "-",
            info.plane.value if info.plane else "-",
            f"{info.SliceThickness:g}" if info.SliceThickness is not None else "-",
            str(info.n_slices),
            ",".join(matching_rules(info, rules)) or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                         .rstrip() + "\n")
    return 0
