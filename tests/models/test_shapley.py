"""Modality Shapley values: subset formula = brute force over orderings, and additivity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.fusion import FusionRiskModel
from models.shapley import modality_shapley, shapley_by_orderings, shapley_from_values
from tests.models.explain_fakes import small_fusion


@pytest.fixture(scope="module")
def fitted() -> tuple[FusionRiskModel, dict[str, np.ndarray], np.ndarray]:
    return small_fusion(hidden=8)


def test_subset_formula_equals_orderings_on_random_games() -> None:
    rng = np.random.default_rng(0)
    for k in range(0, 5):
        table = {frozenset(s): float(rng.normal()) for r in range(k + 1)
                 for s in itertools.combinations(range(k), r)}
        def value(s: frozenset[int], table: dict[frozenset[int], float] = table) -> float:
            return table[frozenset(s)]

        a = shapley_from_values(k, value)
        b = shapley_by_orderings(k, value)
        np.testing.assert_allclose(a, b, atol=1e-12)
        if k:
            assert abs(a.sum() - (table[frozenset(range(k))] - table[frozenset()])) < 1e-12


def test_modality_values_match_reference_and_add_up(
        fitted: tuple[FusionRiskModel, dict[str, np.ndarray], np.ndarray]) -> None:
    model, X, mask = fitted
    for i in range(25):  # includes rows with 1, 2 and 3 modalities present
        row = {m: v[i:i + 1] for m, v in X.items()}
        exact = modality_shapley(model, row, mask[i])
        ref = modality_shapley(model, row, mask[i], reference=True)
        np.testing.assert_allclose(exact.values, ref.values, atol=1e-10)
        assert exact.additivity_error < 1e-5
        full = model.predict_logit(row, mask[i:i + 1], calibrated=True)[0]
        none = model.predict_logit(row, np.zeros((1, 3), bool), calibrated=True)[0]
        assert abs(exact.logit - full) < 1e-6 and abs(exact.baseline_logit - none) < 1e-6
        assert exact.modalities == tuple(m for m, p in zip(model.modalities_, mask[i],
                                                          strict=True) if p)


def test_deletion_top_modality_moves_risk_more_than_random(
        fitted: tuple[FusionRiskModel, dict[str, np.ndarray], np.ndarray]) -> None:
    """Masking the top-|Shapley| modality changes the risk more than a random present one."""
    model, X, mask = fitted
    rng = np.random.default_rng(1)
    top_moves, random_moves = [], []
    rows = [i for i in range(len(mask)) if mask[i].sum() >= 2][:120]
    for i in rows:
        row = {m: v[i:i + 1] for m, v in X.items()}
        sh = modality_shapley(model, row, mask[i])
        p = model.predict_proba(row, mask[i:i + 1])[0, 1]

        def moved(name: str, i: int = i, row: dict[str, np.ndarray] = row,
                  p: float = p) -> float:
            m2 = mask[i:i + 1].copy()
            m2[0, model.modalities_.index(name)] = False
            return abs(float(model.predict_proba(row, m2)[0, 1]) - float(p))

        top_moves.append(moved(sh.modalities[int(np.argmax(np.abs(sh.values)))]))
        random_moves.append(moved(sh.modalities[int(rng.integers(len(sh.modalities)))]))
    assert np.mean(top_moves) > 1.2 * np.mean(random_moves), (np.mean(top_moves),
                                                              np.mean(random_moves))


def test_bad_present_length_is_refused(
        fitted: tuple[FusionRiskModel, dict[str, np.ndarray], np.ndarray]) -> None:
    model, X, _ = fitted
    with pytest.raises(ValueError, match="present must have 3"):
        modality_shapley(model, {m: v[:1] for m, v in X.items()}, [True, False])
