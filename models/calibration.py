"""Post-hoc calibration of risk logits: temperature scaling (default) or isotonic.

Both are scikit-learn style estimators fitted on a validation split's logits and
labels, and both serialise to plain dicts (``to_dict``/``calibrator_from_dict``)
for the artifact.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> z = rng.normal(size=2000); y = (rng.random(2000) < 1 / (1 + np.exp(-z))).astype(int)
>>> cal = TemperatureScaling().fit(3 * z, y)
>>> round(cal.temperature_, 1)
3.0
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.utils.validation import check_is_fitted

__all__ = ["METHODS", "IsotonicCalibration", "TemperatureScaling", "calibrator_from_dict",
           "make_calibrator"]

METHODS = ("temperature", "isotonic")
_INVALID_METHOD = "Unrecognised calibration method: {0!r}; choose from {1}"


def _check(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=float).ravel()
    t = np.asarray(y, dtype=float).ravel()
    if len(z) != len(t):
        raise ValueError(f"{len(z)} logits but {len(t)} labels")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    if len(np.unique(t)) < 2:
        raise ValueError("calibration needs both classes in the calibration split")
    return z, t


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class TemperatureScaling(BaseEstimator):
    """``p = sigmoid(z / T + b)``; T (and optionally b) minimise validation log loss.

    Parameters
    ----------
    fit_bias : bool, default=False
        Also refit the intercept (Platt scaling with a shared slope); off by
        default because a pure temperature keeps the ranking and the base rate
        the model learned on the larger training split.

    Attributes
    ----------
    temperature_ : float
    bias_ : float
    """

    def __init__(self, *, fit_bias: bool = False) -> None:
        self.fit_bias = fit_bias

    def fit(self, logits: np.ndarray, y: np.ndarray) -> TemperatureScaling:
        z, t = _check(logits, y)

        def nll(log_t: float, b: float) -> float:
            s = z / np.exp(log_t) + b
            return float(np.mean(np.logaddexp(0.0, s) - t * s))

        bias = 0.0
        log_t = float(minimize_scalar(nll, bounds=(-4.0, 4.0), args=(bias,),
                                      method="bounded").x)
        if self.fit_bias:
            for _ in range(3):  # coordinate descent: two 1-D convex problems
                bias = float(minimize_scalar(lambda b, lt: nll(lt, b), bounds=(-5.0, 5.0),
                                             args=(log_t,), method="bounded").x)
                log_t = float(minimize_scalar(nll, bounds=(-4.0, 4.0), args=(bias,),
                                              method="bounded").x)
        self.temperature_ = float(np.exp(log_t))
        self.bias_ = bias
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated logits."""
        check_is_fitted(self, "temperature_")
        return np.asarray(logits, dtype=float) / self.temperature_ + self.bias_

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated P(event), shape (n,)."""
        return _sigmoid(self.transform(logits))

    def to_dict(self) -> dict[str, Any]:
        check_is_fitted(self, "temperature_")
        return {"method": "temperature", "fit_bias": self.fit_bias,
                "temperature": self.temperature_, "bias": self.bias_}


class IsotonicCalibration(BaseEstimator):
    """Monotone step map from logit to probability (``IsotonicRegression``), clipped.

    Parameters
    ----------
    eps : float, default=1e-4
        Probabilities are kept in ``[eps, 1 - eps]`` so log loss stays finite.

    Attributes
    ----------
    x_thresholds_, y_thresholds_ : ndarray
    """

    def __init__(self, *, eps: float = 1e-4) -> None:
        self.eps = eps

    def fit(self, logits: np.ndarray, y: np.ndarray) -> IsotonicCalibration:
        z, t = _check(logits, y)
        iso = IsotonicRegression(out_of_bounds="clip", y_min=self.eps, y_max=1 - self.eps)
        iso.fit(z, t)
        self.x_thresholds_ = np.asarray(iso.X_thresholds_, dtype=float)
        self.y_thresholds_ = np.asarray(iso.y_thresholds_, dtype=float)
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "x_thresholds_")
        return np.interp(np.asarray(logits, dtype=float), self.x_thresholds_,
                         self.y_thresholds_)

    def transform(self, logits: np.ndarray) -> np.ndarray:
        p = self.predict_proba(logits)
        return np.log(p) - np.log1p(-p)

    def to_dict(self) -> dict[str, Any]:
        check_is_fitted(self, "x_thresholds_")
        return {"method": "isotonic", "eps": self.eps,
                "x_thresholds": self.x_thresholds_.tolist(),
                "y_thresholds": self.y_thresholds_.tolist()}


Calibrator = TemperatureScaling | IsotonicCalibration


def make_calibrator(method: Literal["temperature", "isotonic"] | str) -> Calibrator:
    """An unfitted calibrator by name."""
    if method == "temperature":
        return TemperatureScaling()
    if method == "isotonic":
        return IsotonicCalibration()
    raise ValueError(_INVALID_METHOD.format(method, list(METHODS)))


def calibrator_from_dict(data: dict[str, Any]) -> Calibrator:
    """Inverse of ``to_dict``."""
    method = data.get("method")
    if method == "temperature":
        t = TemperatureScaling(fit_bias=bool(data.get("fit_bias", False)))
        t.temperature_ = float(data["temperature"])
        t.bias_ = float(data.get("bias", 0.0))
        return t
    if method == "isotonic":
        iso = IsotonicCalibration(eps=float(data.get("eps", 1e-4)))
        iso.x_thresholds_ = np.asarray(data["x_thresholds"], dtype=float)
        iso.y_thresholds_ = np.asarray(data["y_thresholds"], dtype=float)
        return iso
    raise ValueError(_INVALID_METHOD.format(method, list(METHODS)))
