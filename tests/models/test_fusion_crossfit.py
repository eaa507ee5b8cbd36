"""The small-cohort fusion head (models.fusion_crossfit): L2 by grouped K-fold CV with
the one-SE rule, calibration on out-of-fold logits. Pure NumPy/torch inputs, seconds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.fusion import FusionRiskModel
from models.fusion_crossfit import crossfit_head, describe_crossfit

GRID = [0.003, 0.03, 0.3]


def _make(l2: float) -> FusionRiskModel:
    return FusionRiskModel(modalities=("ehr", "note"), l2=[l2], modality_dropout=0.15,
                           device="cpu", calibration="platt-pattern")


def _data(n: int, signal: float, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                        np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ehr, note = rng.normal(size=(n, 5)), rng.normal(size=(n, 20))
    z = signal * (ehr[:, 0] + note[:, 0]) - 2.0
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    mask = np.column_stack([np.ones(n, bool), rng.random(n) < 0.7])
    return ({"ehr": ehr.astype(np.float32), "note": note.astype(np.float32)}, y, mask,
            np.array([f"P{i // 2}" for i in range(n)]))


def test_noise_gets_the_strongest_penalty_and_signal_is_kept() -> None:
    X, y, mask, groups = _data(160, 0.0, seed=1)
    cf = crossfit_head(_make, X, y, mask, groups, l2_grid=GRID, folds=5, random_state=0)
    # Pure noise: no L2 is ahead of the strongest beyond one SE, so the strongest ships.
    assert cf.l2 == max(GRID) and cf.record["chosen_l2"] == max(GRID)
    assert [r["l2"] for r in cf.record["grid"]] == GRID and cf.record["folds"] == 5
    assert cf.logit.shape == (160,) and cf.contrib.shape == (160, 2)
    np.testing.assert_array_equal(cf.present, mask)
    X, y, mask, groups = _data(240, 1.5, seed=2)
    cf = crossfit_head(_make, X, y, mask, groups, l2_grid=GRID, folds=5, random_state=0)
    # Every row is scored by a head that never saw its patient, and the signal shows.
    assert roc_auc_score(y, cf.logit) > 0.7
    assert cf.record["out_of_fold_auroc"] == pytest.approx(roc_auc_score(y, cf.logit))
    assert "one-standard-error" in describe_crossfit(cf.record)
    assert "validation split" in describe_crossfit(None)


def test_calibrating_on_scores_is_calibrating_on_rows() -> None:
    X, y, mask, _ = _data(200, 1.0, seed=3)
    head = _make(0.03).fit(X, y, mask, X_val=X, y_val=y, mask_val=mask)
    a = head.calibrate(X, y, mask).calibrator_.to_dict()  # type: ignore[union-attr]
    logit, contrib, present = head._forward(X, mask, "cpu")
    bias = np.full(len(y), float(head.net_.bias.detach()[0]))
    b = head.calibrate_scores(logit, contrib, present, y, bias=bias
                              ).calibrator_.to_dict()  # type: ignore[union-attr]
    assert a == b


def test_too_few_events_is_a_clear_error() -> None:
    X, y, mask, groups = _data(40, 0.0, seed=4)
    y = np.zeros_like(y)
    y[0] = 1
    with pytest.raises(ValueError, match="too few patients of a class"):
        crossfit_head(_make, X, y, mask, groups, l2_grid=GRID)
