"""P-values behind the audit's flags, and their multiplicity control.

Every flag needs a p-value that is valid in the groups the audit actually
sees, including intersection cells of 30 patients with a handful of events,
and an error rate that holds for each attribute on its own. The tests here:

- **Rates** (TPR, FPR, PPV, selection rate, modality missing rate) are counts
  ``x`` of ``n`` rows. Equality is tested with Fisher's exact test (two-sided as
  twice the smaller tail). A normal approximation is far too optimistic in the
  tail a multiplicity correction looks at: 15 events of 100 where 5 are
  expected is z = 4.6 (p = 4e-6) but has exact tail probability 1e-4; and the
  empirical (sandwich) variance used before made a group with *no* missing
  data look almost certain (its variance is ``t^2/n`` instead of ``t(1-t)/n``).
  The four-fifths rule (selection-rate ratio = 0.8) is tested with the
  Farrington-Manning score test, whose variance uses rates constrained to the
  null ratio.
- **Calibration** is tested as a difference of calibration intercepts: in
  ``logit P(y) = logit(s) + alpha + delta [in group]`` over the group and its
  comparator, the score test of ``delta = 0`` (intercept fitted under the null,
  model-based information ``W_g W_r / (W_g + W_r)`` with ``W = sum s(1-s)``). It
  is the efficient test for a model that over- or under-states one group's risk
  by a constant on the log-odds scale, and unlike an ECE gap it is centred at 0
  when nothing is wrong (ECE is positive even for a perfectly calibrated model,
  more so in small groups, so ECE gaps are reported but never flagged).
- **Several rows per patient**: counts are divided by a design effect (Rao and
  Scott 1992): the patient-clustered over the row-level residual sum of squares,
  pooled over both groups under the null, at least 1. With one row per patient
  it is exactly 1.

Multiplicity: single-attribute comparisons and intersection comparisons are two
families; the family-wise error (Holm, the default) or false-discovery rate
(Benjamini-Hochberg) is controlled at ``(1 - share) alpha`` and ``share alpha``
(Bonferroni split, so Holm keeps the family-wise error of *all* flags at
``alpha``). The hundreds of small intersection cells then no longer dilute the
few comparisons a compliance reader asks first (is the model calibrated as well
for Black as for White patients?), and true differences of one attribute (age,
which drives risk) do not loosen the control for another, as pooled
Benjamini-Hochberg does.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import hypergeom, norm

__all__ = ["adjust_families", "calibration_intercept_test", "design_effect",
           "rate_equality_test", "rate_ratio_test"]

_NEWTON_STEPS = 30


def design_effect(clustered_ss: float, row_ss: float) -> float:
    """Patient-clustered over row-level residual sum of squares, at least 1 (1 if undefined)."""
    if not (row_ss > 0 and math.isfinite(clustered_ss)):
        return 1.0
    return max(1.0, clustered_ss / row_ss)


def rate_equality_test(x_g: float, n_g: float, x_r: float, n_r: float,
                       deff: float = 1.0) -> float:
    """Two-sided p of ``x_g / n_g = x_r / n_r``: Fisher's exact test, twice the smaller tail.

    Counts are divided by the design effect ``deff`` first (Rao-Scott).
    """
    xg, ng, xr, nr = (round(v / deff) for v in (x_g, n_g, x_r, n_r))
    xg, xr = min(xg, ng), min(xr, nr)
    if ng <= 0 or nr <= 0:
        return 1.0
    total, events = ng + nr, xg + xr
    lower = float(hypergeom.cdf(xg, total, events, ng))
    upper = float(hypergeom.sf(xg - 1, total, events, ng))
    return float(min(1.0, 2.0 * min(lower, upper)))


def rate_ratio_test(x_g: float, n_g: float, x_r: float, n_r: float, ratio: float,
                    deff: float = 1.0) -> float:
    """Two-sided p of ``rate_g = ratio * rate_r`` on the side the data fall (the smaller
    rate over the larger), doubled: Farrington-Manning score test.

    The variance is taken at the maximum-likelihood rates constrained to the null
    ratio (closed form of Miettinen and Nurminen), times ``deff``.
    """
    if n_g <= 0 or n_r <= 0:
        return 1.0
    if x_g / n_g > x_r / n_r:  # test the smaller rate over the larger
        x_g, n_g, x_r, n_r = x_r, n_r, x_g, n_g
    total = n_g + n_r
    a = total * ratio
    b = -(n_g * ratio + x_g + n_r + x_r * ratio)
    c = x_g + x_r
    disc = max(b * b - 4 * a * c, 0.0)
    p_r = (-b - math.sqrt(disc)) / (2 * a)
    p_g = ratio * p_r
    var = deff * (p_g * (1 - p_g) / n_g + ratio * ratio * p_r * (1 - p_r) / n_r)
    d = x_g / n_g - ratio * x_r / n_r
    if not (var > 0 and math.isfinite(d)):
        return 1.0
    return float(min(1.0, 2.0 * norm.cdf(d / math.sqrt(var))))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def calibration_intercept_test(hist_g: np.ndarray, hist_r: np.ndarray, logit: np.ndarray,
                               deff: np.ndarray | float = 1.0
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Score test of equal calibration intercepts, vectorised over comparisons.

    Parameters
    ----------
    hist_g, hist_r : (n_comparisons, n_bins, 2) arrays
        Counts of (non-events, events) per fine score bin of each group and its
        comparator (disjoint sets of patients).
    logit : (n_bins,) array
        Mean ``logit(score)`` of the rows in each bin (bins are ~0.1 % of the
        rows, so treating a bin as one score changes the test negligibly).
    deff : float or (n_comparisons,) array
        Design effect for several rows per patient.

    Returns
    -------
    z, p : (n_comparisons,) arrays
        ``z > 0`` when the group has more events than its comparator at the same
        score (the model understates its risk); two-sided p.
    """
    pos = hist_g[..., 1] + hist_r[..., 1]
    n = hist_g.sum(-1) + hist_r.sum(-1)
    alpha = np.zeros(pos.shape[0])
    for _ in range(_NEWTON_STEPS):  # common intercept under the null, both groups
        mu = _sigmoid(alpha[:, None] + logit[None, :])
        grad = (pos - n * mu).sum(-1)
        hess = (n * mu * (1 - mu)).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(hess > 0, grad / np.where(hess > 0, hess, 1.0), 0.0)
        alpha = np.clip(alpha + step, -30.0, 30.0)
        if np.all(np.abs(step) < 1e-10):
            break
    mu = _sigmoid(alpha[:, None] + logit[None, :])
    n_g, n_r = hist_g.sum(-1), hist_r.sum(-1)
    score = (hist_g[..., 1] - n_g * mu).sum(-1)
    w = mu * (1 - mu)
    w_g, w_r = (n_g * w).sum(-1), (n_r * w).sum(-1)

    def resid_ss(h: np.ndarray) -> np.ndarray:  # sum (y - mu)^2 over the rows
        return (h[..., 1] * (1 - mu) ** 2 + h[..., 0] * mu**2).sum(-1)

    e_g, e_r = resid_ss(hist_g), resid_ss(hist_r)
    with np.errstate(divide="ignore", invalid="ignore"):
        # At the pooled fit sum_r e = -sum_g e, so the efficient score
        # (W_r sum_g e - W_g sum_r e) / W is sum_g e itself. Its model-based variance
        # W_g W_r / W is exact for calibrated scores; where the scores are too extreme
        # or too timid overall it is too small, and the empirical one (squared
        # residuals in place of W) is not. Taking the larger keeps the test valid.
        tot = w_g + w_r
        model_var = w_g * w_r / tot
        robust_var = (w_r / tot) ** 2 * e_g + (w_g / tot) ** 2 * e_r
        info = np.fmax(model_var, robust_var) * np.asarray(deff, float)
        z = np.where(info > 0, score / np.sqrt(np.where(info > 0, info, 1.0)), 0.0)
    return z, np.minimum(1.0, 2.0 * norm.sf(np.abs(z)))


def _adjust(p: np.ndarray, method: str) -> np.ndarray:
    """Holm (family-wise error) or Benjamini-Hochberg (false discovery rate) adjusted p."""
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    if method == "holm":
        adj = np.maximum.accumulate((m - np.arange(m)) * ranked)
    else:
        adj = np.minimum.accumulate((m / np.arange(1, m + 1) * ranked)[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def adjust_families(p: np.ndarray, secondary: np.ndarray, method: str, share: float
                    ) -> np.ndarray:
    """Adjusted p-values with ``alpha`` split between two families.

    ``secondary`` marks the intersection comparisons; they get ``share`` of alpha
    and the single-attribute comparisons the rest, each corrected within its
    family by ``method``. An adjusted p is the within-family one divided by the
    family's share, so "adjusted p < alpha" is the test at the family's level.
    A family with no tests leaves its share to the other.
    """
    p = np.asarray(p, float)
    secondary = np.asarray(secondary, bool)
    out = np.empty(p.size)
    has = {True: bool(secondary.any()), False: bool((~secondary).any())}
    for fam in (False, True):
        mask = secondary == fam
        if not mask.any():
            continue
        part = share if fam else 1.0 - share
        if not has[not fam]:
            part = 1.0
        out[mask] = np.minimum(1.0, _adjust(p[mask], method) / part) if part > 0 else 1.0
    return out
