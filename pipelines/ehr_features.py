"""EHR feature builder: PatientRecords viewed as of their index time -> feature table.

Observations are converted to the spec unit; the same (time, value) reported more
than once counts once.

Definitions, for each feature and look-back window ``W`` (hours), over the
observations with ``index - W < effective <= index``, converted to the spec unit:

- ``last``, ``min``, ``max``, ``mean`` of the values;
- ``trend``: least-squares slope of value against time in days (NaN under two
  distinct times);
- course statistics over ``index - C < effective <= index`` (``C`` = ``course_hours``),
  on the feature's scale (``models.scales.to_scale``): ``mean``, ``trend``
  (slope per day as above) and ``count`` (0 when there is none);
- ``hours_since_last``: hours from the latest observation at or before the index;
- ``missing``: 1.0 when the spec's longest look-back (window or course) holds no
  observation, else 0.0 (these two only when ``spec.recency``);
- ``age_years``: days from birth to the index date / 365.25.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from fhir_adapters.errors import Issue, UnitError
from fhir_adapters.record import PatientRecord
from fhir_adapters.units import convert
from models.scales import to_scale
from pipelines.feature_spec import DEFAULT_SPEC, FeatureSpec

__all__ = ["EHRFeatureBuilder", "record_features"]


def _series(record: PatientRecord, spec: FeatureSpec
            ) -> dict[str, list[tuple[datetime, float]]]:
    """Numeric observations per feature, converted to the feature's unit, sorted by time."""
    by_code = spec.by_loinc()
    out: dict[str, list[tuple[datetime, float]]] = {f.name: [] for f in spec.features}
    for obs in record.observations:
        feat = by_code.get(obs.code or "")
        if feat is None or obs.effective is None:
            continue
        if isinstance(obs.value, bool) or not isinstance(obs.value, int | float):
            continue
        value = float(obs.value)
        if not math.isfinite(value):
            continue
        if obs.unit is None:
            raise UnitError(Issue("required", f"no unit on a {feat.display} value ({feat.code}); "
                                  f"expected {feat.unit!r}", obs.source))
        value = convert(value, obs.unit, feat.unit, molar_mass=feat.molar_mass,
                        valence=feat.valence, where=obs.source)
        out[feat.name].append((obs.effective, value))
    # One measurement reported twice (over HL7 v2 and as a FHIR Observation, or resent)
    # is one measurement: it must not double a count or weigh twice in a mean.
    return {name: _distinct(values) for name, values in out.items()}


def _distinct(points: list[tuple[datetime, float]]) -> list[tuple[datetime, float]]:
    """Sorted by time, each (time, value) once (values equal to 1e-9 after conversion)."""
    first: dict[tuple[datetime, float], tuple[datetime, float]] = {}
    for t, v in sorted(points):
        first.setdefault((t, round(v, 9)), (t, v))
    return list(first.values())


def _window_stats(points: list[tuple[datetime, float]], index: datetime,
                  window_hours: float, statistics: Sequence[str], scale: str = "linear"
                  ) -> list[float]:
    """Statistics of the values (on ``scale``) within ``window_hours`` before the index."""
    inside = [(t, v) for t, v in points
              if 0.0 <= (index - t).total_seconds() / 3600.0 < window_hours]
    if not inside:
        return [0.0 if s == "count" else math.nan for s in statistics]
    values = to_scale([v for _, v in inside], scale)
    days = np.array([(t - index).total_seconds() / 86400.0 for t, _ in inside])
    stats = {
        "last": float(values[-1]),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "trend": _slope(days, values),
        "count": float(len(inside)),
    }
    return [stats[s] for s in statistics]


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    if np.unique(x).size < 2:
        return math.nan
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


def record_features(record: PatientRecord, spec: FeatureSpec = DEFAULT_SPEC) -> list[float]:
    """One row of features for a record that is already an as-of view."""
    if record.index_time is None:
        raise ValueError(
            f"record {record.resource_id!r} has no index time; view it with record.as_of(t) "
            "so that nothing after the index time reaches the features"
        )
    index = record.index_time
    row: list[float] = []
    if spec.include_age:
        age = record.demographics.age_at(index)
        row.append(math.nan if age is None else age)
    series = _series(record, spec)
    longest = spec.lookback_hours
    for feat in spec.features:
        points = series[feat.name]
        for window in spec.windows_hours:
            row.extend(_window_stats(points, index, window, spec.statistics))
        if spec.course_hours is not None:
            row.extend(_window_stats(points, index, spec.course_hours,
                                     spec.course_statistics, feat.scale))
        if spec.recency:
            row.append(_hours_since_last(points, index))
            row.append(_missing(points, index, longest))
    return row


def _hours_since_last(points: list[tuple[datetime, float]], index: datetime) -> float:
    past = [t for t, _ in points if t <= index]
    return (index - max(past)).total_seconds() / 3600.0 if past else math.nan


def _missing(points: list[tuple[datetime, float]], index: datetime, longest: float) -> float:
    seen = any(0.0 <= (index - t).total_seconds() / 3600.0 < longest for t, _ in points)
    return 0.0 if seen else 1.0


class EHRFeatureBuilder(TransformerMixin, BaseEstimator):
    """Build the EHR feature table from PatientRecords viewed as of their index time.

    Parameters
    ----------
    spec : FeatureSpec, default=DEFAULT_SPEC
        Features (keyed by LOINC), units, windows and statistics.
    impute : bool, default=False
        Fill missing values with the medians learned in ``fit``. Missing
        indicators are kept either way.

    Attributes
    ----------
    feature_names_out_ : list of str
        Columns of the table ``transform`` returns.
    medians_ : pandas.Series
        Per-column medians of the training table; learned only in ``fit``.
    """

    def __init__(self, *, spec: FeatureSpec = DEFAULT_SPEC, impute: bool = False) -> None:
        self.spec = spec
        self.impute = impute

    def fit(self, X: Sequence[PatientRecord], y: object = None) -> EHRFeatureBuilder:
        if not isinstance(self.spec, FeatureSpec):
            raise TypeError(f"spec must be a FeatureSpec, got {type(self.spec).__name__}")
        table = self._table(X)
        self.feature_names_out_ = list(table.columns)
        self.medians_ = table.median(numeric_only=True)
        self.n_records_fit_ = len(table)
        return self

    def transform(self, X: Sequence[PatientRecord]) -> pd.DataFrame:
        check_is_fitted(self)
        table = self._table(X)
        if self.impute:
            table = table.fillna(self.medians_)
        return table

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self)
        return np.asarray(self.feature_names_out_, dtype=object)

    def _table(self, records: Sequence[PatientRecord]) -> pd.DataFrame:
        rows = [record_features(r, self.spec) for r in records]
        return pd.DataFrame(rows, columns=self.spec.column_names(), dtype=float)

