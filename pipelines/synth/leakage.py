"""Leakage checks: the image signal comes from the pixels, and no text names the outcome."""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
from sklearn.metrics import roc_auc_score

from pipelines.synth.codes import OUTCOME_TERMS

__all__ = ["auroc", "outcome_terms", "shuffled_auroc"]

_PATTERN = re.compile("|".join(re.escape(t) for t in OUTCOME_TERMS), re.IGNORECASE)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC, or NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.size == 0 or np.unique(labels).size < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def shuffled_auroc(labels: np.ndarray, scores: np.ndarray, rng: np.random.Generator,
                   repeats: int = 20) -> float:
    """Mean AUROC after permuting the scores (images) across patients."""
    return float(np.mean([auroc(labels, rng.permutation(scores)) for _ in range(repeats)]))


def outcome_terms(texts: Iterable[str]) -> list[str]:
    """The outcome words found in ``texts`` (case-insensitive substrings)."""
    found: list[str] = []
    for text in texts:
        found.extend(m.group(0) for m in _PATTERN.finditer(text))
    return found
