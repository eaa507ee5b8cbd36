"""Exact SHAP values of the EHR features when the EHR branch is boosted trees.

With the gbm tabular learner (:mod:`models.tabular_learner`) the fusion's EHR
input is the trees' logit ``g(x)``, and the fused logit is linear in it:
``logit = b + w * (g(x) - shift) / scale + (other modalities)``. Platt and
temperature calibration are affine, so the calibrated fused logit is
``a * g(x) + c(other modalities)`` with one slope ``a``.

The trees are explained by ``shap.TreeExplainer`` with
``feature_perturbation="tree_path_dependent"``: exact Shapley values of the
trees' conditional expectation along their own paths (node cover counts of the
training rows), no background needed. They add up exactly:
``sum(phi) == g(x) - E[g]``, with ``E[g]`` the cover-weighted mean leaf value.
Multiplying by ``a`` splits the EHR branch's share of the fused calibrated logit
exactly: ``sum(a * phi) == f(g(x)) - f(E[g])``. (shap 0.51's "interventional"
mode was measured off by a constant 0.005--0.017 logit on these trees, depending on
the background, so it is not used.)

With isotonic calibration (not affine) the per-feature values are scaled by the
secant slope between ``E[g]`` and ``g(x)``: still adding up exactly, but exact
per feature only where the calibration is locally linear.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.explain_tabular import EhrShap, calibration_is_affine, fused_ehr_function
from models.tabular_learner import TreeEnsemble

__all__ = ["tree_ehr_shap", "tree_shap_values"]


def tree_shap_values(ensemble: TreeEnsemble, X: np.ndarray) -> tuple[np.ndarray, float]:
    """(phi (n, d), expected logit E[g]) by path-dependent TreeSHAP; rows add up to g(x)."""
    import shap  # slow import: only when explaining

    explainer = shap.TreeExplainer(ensemble.shap_model(),
                                   feature_perturbation="tree_path_dependent")
    phi = np.asarray(explainer.shap_values(np.asarray(X, dtype=np.float64)), dtype=float)
    return phi.reshape(len(X), -1), float(np.asarray(explainer.expected_value).reshape(-1)[0])


def tree_ehr_shap(model: Any, ensemble: TreeEnsemble, x_scaled: np.ndarray,
                  X: Mapping[str, np.ndarray], mask: np.ndarray) -> EhrShap:
    """SHAP values of one example's scaled EHR columns on the fused calibrated logit.

    ``x_scaled`` is the example's scaled columns with missing indicators (1, d);
    ``X`` its fusion inputs (``X["ehr"]`` the trees' logit, (1, 1)); ``mask`` its
    availability over ``model.modalities_``.
    """
    mods = tuple(model.modalities_)
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if "ehr" not in mods or not m[mods.index("ehr")]:
        raise ValueError("the example has no EHR input to explain")
    x = np.asarray(x_scaled, dtype=np.float64)[:1]
    phi, expected = tree_shap_values(ensemble, x)
    values = phi[0]
    g_x = float(ensemble.decision_function(x)[0])
    f_full = fused_ehr_function(model, X, m)
    fx = float(f_full(np.array([[g_x]]))[0])
    fast = calibration_is_affine(model)
    # The EHR branch alone (float64 when available): the other modalities add one
    # constant, which fx - f(g_x) restores below.
    f = fused_ehr_function(model, X, m, others_fixed=not fast)
    f_x, f_0 = (float(v) for v in f(np.array([[g_x], [expected]])))
    if fast:
        slope = float(f(np.array([[expected + 1.0]]))[0]) - f_0
    else:
        slope = (f_x - f_0) / (g_x - expected) if abs(g_x - expected) > 1e-12 else 0.0
    base = f_0 + (fx - f_x)
    return EhrShap(values=slope * values, base_value=base, fx=fx, method="tree")
