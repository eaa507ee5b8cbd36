"""Analysis scales of numeric features: ln for right-skewed labs, ln(100 - x) for saturations.

Lactate, creatinine or leukocytes vary multiplicatively (a rise from 1 to 2 mmol/L
means as much as one from 2 to 4), and an SpO2 falling from 98 to 96 % means as
much as one from 96 to 92 %: their averages and slopes are taken on these scales.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = ["DEFICIT_FLOOR", "LOG_FLOOR", "SCALES", "Scale", "from_scale", "to_scale"]

Scale = Literal["linear", "log", "log_deficit"]
SCALES: tuple[str, ...] = ("linear", "log", "log_deficit")
#: Floors before the logarithm: a lab reported as 0, or an SpO2 of 100 %, stays finite.
#: 0.5 % is below a pulse oximeter's accuracy, so deficits under it are not told apart.
LOG_FLOOR = 1e-3
DEFICIT_FLOOR = 0.5


def to_scale(values: Any, scale: str) -> np.ndarray:
    """Values in their unit -> the analysis scale, floored before the logarithm."""
    v = np.asarray(values, dtype=float)
    if scale == "log":
        return np.log(np.maximum(v, LOG_FLOOR))
    if scale == "log_deficit":
        return np.log(np.maximum(100.0 - v, DEFICIT_FLOOR))
    if scale == "linear":
        return v
    raise ValueError(f"unknown scale {scale!r}; choose from {list(SCALES)}")


def from_scale(values: Any, scale: str) -> np.ndarray:
    """The analysis scale -> values in their unit (a mean of logs -> a geometric mean)."""
    v = np.asarray(values, dtype=float)
    if scale == "log":
        return np.exp(v)
    if scale == "log_deficit":
        return 100.0 - np.exp(v)
    if scale == "linear":
        return v
    raise ValueError(f"unknown scale {scale!r}; choose from {list(SCALES)}")
