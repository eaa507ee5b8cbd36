"""Exact Shapley values over modalities, through the fusion model's availability mask.

The players are the modalities present for one example; a coalition ``S`` is
scored by the model's *calibrated* logit with only ``S`` unmasked, so the empty
coalition is the calibrated bias (the model at its base rate). With ``k <= 3``
modalities there are at most 8 coalitions, all scored in one batched call.

Values add up: ``sum(values) == logit(all present) - logit(none)`` exactly (up to
float rounding), because the Shapley weights sum each marginal telescopically.

Examples
--------
>>> v = {(): 0.0, (0,): 1.0, (1,): 2.0, (0, 1): 4.0}
>>> shapley_from_values(2, lambda s: v[tuple(sorted(s))]).tolist()
[1.5, 2.5]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ModalityShapley", "modality_shapley", "shapley_by_orderings", "shapley_from_values"]


def _subsets(k: int) -> list[tuple[int, ...]]:
    return [s for r in range(k + 1) for s in itertools.combinations(range(k), r)]


def shapley_from_values(k: int, value: Callable[[frozenset[int]], float]) -> np.ndarray:
    """Exact Shapley values of ``k`` players from a coalition value function (2^k calls)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    v = {frozenset(s): float(value(frozenset(s))) for s in _subsets(k)}
    out = np.zeros(k)
    for i in range(k):
        for s in _subsets(k):
            if i in s:
                continue
            weight = math.factorial(len(s)) * math.factorial(k - len(s) - 1) / math.factorial(k)
            out[i] += weight * (v[frozenset(s) | {i}] - v[frozenset(s)])
    return out


def shapley_by_orderings(k: int, value: Callable[[frozenset[int]], float]) -> np.ndarray:
    """Reference: mean marginal contribution over all ``k!`` orderings (tests only)."""
    out = np.zeros(k)
    orders = list(itertools.permutations(range(k)))
    for order in orders:
        seen: frozenset[int] = frozenset()
        for i in order:
            out[i] += value(seen | {i}) - value(seen)
            seen = seen | {i}
    return out / max(len(orders), 1)


@dataclass(frozen=True)
class ModalityShapley:
    """Shapley values of the present modalities for one example, on the calibrated logit.

    Attributes
    ----------
    modalities : tuple of str
        The players (present modalities), in model order.
    values : ndarray (k,)
        Calibrated-logit Shapley value of each.
    baseline_logit : float
        Calibrated logit with every modality masked (the empty coalition).
    logit : float
        Calibrated logit with all present modalities.
    coalition_logits : dict
        ``frozenset(modality names) -> calibrated logit`` for every coalition.
    """

    modalities: tuple[str, ...]
    values: np.ndarray
    baseline_logit: float
    logit: float
    coalition_logits: dict[frozenset[str], float]

    @property
    def additivity_error(self) -> float:
        """``|sum(values) - (logit - baseline_logit)|``."""
        return abs(float(self.values.sum()) - (self.logit - self.baseline_logit))


def modality_shapley(model: object, X: Mapping[str, np.ndarray], present: Sequence[bool],
                     *, reference: bool = False) -> ModalityShapley:
    """Exact modality Shapley values for one example of a fitted ``FusionRiskModel``.

    Parameters
    ----------
    model : FusionRiskModel
        Anything with ``modalities_`` and ``predict_logit(X, mask, calibrated=True)``.
    X : mapping modality -> array (1, d_m)
        One example's inputs (absent modalities may be omitted).
    present : sequence of bool, length ``len(model.modalities_)``
        Which modalities the example has; only those are players.
    reference : bool, default False
        Use the brute-force average over orderings instead of the subset formula.
    """
    mods: tuple[str, ...] = tuple(model.modalities_)  # type: ignore[attr-defined]
    present_arr = np.asarray(present, dtype=bool)
    if present_arr.shape != (len(mods),):
        raise ValueError(f"present must have {len(mods)} entries for modalities {list(mods)}, "
                         f"got shape {present_arr.shape}")
    players = [j for j in range(len(mods)) if present_arr[j]]
    k = len(players)
    subsets = _subsets(k)
    masks = np.zeros((len(subsets), len(mods)), dtype=bool)
    for row, s in enumerate(subsets):
        masks[row, [players[i] for i in s]] = True
    # One batched forward over all 2^k coalitions: same rows, different masks.
    Xb = {m: np.repeat(np.asarray(v)[:1], len(subsets), axis=0) for m, v in X.items()
          if m in mods}
    logits = model.predict_logit(Xb, masks, calibrated=True)  # type: ignore[attr-defined]
    table = {frozenset(s): float(lo) for s, lo in zip(subsets, logits, strict=True)}
    fn = shapley_by_orderings if reference else shapley_from_values
    values = fn(k, lambda s: table[frozenset(s)])
    names = tuple(mods[j] for j in players)
    return ModalityShapley(
        modalities=names, values=values, baseline_logit=table[frozenset()],
        logit=table[frozenset(range(k))],
        coalition_logits={frozenset(names[i] for i in s): v for s, v in table.items()})
