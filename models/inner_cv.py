"""What every inner-CV choice of clinfuse shares: the split, the score, the noise.

The EHR learner (:mod:`models.tabular_learner`), the notes learner
(:mod:`models.note_learner`, :mod:`models.note_scorer`) and the fusion
simplification (:mod:`models.fusion_simplify`) all choose between candidates by
patient-grouped inner cross-validation, score them by the log-loss of their logit,
and let a challenger win only by more than one patient-clustered standard error of
the paired per-row difference. These three pieces are here, once.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

__all__ = ["clustered_se", "inner_split", "log_loss_rows"]


def log_loss_rows(y: np.ndarray, logit: np.ndarray) -> np.ndarray:
    """Per-row log-loss of a logit (numerically stable)."""
    z = np.asarray(logit, dtype=float)
    return np.logaddexp(0.0, z) - np.asarray(y, dtype=float) * z


def clustered_se(diff: np.ndarray, groups: np.ndarray) -> float:
    """Standard error of ``diff.mean()`` with rows clustered by patient (``groups``);
    infinite with fewer than two patients."""
    _, inv = np.unique(groups, return_inverse=True)
    by_patient = np.bincount(inv, weights=diff)
    if len(by_patient) < 2:
        return float("inf")
    return float(np.sqrt(len(by_patient)) * by_patient.std(ddof=1)) / len(diff)


def inner_split(y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A patient-grouped, label-stratified ~80/20 split (fit, stop) of some rows.

    With under two patients of a class there is no such split: every row is then
    both fitted and used to stop (a degenerate, tiny-cohort case), rather than
    leaving the fit part with one class.
    """
    k = min(5, *(len(set(groups[y == c])) for c in (0, 1)))
    if k < 2:
        every = np.arange(len(y))
        return every, every
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fit, stop = next(splitter.split(np.zeros(len(y)), y, groups))
    return fit, stop
