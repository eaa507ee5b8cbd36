"""The spec feature row of a synthetic patient, computed from the generated numbers.

This is an independent implementation of the definitions in
``pipelines.ehr_features`` (it does not call the builder or a FHIR reader), so
that the test comparing the manifest with the builder's output on the written
Bundles checks both. For each feature and window ``W`` hours, over measurements
with ``index - W < t <= index`` in the spec unit: last, min, max, mean, trend
(OLS slope per day, NaN under two distinct times); then hours since the latest
measurement at or before the index, and a missing flag over the longest look-back
(window or course), when the spec asks for them.
Course statistics over ``index - C < t <= index``: mean and trend of the values
on the feature's scale (ln, or ln(100 - value) for ``log_deficit``, after the
spec's floors), and their count.
"""

from __future__ import annotations

import math

import numpy as np

from models.scales import DEFICIT_FLOOR, LOG_FLOOR
from pipelines.feature_spec import FeatureSpec
from pipelines.synth.patient import PatientSim

__all__ = ["feature_row"]


def feature_row(patient: PatientSim, spec: FeatureSpec) -> list[float]:
    """Values for ``spec.column_names()``, in order, as of the patient's index time."""
    row: list[float] = []
    if spec.include_age:
        row.append(patient.age_years)
    by_feature: dict[str, list[tuple[int, float]]] = {f.name: [] for f in spec.features}
    for obs in patient.observations:
        if obs.offset_s <= 0 and obs.feature in by_feature:
            by_feature[obs.feature].append((obs.offset_s, obs.spec_value))
    longest = spec.lookback_hours
    for feat in spec.features:
        points = sorted(set(by_feature[feat.name]))
        seconds = np.array([s for s, _ in points], dtype=float)
        values = np.array([v for _, v in points], dtype=float)
        for window in spec.windows_hours:
            inside = -seconds / 3600.0 < window
            row.extend(_stats(seconds[inside], values[inside], spec.statistics))
        if spec.course_hours is not None:
            inside = -seconds / 3600.0 < spec.course_hours
            row.extend(_stats(seconds[inside], _scaled(values[inside], feat.scale),
                              spec.course_statistics))
        if spec.recency:
            row.append(-seconds[-1] / 3600.0 if len(points) else math.nan)
            row.append(0.0 if (-seconds / 3600.0 < longest).any() else 1.0)
    return row


def _stats(seconds: np.ndarray, values: np.ndarray, statistics: tuple[str, ...]) -> list[float]:
    if values.size == 0:
        return [0.0 if s == "count" else math.nan for s in statistics]
    days = seconds / 86400.0
    if np.unique(days).size < 2:
        slope = math.nan
    else:
        dx = days - days.mean()
        slope = float((dx * (values - values.mean())).sum() / (dx * dx).sum())
    stats = {"last": float(values[-1]), "min": float(values.min()), "max": float(values.max()),
             "mean": float(values.mean()), "trend": slope, "count": float(values.size)}
    return [stats[s] for s in statistics]


def _scaled(values: np.ndarray, scale: str) -> np.ndarray:
    """Written apart from ``models.scales.to_scale`` so the manifest test checks both."""
    if scale == "log":
        return np.log(values.clip(min=LOG_FLOOR))
    if scale == "log_deficit":
        return np.log((100.0 - values).clip(min=DEFICIT_FLOOR))
    return values

