"""The EHR learner choice (issue 18): inner CV picks trees for a U-shape, linear for a line;
the trees survive safetensors bit for bit and match scikit-learn; TreeSHAP adds up."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from models.explain_trees import tree_shap_values
from models.tabular_learner import TabularLearner, TreeEnsemble, describe_choice


def _cohort(n: int, seed: int, shape: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two rows per patient; risk U-shaped in column 0, or linear in it; column 2 is noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    z = 1.8 * X[:, 0] ** 2 - 1.8 + 0.3 * X[:, 1] if shape == "u" else 1.2 * X[:, 0] + 0.3 * X[:, 1]
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return X, y, np.arange(n) // 2


def test_auto_picks_gbm_on_a_u_shape_and_beats_linear_on_fresh_rows() -> None:
    X, y, pid = _cohort(400, 0, "u")
    learner = TabularLearner(folds=3, random_state=0).fit(X, y, pid)
    rec = learner.record_
    assert learner.learner_ == "gbm" and rec["auto_choice"] == "gbm"
    assert rec["gbm"] < rec["linear"] and rec["z"] > 1
    assert len(rec["per_fold"]) == 3 and sum(f["n_rows"] for f in rec["per_fold"]) == 400
    # The fusion's training input is out-of-fold: less confident than the refit in-sample.
    assert learner.oof_logit_ is not None and learner.ensemble_ is not None
    in_sample = learner.ensemble_.decision_function(X)
    assert roc_auc_score(y, learner.oof_logit_) < roc_auc_score(y, in_sample)
    Xt, yt, _ = _cohort(2000, 1, "u")
    linear = learner._fit_linear(X, y, np.arange(320), np.arange(320, 400))
    auc_linear = roc_auc_score(yt, linear.predict_logit({"ehr": Xt.astype(np.float32)},
                                                        calibrated=False))
    auc_gbm = roc_auc_score(yt, learner.transform(Xt)[:, 0])
    assert auc_gbm > auc_linear + 0.1, (auc_gbm, auc_linear)
    assert "gradient-boosted trees" in describe_choice(rec)


def test_auto_keeps_linear_on_linear_data() -> None:
    X, y, pid = _cohort(400, 2, "linear")
    learner = TabularLearner(folds=3, random_state=0).fit(X, y, pid)
    assert learner.learner_ == "linear" and learner.ensemble_ is None
    assert learner.record_["linear"] <= learner.record_["gbm"] + 0.01
    np.testing.assert_array_equal(learner.transform(X), X.astype(np.float32))
    assert "linear head" in describe_choice(learner.record_)
    forced = TabularLearner(learner="gbm", folds=3, random_state=0).fit(X, y, pid)
    assert forced.learner_ == "gbm" and forced.record_["auto_choice"] == "linear"
    assert "auto would pick linear" in describe_choice(forced.record_)


def test_bad_learner_name_and_too_few_patients() -> None:
    X, y, pid = _cohort(40, 3, "linear")
    with pytest.raises(ValueError, match="tabular learner must be one of"):
        TabularLearner(learner="forest").fit(X, y, pid)
    y = np.zeros(40, dtype=int)
    y[:2] = 1  # one positive patient: no inner CV possible
    learner = TabularLearner().fit(X, y, pid)
    assert learner.learner_ == "linear" and "too few" in learner.record_["reason"]
    # Two positive patients: inner CV runs, each fold's tuning split is degenerate.
    y[:4] = 1
    learner = TabularLearner(learner="gbm", folds=5).fit(X, y, pid)
    assert learner.record_["folds"] == 2 and learner.ensemble_ is not None


def _hgb(seed: int = 0) -> tuple[HistGradientBoostingClassifier, np.ndarray]:
    X, y, _ = _cohort(300, seed, "u")
    with threadpool_limits(limits=1, user_api="openmp"):  # 2 shared cores: no spinning
        est = HistGradientBoostingClassifier(max_depth=3, max_iter=40, random_state=0).fit(X, y)
    Xn = X.copy()
    Xn[::5, 1] = np.nan  # missing values take each split's learned side
    return est, Xn


def test_tree_ensemble_matches_sklearn_and_round_trips_through_safetensors() -> None:
    est, X = _hgb()
    trees = TreeEnsemble.from_hgb(est)
    np.testing.assert_allclose(trees.decision_function(X), est.decision_function(X),
                               rtol=0, atol=1e-12)
    blob = save_safetensors(trees.to_tensors())  # what the signed artifact stores
    back = TreeEnsemble.from_tensors(load_safetensors(blob))
    np.testing.assert_array_equal(back.decision_function(X), trees.decision_function(X))
    assert TreeEnsemble.from_hgb(est, 10).n_trees == 10
    broken = load_safetensors(blob)
    del broken["starts"]
    with pytest.raises(ValueError, match="lack"):
        TreeEnsemble.from_tensors(broken)


def test_tree_shap_is_exact_and_adds_up_to_the_trees_logit() -> None:
    est, X = _hgb(1)
    trees = TreeEnsemble.from_hgb(est)
    phi, expected = tree_shap_values(trees, X[:6])
    g = trees.decision_function(X[:6])
    np.testing.assert_allclose(phi.sum(axis=1), g - expected, atol=1e-6)
    # Path-dependent TreeSHAP's base: each tree's leaves weighted by their training cover.
    a, ends = trees.arrays, [*trees.starts[1:], len(trees.arrays["left"])]
    cover_mean = trees.baseline + sum(
        float((a["value"][s:e] * a["count"][s:e] * (a["left"][s:e] < 0)).sum() / a["count"][s])
        for s, e in zip(trees.starts, ends, strict=True))
    assert expected == pytest.approx(cover_mean, abs=1e-9)
    # The noise column (2) gets far less credit than the U-shaped one (0).
    assert np.abs(phi[:, 2]).mean() < np.abs(phi[:, 0]).mean()
