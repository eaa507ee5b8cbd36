"""Group metrics, exactly from rows and vectorised from (score bin x label) histograms.

Definitions (``s`` score, ``y`` label, ``t`` decision threshold, flagged if ``s >= t``):

- ``auroc``: probability a random event scores above a random non-event, ties 1/2
  (scikit-learn's ``roc_auc_score``); ``auprc``: average precision, scikit-learn's
  step-wise definition.
- ``tpr``/``fnr``/``fpr``/``ppv``/``npv``/``selection_rate`` at ``t``.
- ``brier``: mean of ``(s - y)^2``. ``ece``: ``sum_b n_b/n |mean(s)_b - mean(y)_b|`` over
  equal-width bins ``[lo, hi)`` (the top bin closed).
- ``calibration_in_the_large``: ``mean(s) - mean(y)`` (probability points; > 0 means
  the model overstates risk). ``calibration_intercept``: ``a`` in
  ``logit P(y) = a + logit(s)``; ``calibration_slope``: ``b`` in
  ``logit P(y) = a + b logit(s)`` (1 is ideal, < 1 means overconfident).

Histogram versions treat a score bin as one tied score with the bin's mean score
(and mean squared score and mean logit); the audit shifts their bootstrap
distribution by ``exact - histogram`` on the full data, so this binning only
affects the spread, not the centre, of an interval.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

__all__ = ["METRICS", "Binning", "MetricName", "exact_metrics", "hist_metrics", "make_binning"]

MetricName = Literal["n", "prevalence", "auroc", "auprc", "tpr", "fnr", "fpr", "ppv", "npv",
                     "selection_rate", "brier", "ece", "calibration_in_the_large",
                     "calibration_intercept", "calibration_slope"]
METRICS: tuple[MetricName, ...] = get_args(MetricName)
_EPS = 1e-6
_NEWTON_STEPS = 25


@dataclass(frozen=True)
class Binning:
    """Fine score bins shared by every histogram of one audit."""

    edges: np.ndarray  # (n_bins + 1,), containing the thresholds and the ECE edges
    mean_s: np.ndarray  # (n_bins,) mean score of the rows in each bin
    mean_s2: np.ndarray
    threshold_bin: int  # first bin at or above the threshold
    ece_starts: np.ndarray  # first fine bin of each ECE bin
    coarse_starts: np.ndarray  # first fine bin of each calibration-fit bin
    coarse_logit: np.ndarray  # mean logit of each calibration-fit bin

    @property
    def n_bins(self) -> int:
        return int(self.mean_s.size)

    def index(self, s: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.edges, s, side="right") - 1, 0, self.n_bins - 1)


def make_binning(s: np.ndarray, threshold: float, *, n_bins: int = 1000,
                 n_ece_bins: int = 10, n_coarse: int = 100) -> Binning:
    """Equal-mass bins from the scores, with the threshold and ECE edges as bin edges."""
    quant = np.quantile(s, np.linspace(0.0, 1.0, n_bins + 1))
    ece_edges = np.linspace(0.0, 1.0, n_ece_bins + 1)
    edges = np.unique(np.concatenate([quant, ece_edges, [threshold]]))
    edges[0], edges[-1] = 0.0, 1.0
    edges = np.unique(edges)
    nb = edges.size - 1
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, nb - 1)
    count = np.bincount(idx, minlength=nb).astype(float)
    safe = np.maximum(count, 1.0)
    mid = 0.5 * (edges[:-1] + edges[1:])
    mean_s = np.where(count > 0, np.bincount(idx, weights=s, minlength=nb) / safe, mid)
    mean_s2 = np.where(count > 0, np.bincount(idx, weights=s * s, minlength=nb) / safe, mid**2)
    ece_starts = np.searchsorted(edges, ece_edges[:-1], side="left")
    # Calibration fits run on ~n_coarse equal-mass groups of fine bins (cheap Newton steps).
    cum = np.cumsum(count) / max(count.sum(), 1.0)
    coarse_starts = np.unique(np.searchsorted(cum, np.linspace(0, 1, n_coarse + 1)[:-1],
                                              side="right"))
    coarse_starts = coarse_starts[coarse_starts < nb]
    coarse_starts[0] = 0
    logit = _logit(s)
    c_idx = np.searchsorted(coarse_starts, idx, side="right") - 1
    c_count = np.bincount(c_idx, minlength=coarse_starts.size).astype(float)
    fine_mid = _logit(mean_s)[coarse_starts]
    coarse_logit = np.where(c_count > 0, np.bincount(c_idx, weights=logit,
                                                     minlength=coarse_starts.size)
                            / np.maximum(c_count, 1.0), fine_mid)
    return Binning(edges=edges, mean_s=mean_s, mean_s2=mean_s2,
                   threshold_bin=int(np.searchsorted(edges, threshold, side="left")),
                   ece_starts=ece_starts, coarse_starts=coarse_starts,
                   coarse_logit=coarse_logit)


def _logit(s: np.ndarray) -> np.ndarray:
    c = np.clip(s, _EPS, 1.0 - _EPS)
    return np.log(c) - np.log1p(-c)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def logistic_recalibration(x: np.ndarray, pos: np.ndarray, neg: np.ndarray,
                           init: tuple[Any, Any, Any] = (0.0, 0.0, 1.0),
                           steps: int = _NEWTON_STEPS, tol: float = 1e-12
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intercept with slope fixed at 1, slope, intercept of the slope model) over the
    last axis; NaN if one class.

    ``init`` = (intercept, slope-model intercept, slope) starting values; the
    bootstrap starts from the full-data fit, so a few Newton steps suffice.
    """
    x = np.broadcast_to(x, pos.shape)
    n = pos + neg
    p_tot, n_tot = pos.sum(-1), neg.sum(-1)
    ok = (p_tot > 0) & (n_tot > 0)
    shape = pos.shape[:-1]
    a = np.array(np.broadcast_to(np.nan_to_num(init[0]), shape), dtype=float)
    for _ in range(steps):  # offset model: one parameter
        mu = _sigmoid(a[..., None] + x)
        g = (pos - n * mu).sum(-1)
        h = (n * mu * (1 - mu)).sum(-1)
        step = _div(g, h)
        a = a + step
        a = np.where(np.isfinite(a), a, 0.0)
        if not np.any(np.abs(np.nan_to_num(step)) > tol):
            break  # converged (Newton: quadratic near the optimum)
    a0 = np.array(np.broadcast_to(np.nan_to_num(init[1]), shape), dtype=float)
    b = np.array(np.broadcast_to(np.nan_to_num(init[2], nan=1.0), shape), dtype=float)
    for _ in range(steps):  # (intercept, slope)
        mu = _sigmoid(a0[..., None] + b[..., None] * x)
        r = pos - n * mu
        w = n * mu * (1 - mu)
        g0, g1 = r.sum(-1), (r * x).sum(-1)
        h00, h01, h11 = w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)
        det = h00 * h11 - h01 * h01
        d0 = _div(h11 * g0 - h01 * g1, det)
        d1 = _div(h00 * g1 - h01 * g0, det)
        a0 = np.where(np.isfinite(d0), a0 + d0, a0)
        b = np.where(np.isfinite(d1), b + d1, b)
        if not (np.any(np.abs(np.nan_to_num(d0)) > tol)
                or np.any(np.abs(np.nan_to_num(d1)) > tol)):
            break
    return np.where(ok, a, np.nan), np.where(ok, b, np.nan), np.where(ok, a0, np.nan)


def hist_metrics(h: np.ndarray, binning: Binning, *, calibration_fit: bool = True,
                 init: tuple[Any, Any, Any] = (0.0, 0.0, 1.0),
                 steps: int = _NEWTON_STEPS,
                 need: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Metrics from histograms ``h`` of shape ``(..., n_bins, 2)`` (label 0, 1).

    ``calibration_fit=False`` skips the intercept and slope (NaN), the costly part.
    ``need`` limits the work to those metrics (default: all of them).
    """
    want = set(METRICS) | {"_slope_model_intercept"} if need is None else set(need)
    neg, pos = h[..., 0], h[..., 1]
    big_n, big_p = neg.sum(-1), pos.sum(-1)
    n = big_n + big_p
    k = binning.threshold_bin
    out: dict[str, np.ndarray] = {"n": n, "prevalence": _div(big_p, n)}
    if want & {"tpr", "fnr", "fpr", "ppv", "npv", "selection_rate"}:
        tp, fp = pos[..., k:].sum(-1), neg[..., k:].sum(-1)
        fn, tn = big_p - tp, big_n - fp
        out.update({"tpr": _div(tp, big_p), "fnr": _div(fn, big_p), "fpr": _div(fp, big_n),
                    "ppv": _div(tp, tp + fp), "npv": _div(tn, tn + fn),
                    "selection_rate": _div(tp + fp, n)})
    if "auroc" in want:
        cn = np.cumsum(neg, axis=-1)
        cn -= neg
        cn += 0.5 * neg
        out["auroc"] = _div(np.einsum("...i,...i->...", pos, cn), big_p * big_n)
    if "auprc" in want:
        tp_c = np.cumsum(pos[..., ::-1], axis=-1)
        all_c = tp_c + np.cumsum(neg[..., ::-1], axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = tp_c / all_c
        prec[all_c == 0] = 0.0
        out["auprc"] = _div(np.einsum("...i,...i->...", pos[..., ::-1], prec), big_p)
    if want & {"brier", "ece", "calibration_in_the_large"}:
        tot = neg + pos
        sum_s = tot @ binning.mean_s
        out["brier"] = _div(tot @ binning.mean_s2 - 2 * (pos @ binning.mean_s) + big_p, n)
        out["calibration_in_the_large"] = _div(sum_s - big_p, n)
        if "ece" in want:
            e_s = np.add.reduceat(tot * binning.mean_s, binning.ece_starts, axis=-1)
            e_y = np.add.reduceat(pos, binning.ece_starts, axis=-1)
            out["ece"] = _div(np.abs(e_s - e_y).sum(-1), n)
    if calibration_fit and want & {"calibration_intercept", "calibration_slope"}:
        c_pos = np.add.reduceat(pos, binning.coarse_starts, axis=-1)
        c_neg = np.add.reduceat(neg, binning.coarse_starts, axis=-1)
        intercept, slope, slope_a0 = logistic_recalibration(binning.coarse_logit, c_pos,
                                                            c_neg, init, steps)
    else:
        intercept = slope = slope_a0 = np.full(n.shape, np.nan)
    out.update({"calibration_intercept": intercept, "calibration_slope": slope,
                "_slope_model_intercept": slope_a0})
    return {m: v for m, v in out.items() if need is None or m in want or m in ("n", "prevalence")}


def exact_metrics(s: np.ndarray, y: np.ndarray, threshold: float,
                  n_ece_bins: int = 10, *, presorted: bool = False) -> dict[str, float]:
    """Row-level metrics of one group (``s`` need not be sorted unless ``presorted``)."""
    if not presorted:
        order = np.argsort(s, kind="stable")
        s, y = s[order], y[order]
    y = y.astype(float)
    start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if s.size else np.zeros(0, np.int64)
    uniq = s[start]
    pos = np.add.reduceat(y, start) if s.size else np.zeros(0)
    cnt = np.diff(np.append(start, s.size)).astype(float)
    h = np.stack([cnt - pos, pos], axis=-1)
    neg_u, pos_u = h[:, 0], h[:, 1]
    out: dict[str, float] = {}
    big_p, big_n = float(pos_u.sum()), float(neg_u.sum())
    n = big_p + big_n
    flag = s >= threshold
    tp, fp = float(y[flag].sum()), float((1 - y[flag]).sum())
    fn, tn = big_p - tp, big_n - fp
    cn = np.cumsum(neg_u) - neg_u
    out["n"] = n
    out["prevalence"] = float(_div(np.array(big_p), np.array(n)))
    out["auroc"] = float(_div(np.array((pos_u * (cn + 0.5 * neg_u)).sum()),
                              np.array(big_p * big_n)))
    tp_c, fp_c = np.cumsum(pos_u[::-1]), np.cumsum(neg_u[::-1])
    prec = _div(tp_c, tp_c + fp_c)
    out["auprc"] = float(_div(np.array((pos_u[::-1] * np.nan_to_num(prec)).sum()),
                              np.array(big_p)))
    for name, a, b in (("tpr", tp, big_p), ("fnr", fn, big_p), ("fpr", fp, big_n),
                       ("ppv", tp, tp + fp), ("npv", tn, tn + fn),
                       ("selection_rate", tp + fp, n)):
        out[name] = float(_div(np.array(a), np.array(b)))
    out["brier"] = float(np.mean((s - y) ** 2)) if n else float("nan")
    edges = np.linspace(0.0, 1.0, n_ece_bins + 1)
    b_idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_ece_bins - 1)
    e_s = np.bincount(b_idx, weights=s, minlength=n_ece_bins)
    e_y = np.bincount(b_idx, weights=y, minlength=n_ece_bins)
    out["ece"] = float(np.abs(e_s - e_y).sum() / n) if n else float("nan")
    out["calibration_in_the_large"] = float((s.sum() - big_p) / n) if n else float("nan")
    intercept, slope, _ = logistic_recalibration(_logit(uniq), pos_u, neg_u)
    out["calibration_intercept"], out["calibration_slope"] = float(intercept), float(slope)
    return out


def reliability_curve(s: np.ndarray, y: np.ndarray, n_bins: int = 10
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean score, observed rate, count) per non-empty equal-width bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    cnt = np.bincount(idx, minlength=n_bins).astype(float)
    ms = np.bincount(idx, weights=s, minlength=n_bins)
    my = np.bincount(idx, weights=y.astype(float), minlength=n_bins)
    keep = cnt > 0
    return ms[keep] / cnt[keep], my[keep] / cnt[keep], cnt[keep]


def roc_points(s: np.ndarray, y: np.ndarray, max_points: int = 400
               ) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) along descending thresholds, thinned to about ``max_points``."""
    order = np.argsort(-s, kind="stable")
    ys = y[order].astype(float)
    tps, fps = np.cumsum(ys), np.cumsum(1 - ys)
    p, q = max(tps[-1], 1.0), max(fps[-1], 1.0)
    step = max(1, ys.size // max_points)
    keep = np.r_[np.arange(0, ys.size, step), ys.size - 1]
    return np.r_[0.0, fps[keep] / q], np.r_[0.0, tps[keep] / p]
