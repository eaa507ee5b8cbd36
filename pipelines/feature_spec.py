"""The EHR feature spec: which observations become features, in which unit.

Keyed by LOINC. Each feature has one unit; observations in a commensurable unit
are converted to it and incommensurable ones are an error.

Two families of columns per feature: window statistics of the values in the
spec unit over short look-backs (e.g. 24 h, 72 h), which a clinician reads as
they are, and *course* statistics over the admission so far (120 h), on the
feature's analysis scale (``LabFeature.scale``): right-skewed labs such as
lactate and creatinine vary multiplicatively, so their course mean is the mean
of the logarithm and their course trend the change of the logarithm per day.
Once a stay passes three days the short windows miss the admission draw, for
some patients the only value of a lab.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.scales import SCALES, Scale

__all__ = ["COURSE_STATISTICS", "DEFAULT_SPEC", "STATISTICS", "FeatureSpec", "LabFeature",
           "course_column", "window_column"]

#: Window statistics, in column order.
STATISTICS: tuple[str, ...] = ("last", "min", "max", "mean", "trend")
#: Course statistics (on the feature's scale), in column order.
COURSE_STATISTICS: tuple[str, ...] = ("mean", "trend", "count")


@dataclass(frozen=True)
class LabFeature:
    """One observation type, as a family of columns."""

    name: str
    loinc: tuple[str, ...]  # accepted codes; the first is canonical
    unit: str  # UCUM unit every value is converted to
    display: str
    reference_low: float | None = None
    reference_high: float | None = None
    molar_mass: float | None = None  # g/mol, for mass <-> substance concentration
    valence: int | None = None  # for mEq/L <-> mmol/L
    scale: Scale = "linear"  # analysis scale of the course statistics

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"feature {self.name!r}: unknown scale {self.scale!r}; "
                             f"choose from {list(SCALES)}")

    @property
    def code(self) -> str:
        return self.loinc[0]


@dataclass(frozen=True)
class FeatureSpec:
    """Features, windows and statistics for the EHR feature builder."""

    features: tuple[LabFeature, ...]
    windows_hours: tuple[float, ...] = (24.0, 72.0)
    statistics: tuple[str, ...] = STATISTICS
    include_age: bool = True
    version: str = "1"
    extra: dict[str, Any] = field(default_factory=dict)
    course_hours: float | None = None  # None: no course columns (version-1 specs)
    course_statistics: tuple[str, ...] = COURSE_STATISTICS
    recency: bool = True  # hours since last + "missing" (none within the longest look-back)

    def __post_init__(self) -> None:
        unknown = [s for s in self.statistics if s not in STATISTICS]
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; choose from {list(STATISTICS)}")
        unknown = [s for s in self.course_statistics if s not in COURSE_STATISTICS]
        if unknown:
            raise ValueError(f"unknown course statistics {unknown}; "
                             f"choose from {list(COURSE_STATISTICS)}")
        if any(not w > 0 for w in self.windows_hours):
            raise ValueError(f"windows_hours must be positive, got {list(self.windows_hours)}")
        if self.course_hours is not None and not self.course_hours > 0:
            raise ValueError(f"course_hours must be positive or null, got {self.course_hours}")
        if not self.windows_hours and self.course_hours is None:
            raise ValueError("a spec needs windows_hours or course_hours: nothing to compute")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        codes = [c for f in self.features for c in f.loinc]
        if len(set(codes)) != len(codes):
            raise ValueError("a LOINC code may belong to one feature only")

    @property
    def lookback_hours(self) -> float:
        """How far before the index time any column looks."""
        return max((*self.windows_hours, self.course_hours or 0.0))

    def by_loinc(self) -> dict[str, LabFeature]:
        return {code: f for f in self.features for code in f.loinc}

    def column_names(self) -> list[str]:
        """Feature table columns, in order."""
        return [name for _, name in self._columns()]

    def column_blocks(self) -> dict[str, list[str]]:
        """The columns of each statistic across features, e.g. every feature's course mean.

        Age is in no block. The fusion head reduces each block to a few principal
        directions (``pipelines.training``): one statistic of eleven vitals and labs
        mostly moves together with how ill the patient is, and a few directions are
        learned far more reliably from a small cohort than one weight per column.
        """
        blocks: dict[str, list[str]] = {}
        for block, name in self._columns():
            if block is not None:
                blocks.setdefault(block, []).append(name)
        return blocks

    def _columns(self) -> Iterator[tuple[str | None, str]]:
        """(statistic block or None, column name) for each column, in table order."""
        if self.include_age:
            yield None, "age_years"
        for feat in self.features:
            for window in self.windows_hours:
                for stat in self.statistics:
                    yield f"{stat} {window:g}h", window_column(feat.name, stat, window)
            if self.course_hours is not None:
                for stat in self.course_statistics:
                    yield (f"course {stat} {self.course_hours:g}h",
                           course_column(feat.name, stat, self.course_hours))
            if self.recency:
                yield "hours since last", f"{feat.name}_hours_since_last"
                yield "missing", f"{feat.name}_missing"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        feats = tuple(
            LabFeature(**{**f, "loinc": tuple(f["loinc"])}) for f in data["features"]
        )
        return cls(
            features=feats,
            windows_hours=tuple(float(w) for w in data.get("windows_hours", (24.0, 72.0))),
            statistics=tuple(data.get("statistics", STATISTICS)),
            include_age=bool(data.get("include_age", True)),
            version=str(data.get("version", "1")),
            extra=dict(data.get("extra", {})),
            # Absent in version-1 specs, whose models have no course columns.
            course_hours=(None if data.get("course_hours") is None
                          else float(data["course_hours"])),
            course_statistics=tuple(data.get("course_statistics", COURSE_STATISTICS)),
            recency=bool(data.get("recency", True)),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> FeatureSpec:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    def to_yaml(self, path: str | Path) -> None:
        data = self.to_dict()
        data["features"] = [{**f, "loinc": list(f["loinc"])} for f in data["features"]]
        data["windows_hours"] = list(data["windows_hours"])
        data["statistics"] = list(data["statistics"])
        data["course_statistics"] = list(data["course_statistics"])
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def window_column(feature: str, statistic: str, window_hours: float) -> str:
    """Column name for one statistic over one look-back window."""
    return f"{feature}_{statistic}_{window_hours:g}h"


def course_column(feature: str, statistic: str, course_hours: float) -> str:
    """Column name for one course statistic (on the feature's scale)."""
    return f"{feature}_course_{statistic}_{course_hours:g}h"


#: Vitals and labs used by deterioration scores (NEWS2, eCART), in common US units.
DEFAULT_SPEC = FeatureSpec(
    features=(
        LabFeature("heart_rate", ("8867-4",), "/min", "Heart rate", 60, 100),
        LabFeature("resp_rate", ("9279-1",), "/min", "Respiratory rate", 12, 20),
        LabFeature("sbp", ("8480-6",), "mm[Hg]", "Systolic blood pressure", 90, 140),
        LabFeature("temperature", ("8310-5",), "Cel", "Body temperature", 36.1, 37.8),
        LabFeature("spo2", ("59408-5", "2708-6"), "%", "Oxygen saturation", 94, 100,
                   scale="log_deficit"),
        LabFeature("lactate", ("2524-7", "32693-4"), "mmol/L", "Lactate", 0.5, 2.2,
                   molar_mass=90.08, scale="log"),
        LabFeature("wbc", ("6690-2",), "10*3/uL", "Leukocytes", 4.0, 11.0, scale="log"),
        LabFeature("creatinine", ("2160-0", "38483-4", "14682-9"), "mg/dL", "Creatinine", 0.6, 1.3,
                   molar_mass=113.12, scale="log"),
        LabFeature("glucose", ("2339-0", "2345-7", "15074-8", "14749-6"), "mg/dL", "Glucose",
                   70, 140, molar_mass=180.156, scale="log"),
        LabFeature("sodium", ("2951-2", "2947-0"), "mmol/L", "Sodium", 135, 145, valence=1),
        LabFeature("hemoglobin", ("718-7",), "g/dL", "Hemoglobin", 12.0, 17.5),
    ),
    # Version 2: the course statistics alone. On the synthetic cohort the 24 h/72 h
    # window statistics, hours-since-last and missing flags beside them lowered the
    # fused AUROC (0.830 -> 0.828 with either, 0.822 with all; docs/evaluation/README.md):
    # 2,000 patients estimate 34 columns better than 166. Sites that want the windows
    # set windows_hours/statistics/recency in their own spec.
    windows_hours=(),
    statistics=(),
    course_hours=120.0,
    recency=False,
    version="2",
)
