"""EHR-feature SHAP: agreement with shap.KernelExplainer, additivity, clinical display.

Tolerances: on 5 features KernelExplainer enumerates all 32 coalitions, so it is
exact and must agree to 1e-5. With a linear branch one antithetic permutation is
exact too (1e-5). With an MLP branch the permutation explainer samples the
interactions: 20 permutations agree with exact Kernel values within 0.05 of the
largest |value| (measured ~0.01).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import shap

from models.explain_tabular import (
    describe_features,
    ehr_shap,
    fused_ehr_function,
    group_by_column,
)
from models.privacy import summarise_background
from pipelines.feature_spec import DEFAULT_SPEC
from tests.models.explain_fakes import small_fusion


def _kernel(model, X, mask, bg, i):  # type: ignore[no-untyped-def]
    f = fused_ehr_function(model, {m: v[i:i + 1] for m, v in X.items()}, mask[i])
    k = shap.KernelExplainer(f, bg)
    return np.ravel(k.shap_values(X["ehr"][i:i + 1], silent=True)), float(k.expected_value)


@pytest.mark.parametrize("hidden", [0, 8])
def test_matches_kernel_explainer_and_adds_up(hidden: int) -> None:
    model, X, mask = small_fusion(hidden=hidden, d_ehr=5)
    bg = summarise_background(X["ehr"], k=8)
    rows = [i for i in range(40) if mask[i, 1]][:6]
    for i in rows:
        one = {m: v[i:i + 1] for m, v in X.items()}
        kv, kbase = _kernel(model, X, mask, bg, i)
        exact = ehr_shap(model, one, mask[i], bg, method="exact")
        np.testing.assert_allclose(exact.values, kv, atol=1e-5)
        assert abs(exact.base_value - kbase) < 1e-5
        assert exact.additivity_error < 1e-5
        perm = ehr_shap(model, one, mask[i], bg, method="permutation",
                        n_permutations=1 if hidden == 0 else 20)
        assert perm.additivity_error < 1e-5
        tol = 1e-5 if hidden == 0 else 0.05 * max(np.abs(kv).max(), 1e-3)
        np.testing.assert_allclose(perm.values, kv, atol=tol)


def test_isotonic_calibration_uses_the_full_fused_model() -> None:
    model, X, mask = small_fusion(d_ehr=4, calibration="isotonic")
    bg = summarise_background(X["ehr"], k=6)
    i = int(np.flatnonzero(mask.all(axis=1))[0])
    res = ehr_shap(model, {m: v[i:i + 1] for m, v in X.items()}, mask[i], bg)
    assert res.additivity_error < 1e-5
    assert abs(res.fx - model.predict_logit({m: v[i:i + 1] for m, v in X.items()},
                                            mask[i:i + 1])[0]) < 1e-6


def test_deletion_and_signal_ranking_on_linear_branch() -> None:
    """Features 0 and 1 carry the signal: on average they rank above the 6 noise features,
    and deleting each patient's top two moves the risk more than deleting two at random."""
    model, X, mask = small_fusion(d_ehr=8)
    bg = summarise_background(X["ehr"], k=8)
    rng = np.random.default_rng(0)
    mean_abs, top_moves, random_moves = [], [], []
    for i in [i for i in range(80) if mask[i, 1]][:30]:
        one = {m: v[i:i + 1] for m, v in X.items()}
        res = ehr_shap(model, one, mask[i], bg)
        order = np.argsort(-np.abs(res.values))
        mean_abs.append(np.abs(res.values))
        p = model.predict_proba(one, mask[i:i + 1])[0, 1]

        def moved(cols: np.ndarray, one: dict[str, np.ndarray] = one, i: int = i,
                  p: float = p) -> float:
            z = one["ehr"].copy()
            z[0, cols] = bg[:, cols].mean(axis=0)  # "deleted" = background mean
            return abs(model.predict_proba({**one, "ehr": z}, mask[i:i + 1])[0, 1] - p)

        top_moves.append(moved(order[:2]))
        random_moves.append(moved(rng.choice(8, 2, replace=False)))
    importance = np.mean(mean_abs, axis=0)
    assert importance[:2].min() > importance[2:].max(), importance
    assert np.mean(top_moves) > 1.5 * np.mean(random_moves)


def test_group_by_column_adds_missing_indicators() -> None:
    out = group_by_column(np.array([1.0, 2.0, 3.0, 0.5]), 3, [2])
    np.testing.assert_allclose(out, [1.0, 2.0, 3.5])
    with pytest.raises(ValueError, match="expected 4 SHAP values"):
        group_by_column(np.zeros(3), 3, [2])


def test_clinical_display_uses_raw_values_units_and_reference_range() -> None:
    spec = DEFAULT_SPEC.to_dict()["features"]
    cols = ["lactate_last_24h", "sbp_min_72h", "lactate_missing", "age_years", "wbc_last_24h"]
    raw = np.array([4.1, 85.0, 0.0, 71.0, np.nan])
    logit = np.array([0.6, 0.2, 0.01, -0.1, 0.05])
    pts = np.array([8.2, 2.4, 0.1, -1.2, 0.6])
    out = {a.column: a for a in describe_features(cols, raw, logit, pts, spec)}
    assert out["lactate_last_24h"].text == ("Lactate (last, 24 h) 4.1 mmol/L "
                                            "(high, ref 0.5–2.2): +8 points")
    assert out["sbp_min_72h"].flag == "low" and "mmHg" in out["sbp_min_72h"].text
    assert out["wbc_last_24h"].raw_value is None and "not recorded" in out["wbc_last_24h"].text
    assert out["age_years"].text == "Age 71 years: -1 points"


def test_course_columns_are_shown_back_in_the_clinical_unit() -> None:
    spec = DEFAULT_SPEC.to_dict()["features"]
    cols = ["lactate_course_mean_120h", "lactate_course_trend_120h", "lactate_course_count_120h",
            "heart_rate_course_trend_120h", "spo2_course_mean_120h"]
    # ln 3 mmol/L; ln-lactate rising by ln 1.5 a day; 4 draws; +12/min a day; ln(100 - 92)
    raw = np.array([math.log(3.0), math.log(1.5), 4.0, 12.0, math.log(8.0)])
    out = {a.column: a for a in describe_features(cols, raw, np.zeros(5), np.zeros(5), spec)}
    mean = out["lactate_course_mean_120h"]
    assert mean.raw_value == pytest.approx(3.0) and mean.flag == "high"
    assert mean.text.startswith("Lactate (geometric mean, 120 h) 3 mmol/L (high, ref 0.5–2.2)")
    trend = out["lactate_course_trend_120h"]
    assert trend.raw_value == pytest.approx(50.0) and trend.unit == "%/d"
    assert "change per day" in trend.text
    assert out["lactate_course_count_120h"].text.startswith("Lactate (measurements, 120 h) 4:")
    assert out["heart_rate_course_trend_120h"].text.startswith(
        "Heart rate (trend per day, 120 h) 12 /min/day")
    spo2 = out["spo2_course_mean_120h"]
    assert spo2.raw_value == pytest.approx(92.0) and spo2.flag == "low"
