"""Tabular features -> model input: median imputation, missing indicators, scaling.

Fitted on the training split only; the learned statistics travel in the artifact
as tensors, so scoring never sees training rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

__all__ = ["TabularPreprocessor"]


class TabularPreprocessor(BaseEstimator):
    """Impute medians, append missing indicators, standardise and clip.

    Parameters
    ----------
    clip : float, default=5.0
        Scaled values are clipped to ``[-clip, clip]`` so that one wild lab value
        (a unit error upstream) cannot dominate the risk.

    Attributes
    ----------
    median_ : ndarray (n_features,)
    mean_, scale_ : ndarray (n_features,)
        Of the imputed training values; scale 1 for constant columns.
    indicator_ : ndarray of int
        Columns that get a missing indicator (those missing somewhere in training).
    n_features_in_ : int

    Examples
    --------
    >>> X = np.array([[1.0, np.nan], [3.0, 2.0], [5.0, 4.0]])
    >>> TabularPreprocessor().fit(X).transform(X).shape
    (3, 3)
    """

    def __init__(self, *, clip: float = 5.0) -> None:
        self.clip = clip

    def fit(self, X: np.ndarray, y: Any = None) -> TabularPreprocessor:
        X = _as_2d(X)
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip!r}")
        missing = np.isnan(X)
        # An all-missing column gets median 0 (and an indicator) instead of a NaN warning.
        safe = np.where(missing.all(axis=0)[None, :], 0.0, X)
        median = np.nanmedian(safe, axis=0) if len(X) else np.zeros(X.shape[1])
        filled = np.where(missing, median, X)
        scale = filled.std(axis=0)
        self.median_ = median
        self.mean_ = filled.mean(axis=0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        self.indicator_ = np.flatnonzero(missing.any(axis=0))
        self.n_features_in_ = X.shape[1]
        return self

    @property
    def n_features_out(self) -> int:
        check_is_fitted(self, "median_")
        return int(self.n_features_in_ + len(self.indicator_))

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "median_")
        X = _as_2d(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} tabular features, got {X.shape[1]}")
        missing = np.isnan(X)
        scaled = (np.where(missing, self.median_, X) - self.mean_) / self.scale_
        scaled = np.clip(scaled, -self.clip, self.clip)
        return np.hstack([scaled, missing[:, self.indicator_]]).astype(np.float32)

    def fit_transform(self, X: np.ndarray, y: Any = None) -> np.ndarray:
        return self.fit(X).transform(X)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        check_is_fitted(self, "median_")
        return {"median": torch.as_tensor(self.median_, dtype=torch.float64),
                "mean": torch.as_tensor(self.mean_, dtype=torch.float64),
                "scale": torch.as_tensor(self.scale_, dtype=torch.float64),
                "indicator": torch.as_tensor(self.indicator_, dtype=torch.int64),
                "clip": torch.tensor([float(self.clip)], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TabularPreprocessor:
        out = cls(clip=float(tensors["clip"][0]))
        out.median_ = tensors["median"].numpy().astype(float)
        out.mean_ = tensors["mean"].numpy().astype(float)
        out.scale_ = tensors["scale"].numpy().astype(float)
        out.indicator_ = tensors["indicator"].numpy().astype(int)
        out.n_features_in_ = len(out.median_)
        return out


def _as_2d(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"tabular input must be 2-D (rows, features), got shape {X.shape}")
    return X
