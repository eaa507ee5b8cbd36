"""Calibrated-logit attributions -> percentage points of risk, for display.

Attributions are computed and add up on the calibrated logit. A clinician reads
risk, so each is shown as its share of the change in risk from the baseline:
``points_i = 100 * value_i * (p - p0) / (logit - logit0)``. The points then add
up to the change in risk in points, and keep each attribution's sign and rank.
When the logit barely moves the ratio is replaced by its limit, the slope
``p (1 - p)`` of the sigmoid.
"""

from __future__ import annotations

import numpy as np

__all__ = ["format_points", "sigmoid", "to_points"]


def sigmoid(z: float | np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=float))))


def to_points(values: np.ndarray, logit: float, baseline_logit: float) -> np.ndarray:
    """Logit attributions -> percentage points of risk (sum = 100 (p - p0))."""
    values = np.asarray(values, dtype=float)
    delta = logit - baseline_logit
    p, p0 = float(sigmoid(logit)), float(sigmoid(baseline_logit))
    slope = (p - p0) / delta if abs(delta) > 1e-9 else p * (1.0 - p)
    return 100.0 * values * slope


def format_points(points: float) -> str:
    """``+8 points`` / ``-0.4 points``: one decimal below 1 point, whole points above."""
    text = f"{points:+.1f}" if abs(points) < 1 else f"{points:+.0f}"
    return f"{text} points"
