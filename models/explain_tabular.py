"""SHAP values for the EHR features, and their display in clinical units.

Explainer choice
----------------
The fused logit is ``b + sum_m mask_m f_m(x_m)``: with the other modalities held
at the patient's values, the EHR features' SHAP values on the fused calibrated
logit are those of the EHR branch ``f_ehr`` (times the calibration slope).

- ``d <= max_exact`` input columns: :class:`shap.ExactExplainer` -- every
  coalition, exact Shapley values with respect to the background.
- otherwise: :class:`shap.PermutationExplainer` with antithetic (forward and
  reverse) permutations. Its values add up exactly (each permutation telescopes
  from the background to the patient) and are exact for every feature that
  interacts with no other. The fusion model's default branch is linear
  (``hidden=0``) and Platt/temperature calibration is affine, so there one permutation
  gives the exact Shapley values; only interactions inside an MLP branch
  (``hidden > 0``) or through isotonic calibration are sampled. One antithetic
  permutation costs ``2 d + 1`` batched evaluations, against KernelExplainer's
  ``2 d + 2048`` evaluations plus a weighted regression (which, for d in the
  hundreds, is itself only an estimate).

With an affine calibration the EHR branch is evaluated alone (in float64): the
other branches add one constant to every evaluation, which SHAP values ignore.
Otherwise (isotonic) the whole fused model is evaluated with the other
modalities at the patient's values.

The background is the artifact's summarised background
(:func:`models.privacy.summarise_background` centroids) in the model's input
space (imputed, scaled, with missing indicators); never training rows.

Display
-------
Each raw column's value SHAP and its missing-indicator SHAP are summed into one
attribution, shown with the *raw* value (not the scaled model input), its unit
and reference range from the feature spec, and in percentage points of risk
(:mod:`models.points`), e.g. ``"Lactate (last, 24 h) 4.1 mmol/L (high, ref
0.5–2.2): +8 points"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from models.points import format_points
from models.scales import from_scale

__all__ = ["EhrShap", "FeatureAttribution", "describe_features", "ehr_shap",
           "group_by_column"]

_STAT_RE = re.compile(r"^(?P<feat>.+)_(?P<stat>last|min|max|mean|trend)_(?P<win>[0-9.]+)h$")
_STAT_TEXT = {"last": "last", "min": "lowest", "max": "highest", "mean": "mean",
              "trend": "trend per day"}
_COURSE_RE = re.compile(r"^(?P<feat>.+)_course_(?P<stat>mean|trend|count)_(?P<win>[0-9.]+)h$")
#: Course statistics are on the feature's scale; they are shown back in its unit.
_COURSE_TEXT = {"mean": {"linear": "mean", "log": "geometric mean",
                         "log_deficit": "mean on the deficit scale"},
                "trend": {"linear": "trend per day", "log": "change per day",
                          "log_deficit": "change of the deficit per day"},
                "count": {}}


@dataclass(frozen=True)
class EhrShap:
    """SHAP values over the EHR model-input columns for one example.

    ``values.sum() == fx - base_value`` (calibrated logit) up to float rounding.
    """

    values: np.ndarray  # (d,) calibrated-logit SHAP per model-input column
    base_value: float  # expected calibrated logit over the background
    fx: float  # calibrated logit of the example
    method: str  # "exact" or "permutation"

    @property
    def additivity_error(self) -> float:
        return abs(float(self.values.sum()) - (self.fx - self.base_value))


def calibration_is_affine(model: Any) -> bool:
    """Whether the calibrated logit is an affine map of the raw one (Platt, temperature, none).

    A per-pattern Platt map is affine within each missingness pattern, with one slope
    shared by all of them, which is what the EHR-branch shortcut needs.
    """
    cal = getattr(model, "calibrator_", None)
    if cal is None:
        return True
    z = np.linspace(-12.0, 12.0, 49)
    t = np.asarray(cal.transform(z), dtype=float)
    return bool(np.allclose(np.diff(t, 2), 0.0, atol=1e-9))


def _ehr_branch(model: Any, row_mask: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    """``cal(bias + f_ehr(z))`` straight through the EHR branch, skipping the others.

    Checked against ``predict_logit`` on one row; None (use the full model) if the
    network does not have the expected layout.
    """
    import copy

    import torch

    net = getattr(model, "net_", None)
    branches = getattr(net, "branches", None)
    if net is None or branches is None or "ehr" not in branches:
        return None
    cal = getattr(model, "calibrator_", None)
    bias = float(net.bias.detach().reshape(-1)[0])
    # In float64, so a row scores the same in any batch: the values then add up to
    # rounding (float32 batches differ by ~1e-7 with the batch size).
    branch = copy.deepcopy(branches["ehr"]).double().eval()

    def f(z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            raw = branch(torch.as_tensor(np.asarray(z, dtype=np.float64)))
        logit = bias + raw.numpy()
        if cal is None:
            return np.asarray(logit)
        if hasattr(model, "calibrate_logit"):  # per-pattern calibrators need the row's mask
            return np.asarray(model.calibrate_logit(
                logit, np.repeat(np.asarray(row_mask, bool).reshape(1, -1), len(logit), 0)))
        return np.asarray(cal.transform(logit))

    probe = np.zeros((1, int(model.dims_["ehr"])), dtype=np.float32)
    expected = model.predict_logit({"ehr": probe}, row_mask, calibrated=True)
    return f if np.allclose(f(probe), expected, atol=1e-5) else None


def fused_ehr_function(model: Any, X: Mapping[str, np.ndarray], mask: np.ndarray, *,
                       others_fixed: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """``z (n, d_ehr) -> calibrated fused logit`` with the other modalities fixed.

    ``others_fixed=False`` masks the other modalities instead: with an affine
    calibration that shifts every output by one constant (the logit is additive
    across modalities), leaving SHAP values unchanged and skipping their branches.
    """
    row_mask = np.asarray(mask, dtype=bool).reshape(1, -1).copy()
    mods = tuple(model.modalities_)
    others = {m: np.asarray(v)[:1] for m, v in X.items() if m != "ehr" and m in mods}
    if not others_fixed:
        row_mask[:, [j for j, m in enumerate(mods) if m != "ehr"]] = False
        others = {}
        branch = _ehr_branch(model, row_mask)
        if branch is not None:
            return branch

    def f(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float32)
        n = len(z)
        batch = {m: np.repeat(v, n, axis=0) for m, v in others.items()}
        batch["ehr"] = z
        return np.asarray(model.predict_logit(batch, np.repeat(row_mask, n, axis=0),
                                              calibrated=True))
    return f


def ehr_shap(model: Any, X: Mapping[str, np.ndarray], mask: np.ndarray,
             background: np.ndarray, *, method: Literal["auto", "exact", "permutation"] = "auto",
             max_exact: int = 10, n_permutations: int = 1, seed: int = 0) -> EhrShap:
    """SHAP values of one example's EHR inputs on the fused calibrated logit.

    Parameters
    ----------
    model : FusionRiskModel
    X : mapping modality -> (1, d_m) array
        The example's model inputs; ``X["ehr"]`` scaled as the model takes it.
    mask : array (M,) or (1, M) of bool
        The example's availability over ``model.modalities_``; EHR must be present.
    background : array (k, d_ehr)
        The summarised background (model-input space).
    method : {"auto", "exact", "permutation"}, default "auto"
        "auto": exact when ``d <= max_exact``, else permutation.
    n_permutations : int, default 1
        Antithetic permutations for the permutation explainer.
    """
    import shap  # slow import: only when explaining

    if method not in ("auto", "exact", "permutation"):
        raise ValueError(f"Unrecognised SHAP method {method!r}; choose 'auto', 'exact' or "
                         "'permutation'")
    mods = tuple(model.modalities_)
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if "ehr" not in mods or not m[mods.index("ehr")]:
        raise ValueError("the example has no EHR input to explain")
    x = np.asarray(X["ehr"], dtype=np.float64)[:1]
    bg = np.asarray(background, dtype=np.float64)
    if bg.ndim != 2 or bg.shape[1] != x.shape[1]:
        raise ValueError(f"background must have shape (k, {x.shape[1]}), got {bg.shape}")
    f_full = fused_ehr_function(model, X, m)
    # Additivity across modalities: with an affine calibration, the EHR branch alone
    # has the same SHAP values as the fused logit, at a fraction of the cost.
    fast = calibration_is_affine(model)
    f = fused_ehr_function(model, X, m, others_fixed=not fast)
    d = x.shape[1]
    chosen = ("exact" if d <= max_exact else "permutation") if method == "auto" else method
    masker = shap.maskers.Independent(bg, max_samples=len(bg))
    if chosen == "exact":
        explanation = shap.ExactExplainer(f, masker)(x, silent=True)
    else:
        explanation = shap.PermutationExplainer(f, masker, seed=seed)(
            x, max_evals=n_permutations * (2 * d + 1), silent=True)
    values = np.asarray(explanation.values, dtype=float).reshape(-1)
    fx = float(f_full(x)[0])
    # The fused model's expected logit over the background: the EHR-only base plus the
    # constant the masked modalities add (exactly fx_full - fx_ehr_only when affine).
    base = float(np.asarray(explanation.base_values).reshape(-1)[0])
    if fast:
        base += fx - float(f(x)[0])
    return EhrShap(values=values, base_value=base, fx=fx, method=chosen)


# ----------------------------------------------------------------------- display


@dataclass(frozen=True)
class FeatureAttribution:
    """One raw EHR column's attribution, for display."""

    column: str
    feature: str  # spec feature name (e.g. "lactate") or the column itself
    display: str  # "Lactate (last, 24 h)"
    raw_value: float | None  # as recorded; None when missing (the model imputed it)
    unit: str | None
    reference_low: float | None
    reference_high: float | None
    flag: str | None  # "high", "low", "normal" or None
    logit: float  # calibrated-logit SHAP (value + missing indicator)
    points: float  # percentage points of risk
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def group_by_column(values: np.ndarray, n_raw: int, indicator: Sequence[int] | np.ndarray
                    ) -> np.ndarray:
    """Model-input SHAP -> raw-column SHAP: each column's value plus its missing indicator.

    The scaler's output is ``[scaled raw columns..., indicators for `indicator` columns]``.
    """
    values = np.asarray(values, dtype=float)
    if len(values) != n_raw + len(indicator):
        raise ValueError(f"expected {n_raw + len(indicator)} SHAP values ({n_raw} columns + "
                         f"{len(indicator)} missing indicators), got {len(values)}")
    out = values[:n_raw].copy()
    np.add.at(out, np.asarray(indicator, dtype=int), values[n_raw:])
    return out


def _lookup(column: str, spec: Mapping[str, Mapping[str, Any]]
            ) -> tuple[str, str, Mapping[str, Any] | None, str | None]:
    """(feature name, display, spec feature or None, statistic or None) for a column."""
    match = _COURSE_RE.match(column)
    if match and match["feat"] in spec:
        feat = spec[match["feat"]]
        scale = str(feat.get("scale", "linear"))
        text = _COURSE_TEXT[match["stat"]].get(scale, "measurements")
        return (match["feat"], f"{feat['display']} ({text}, {float(match['win']):g} h)", feat,
                f"course_{match['stat']}")
    match = _STAT_RE.match(column)
    if match and match["feat"] in spec:
        feat = spec[match["feat"]]
        win = float(match["win"])
        return (match["feat"], f"{feat['display']} ({_STAT_TEXT[match['stat']]}, {win:g} h)",
                feat, match["stat"])
    for suffix, text in (("_hours_since_last", "hours since last"), ("_missing", "not measured")):
        if column.endswith(suffix) and column[:-len(suffix)] in spec:
            name = column[:-len(suffix)]
            return name, f"{spec[name]['display']} ({text})", spec[name], suffix
    if column in spec:
        return column, str(spec[column]["display"]), spec[column], "last"
    if column == "age_years":
        return column, "Age", None, None
    return column, column.replace("_", " "), None, None


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def describe_features(columns: Sequence[str], raw: np.ndarray, logit_values: np.ndarray,
                      points: np.ndarray, spec: Sequence[Mapping[str, Any]]
                      ) -> list[FeatureAttribution]:
    """Clinical-unit attributions per raw column, largest absolute effect first.

    ``spec`` is the feature spec's ``features`` list (``LabFeature`` as dicts: name,
    unit, display, reference_low, reference_high).
    """
    by_name = {str(f["name"]): f for f in spec}
    out = []
    for j, column in enumerate(columns):
        name, display, feat, stat = _lookup(column, by_name)
        value = float(raw[j])
        raw_value = None if math.isnan(value) else value
        unit = lo = hi = None
        flag = None
        scale = str(feat.get("scale", "linear")) if feat is not None else "linear"
        if feat is not None and stat == "course_mean" and raw_value is not None:
            raw_value = float(from_scale(raw_value, scale))
        if feat is not None and stat in ("last", "min", "max", "mean", "course_mean"):
            unit, lo, hi = feat.get("unit"), feat.get("reference_low"), feat.get("reference_high")
        elif feat is not None and stat == "course_trend" and scale != "linear":
            # A slope of the logarithm: shown as the relative change per day.
            unit = "%/d"
            if raw_value is not None:
                raw_value = 100.0 * math.expm1(raw_value)
        elif feat is not None and stat in ("trend", "course_trend"):
            unit = f"{feat.get('unit')}/d"
        elif stat == "_hours_since_last":
            unit = "h"
        elif column == "age_years":
            unit = "years"
        if raw_value is not None and lo is not None and hi is not None:
            flag = "high" if raw_value > hi else "low" if raw_value < lo else "normal"
        if raw_value is None:
            shown = "not recorded"
        elif stat == "_missing":
            shown = "yes" if raw_value else "no"
        else:
            shown = f"{_num(raw_value)}{' ' + _ucum_text(unit) if unit else ''}"
        detail = ""
        if flag is not None:
            detail = f" ({flag}, ref {_num(float(lo or 0))}–{_num(float(hi or 0))})"
        text = f"{display} {shown}{detail}: {format_points(float(points[j]))}"
        out.append(FeatureAttribution(column, name, display, raw_value, unit, lo, hi, flag,
                                      float(logit_values[j]), float(points[j]), text))
    out.sort(key=lambda a: -abs(a.logit))
    return out


def _ucum_text(unit: str | None) -> str:
    """UCUM codes as clinicians write them (``mm[Hg]`` -> ``mmHg``, ``Cel`` -> ``°C``)."""
    if unit is None:
        return ""
    if unit.endswith("/d"):
        return f"{_ucum_text(unit[:-2])}/day"
    return {"mm[Hg]": "mmHg", "Cel": "°C", "10*3/uL": "×10³/µL", "/min": "/min"}.get(unit, unit)
