"""Model-agnostic evaluation with patient-level bootstrap CIs, for ``clinfuse evaluate``.

Everything works on arrays: one row per example with its ``label`` (0/1), the
model's ``score`` (a probability) and its ``patient_id``. Nothing here imports the
model code.

Metrics (:data:`METRICS`)
-------------------------
``auroc``
    Area under the ROC curve; tied scores count one half (as in scikit-learn).
``auprc``
    Average precision, scikit-learn's step-wise definition (no interpolation).
``brier``
    Mean squared error of the probability.
``ece``
    Expected calibration error, ``sum_b n_b / n * |mean(y)_b - mean(p)_b|`` over
    ``n_bins`` equal-width bins (see :mod:`pipelines.reliability` for bin edges).
``ece_adaptive``
    The same over equal-mass (quantile) bins.

Bootstrap
---------
Rows of one patient are not independent, so the bootstrap resamples *patients*:
each replicate draws ``n_patients`` patients with replacement and keeps all rows
of every drawn patient. This is implemented as a **multinomial** weight per
patient (how many times it was drawn; exactly the classical cluster bootstrap,
not the Poisson approximation), broadcast to its rows, so a block of replicates
is a weight matrix and every metric is a few vectorised reductions over it.

- Replicates in which the drawn patients have only one class cannot give an
  AUROC; they are redrawn (so the bootstrap is conditional on both classes being
  present) and counted in ``n_degenerate``.
- Intervals are percentile intervals at level ``1 - alpha``. :class:`Estimate`
  also keeps the bootstrap bias and SE and offers the basic (bias-corrected)
  interval, which matters for ECE: the plug-in ECE is biased upwards, so its
  percentile interval sits above zero even for a perfectly calibrated model.
- ECE bin edges are fixed from the full sample (quantile bins included) and
  held across replicates.
- Every model evaluated in one call sees the same replicates, so differences
  between models are paired.

Results are computed once, in the constructor-like functions, and read many
times: :class:`MetricReport`, :class:`PairedDifference`, :class:`AblationTable`
and :class:`PatternECETable` each offer ``to_frame()`` and a JSON-ready
``to_dict()``; :func:`report_to_markdown` renders any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from pipelines.reliability import BinStrategy, bin_index

__all__ = ["METRICS", "AblationRow", "AblationTable", "Estimate", "MetricName", "MetricReport",
           "PairedDifference", "PatternECERow", "PatternECETable", "ablation_table",
           "auprc", "auroc", "brier_score", "ece_by_missingness_pattern", "evaluate",
           "expected_calibration_error", "paired_auroc_difference", "paired_difference",
           "report_to_dict", "report_to_markdown"]

MetricName = Literal["auroc", "auprc", "brier", "ece", "ece_adaptive"]
METRICS: tuple[MetricName, ...] = get_args(MetricName)
AblationKind = Literal["fused", "single", "pair", "without"]
Population = Literal["all", "available"]
_POPULATIONS: tuple[str, ...] = get_args(Population)

_INVALID_METRIC = "Unrecognised metric: {0!r}; expected one of {1}"
_INVALID_POPULATION = "Unrecognised population: {0!r}; expected one of {1}"
_INVALID_STRATEGY = "Unrecognised bin strategy: {0!r}; expected one of {1}"

# Elements per weight block (float64): bounds memory at a few tens of MB whatever n is.
_BLOCK_ELEMENTS = 1 << 21
# Give up when this many times n_boot replicates were drawn without enough usable ones.
_MAX_DRAW_FACTOR = 20


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile bootstrap interval.

    ``bias`` is ``mean(replicates) - point`` and ``se`` their standard deviation;
    both are NaN when no bootstrap was run.
    """

    point: float
    low: float
    high: float
    se: float = math.nan
    bias: float = math.nan

    def covers(self, value: float) -> bool:
        """Whether ``value`` lies in the percentile interval (ends included)."""
        return bool(self.low <= value <= self.high)

    def basic_interval(self, *, lower_bound: float = -math.inf) -> tuple[float, float]:
        """The basic (reverse-percentile) bootstrap interval, clipped at ``lower_bound``.

        It reflects the percentile interval about the point estimate, which corrects
        for bootstrap-estimated bias; use it with ``lower_bound=0`` for ECE.
        """
        return (max(2 * self.point - self.high, lower_bound),
                max(2 * self.point - self.low, lower_bound))

    def to_dict(self) -> dict[str, float | None]:
        return {k: _json_float(v) for k, v in
                (("point", self.point), ("low", self.low), ("high", self.high),
                 ("se", self.se), ("bias", self.bias))}


@dataclass(frozen=True)
class MetricReport:
    """Every metric of :data:`METRICS` for one model, with patient-bootstrap CIs.

    Read a metric with ``report["auroc"]`` (an :class:`Estimate`).
    """

    estimates: Mapping[MetricName, Estimate]
    n_examples: int
    n_patients: int
    n_events: int
    n_boot: int
    n_degenerate: int
    alpha: float
    seed: int
    n_bins: int

    def __getitem__(self, metric: MetricName) -> Estimate:
        if metric not in self.estimates:
            raise KeyError(_INVALID_METRIC.format(metric, tuple(self.estimates)))
        return self.estimates[metric]

    def to_frame(self) -> pd.DataFrame:
        """One row per metric: point, low, high, se, bias."""
        return pd.DataFrame([{"metric": m, **vars(e)} for m, e in self.estimates.items()]
                            ).set_index("metric")

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": {m: e.to_dict() for m, e in self.estimates.items()},
                **self._counts(), **_provenance(self)}

    def _counts(self) -> dict[str, int]:
        return {"n_examples": self.n_examples, "n_patients": self.n_patients,
                "n_events": self.n_events}


@dataclass(frozen=True)
class PairedDifference:
    """``metric(a) - metric(b)`` on the same patient resamples."""

    metric: MetricName
    a: Estimate
    b: Estimate
    difference: Estimate
    n_examples: int
    n_patients: int
    n_boot: int
    n_degenerate: int
    alpha: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "a": self.a.to_dict(), "b": self.b.to_dict(),
                "difference": self.difference.to_dict(), "n_examples": self.n_examples,
                "n_patients": self.n_patients, **_provenance(self)}

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"model": k, **vars(e)} for k, e in
                             (("a", self.a), ("b", self.b), ("a - b", self.difference))]
                            ).set_index("model")


@dataclass(frozen=True)
class AblationRow:
    """One modality subset of the ablation table.

    ``kinds`` lists every role the subset plays (with three modalities a pair is
    also "one removed"); ``delta_auroc`` is ``AUROC(row) - AUROC(fused)`` on the
    same examples and resamples, None on the fused row.
    """

    name: str
    modalities: frozenset[str]
    kinds: tuple[AblationKind, ...]
    removed: tuple[str, ...]
    coverage: float
    report: MetricReport
    delta_auroc: Estimate | None


@dataclass(frozen=True)
class AblationTable:
    """HAIM-style ablation: the fused model, single modalities, pairs, one removed."""

    rows: tuple[AblationRow, ...]
    modalities: tuple[str, ...]
    population: Population
    n_boot: int
    alpha: float
    seed: int
    n_bins: int

    def __getitem__(self, name: str) -> AblationRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no ablation row {name!r}; rows are {[r.name for r in self.rows]}")

    def to_frame(self) -> pd.DataFrame:
        """One row per subset; ``<metric>``, ``<metric>_low``, ``<metric>_high`` columns."""
        records = []
        for row in self.rows:
            rec: dict[str, Any] = {"name": row.name, "kinds": ",".join(row.kinds),
                                   "removed": ",".join(row.removed), "coverage": row.coverage,
                                   **row.report._counts()}
            rec.update(_flat_estimates(row.report.estimates))
            delta = row.delta_auroc or Estimate(math.nan, math.nan, math.nan)
            rec.update({"delta_auroc": delta.point, "delta_auroc_low": delta.low,
                        "delta_auroc_high": delta.high})
            records.append(rec)
        return pd.DataFrame(records).set_index("name")

    def to_dict(self) -> dict[str, Any]:
        rows = [{"name": r.name, "modalities": sorted(r.modalities), "kinds": list(r.kinds),
                 "removed": list(r.removed), "coverage": _json_float(r.coverage),
                 **r.report.to_dict(),
                 "delta_auroc": None if r.delta_auroc is None else r.delta_auroc.to_dict()}
                for r in self.rows]
        return {"modalities": list(self.modalities), "population": self.population,
                "rows": rows, **_provenance(self)}


@dataclass(frozen=True)
class PatternECERow:
    """ECE for the examples with one pattern of present modalities.

    ``ece`` is None when the pattern has fewer than ``min_n`` examples.
    """

    pattern: str
    present: frozenset[str]
    n_examples: int
    n_patients: int
    n_events: int
    mean_predicted: float
    observed_rate: float
    ece: Estimate | None


@dataclass(frozen=True)
class PatternECETable:
    """ECE per observed missingness pattern, largest pattern first."""

    rows: tuple[PatternECERow, ...]
    modalities: tuple[str, ...]
    strategy: BinStrategy
    min_n: int
    n_boot: int
    alpha: float
    seed: int
    n_bins: int

    def to_frame(self) -> pd.DataFrame:
        records = []
        for r in self.rows:
            ece = r.ece or Estimate(math.nan, math.nan, math.nan)
            records.append({"pattern": r.pattern, "n_examples": r.n_examples,
                            "n_patients": r.n_patients, "n_events": r.n_events,
                            "mean_predicted": r.mean_predicted, "observed_rate": r.observed_rate,
                            "ece": ece.point, "ece_low": ece.low, "ece_high": ece.high})
        return pd.DataFrame(records).set_index("pattern")

    def to_dict(self) -> dict[str, Any]:
        rows = [{"pattern": r.pattern, "present": sorted(r.present),
                 "n_examples": r.n_examples, "n_patients": r.n_patients,
                 "n_events": r.n_events, "mean_predicted": _json_float(r.mean_predicted),
                 "observed_rate": _json_float(r.observed_rate),
                 "ece": None if r.ece is None else r.ece.to_dict()} for r in self.rows]
        return {"modalities": list(self.modalities), "strategy": self.strategy,
                "min_n": self.min_n, "rows": rows, **_provenance(self)}


def _provenance(result: Any) -> dict[str, Any]:
    """How the CIs were made, so a committed table can be reproduced."""
    out = {"resampling": "patient cluster bootstrap, multinomial weights",
           "interval": "percentile", "n_boot": result.n_boot, "alpha": result.alpha,
           "seed": result.seed}
    if hasattr(result, "n_degenerate"):
        out["n_degenerate"] = result.n_degenerate
    if hasattr(result, "n_bins"):
        out["n_bins"] = result.n_bins
    return out


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _flat_estimates(estimates: Mapping[MetricName, Estimate]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m, e in estimates.items():
        out.update({m: e.point, f"{m}_low": e.low, f"{m}_high": e.high})
    return out


# --------------------------------------------------------------------------- validation


def _labels(y: Any) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    values = np.unique(arr)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {values[:10].tolist()}")
    return arr.astype(float)


def _scores(p: Any, n: int, what: str = "p") -> np.ndarray:
    arr = np.asarray(p, dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},) like the labels, got {arr.shape}")
    bad = ~np.isfinite(arr) | (arr < 0) | (arr > 1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} must be probabilities in [0, 1]; {int(bad.sum())} are not, "
                         f"first at row {first}: {float(arr[first])!r}")
    return arr


def _patients(patient_ids: Any, n: int) -> tuple[np.ndarray, int]:
    ids = pd.Series(np.asarray(patient_ids, dtype=object))
    if len(ids) != n:
        raise ValueError(f"patient_ids has {len(ids)} values but there are {n} labels")
    if ids.isna().any():
        raise ValueError(f"patient_ids has {int(ids.isna().sum())} missing values; "
                         "every example needs a patient")
    codes, uniques = pd.factorize(ids)
    return codes.astype(np.intp), len(uniques)


def _check_common(n_boot: int, alpha: float, n_bins: int) -> None:
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")


# --------------------------------------------------------------------------- metrics engine


class _Metrics:
    """Weighted metrics of one score vector; the weights are a (replicates, rows) matrix.

    Sorting and binning depend only on the scores, so they are done once here and
    every block of replicates is reductions and one matrix product.
    """

    def __init__(self, y: np.ndarray, p: np.ndarray, n_bins: int, *,
                 discrimination: bool = True) -> None:
        self.discrimination = discrimination
        if discrimination:
            self.order = np.argsort(p, kind="stable")
            ps = p[self.order]
            # Start of each run of tied scores: ties are one ROC/PR threshold.
            self.starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
            self.y_sorted = y[self.order]
        n = len(y)
        rows = np.arange(n)
        # Signed residual per bin: ECE = sum_b |sum_i w_i (y_i - p_i) [i in b]| / sum_i w_i.
        design = np.zeros((n, 2 * n_bins))
        design[rows, bin_index(p, n_bins, "uniform")] = y - p
        design[rows, n_bins + bin_index(p, n_bins, "quantile")] = y - p
        self.design = design
        self.sq_error = (p - y) ** 2
        self.n_bins = n_bins

    def __call__(self, w: np.ndarray) -> dict[MetricName, np.ndarray]:
        total = w.sum(axis=1)
        residual = np.abs(w @ self.design)
        out: dict[MetricName, np.ndarray] = {
            "brier": w @ self.sq_error / total,
            "ece": residual[:, :self.n_bins].sum(axis=1) / total,
            "ece_adaptive": residual[:, self.n_bins:].sum(axis=1) / total,
        }
        if self.discrimination:
            out["auroc"], out["auprc"] = self._ranking(w)
        return out

    def _ranking(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ws = w[:, self.order]
        pos = ws * self.y_sorted
        # Weighted positives / negatives at each distinct score, ascending.
        tp = np.add.reduceat(pos, self.starts, axis=1)
        fp = np.add.reduceat(ws - pos, self.starts, axis=1)
        n_pos, n_neg = tp.sum(axis=1), fp.sum(axis=1)
        below = np.cumsum(fp, axis=1) - fp
        with np.errstate(invalid="ignore", divide="ignore"):
            roc = (tp * (below + 0.5 * fp)).sum(axis=1) / (n_pos * n_neg)
            # Average precision: thresholds from the top score down.
            tp_desc, fp_desc = tp[:, ::-1], fp[:, ::-1]
            ctp = np.cumsum(tp_desc, axis=1)
            called = ctp + np.cumsum(fp_desc, axis=1)
            precision = np.where(called > 0, ctp / called, 0.0)
            ap = (tp_desc * precision).sum(axis=1) / n_pos
        return roc, ap


@dataclass(frozen=True)
class _Boot:
    """Point estimates and replicates for S score vectors on shared resamples."""

    point: list[dict[MetricName, float]]
    reps: list[dict[MetricName, np.ndarray]]
    n_boot: int
    n_degenerate: int


def _run_bootstrap(y: np.ndarray, scores: Sequence[np.ndarray], patient: np.ndarray,
                   n_patients: int, *, n_boot: int, seed: int, n_bins: int,
                   discrimination: bool = True) -> _Boot:
    n = len(y)
    engines = [_Metrics(y, s, n_bins, discrimination=discrimination) for s in scores]
    ones = np.ones((1, n))
    point = [{m: float(v[0]) for m, v in e(ones).items()} for e in engines]
    rng = np.random.default_rng(seed)
    pos = np.bincount(patient, weights=y, minlength=n_patients)
    neg = np.bincount(patient, minlength=n_patients) - pos
    if discrimination and (pos.sum() == 0 or neg.sum() == 0):
        raise ValueError(f"labels hold one class only ({int(pos.sum())} events in {n} "
                         "examples); AUROC and AUPRC need both")
    block = max(1, min(n_boot, _BLOCK_ELEMENTS // max(n, n_patients)))
    kept: list[list[dict[MetricName, np.ndarray]]] = [[] for _ in engines]
    n_kept = n_drawn = n_degenerate = 0
    while n_kept < n_boot:
        if n_drawn >= _MAX_DRAW_FACTOR * n_boot:
            raise ValueError(f"only {n_kept} of {n_drawn} patient resamples held both classes "
                             f"({int((pos > 0).sum())} of {n_patients} patients have an "
                             "event); too few patients for a bootstrap CI, use n_boot=0")
        size = min(block, n_boot - n_kept)
        draws = rng.integers(0, n_patients, size=(size, n_patients))
        # Row r of `counts` is one multinomial draw: times each patient was picked.
        offsets = (np.arange(size) * n_patients)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=size * n_patients
                             ).reshape(size, n_patients).astype(float)
        n_drawn += size
        if discrimination:
            usable = (counts @ pos > 0) & (counts @ neg > 0)
            n_degenerate += int((~usable).sum())
            counts = counts[usable]
        if not len(counts):
            continue
        w = counts[:, patient]
        for store, engine in zip(kept, engines, strict=True):
            store.append(engine(w))
        n_kept += len(counts)
    reps = [{m: np.concatenate([blk[m] for blk in store]) if store else np.empty(0)
             for m in point[0]} for store in kept]
    return _Boot(point=point, reps=reps, n_boot=n_boot, n_degenerate=n_degenerate)


def _estimate(point: float, reps: np.ndarray, alpha: float) -> Estimate:
    if reps.size == 0:
        return Estimate(point, math.nan, math.nan)
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return Estimate(point=point, low=float(low), high=float(high),
                    se=float(reps.std(ddof=1)) if reps.size > 1 else math.nan,
                    bias=float(reps.mean() - point))


def _report(boot: _Boot, s: int, *, y: np.ndarray, n_patients: int, alpha: float, seed: int,
            n_bins: int) -> MetricReport:
    estimates = {m: _estimate(boot.point[s][m], boot.reps[s][m], alpha)
                 for m in METRICS if m in boot.point[s]}
    return MetricReport(estimates=estimates, n_examples=len(y), n_patients=n_patients,
                        n_events=int(y.sum()), n_boot=boot.n_boot,
                        n_degenerate=boot.n_degenerate, alpha=alpha, seed=seed, n_bins=n_bins)


def _difference(boot: _Boot, a: int, b: int, metric: MetricName, alpha: float) -> Estimate:
    return _estimate(boot.point[a][metric] - boot.point[b][metric],
                     boot.reps[a][metric] - boot.reps[b][metric], alpha)


# --------------------------------------------------------------------------- point metrics


def auroc(y: Any, p: Any) -> float:
    """Area under the ROC curve (ties count one half)."""
    yy = _labels(y)
    return _point(yy, _scores(p, len(yy)), "auroc")


def auprc(y: Any, p: Any) -> float:
    """Average precision (scikit-learn's definition)."""
    yy = _labels(y)
    return _point(yy, _scores(p, len(yy)), "auprc")


def brier_score(y: Any, p: Any) -> float:
    """Mean squared error of the probabilities."""
    yy = _labels(y)
    return _point(yy, _scores(p, len(yy)), "brier")


def expected_calibration_error(y: Any, p: Any, n_bins: int = 10,
                               strategy: BinStrategy = "uniform") -> float:
    """Binned ECE: ``sum_b n_b / n * |mean(y)_b - mean(p)_b|``.

    ``strategy="uniform"`` uses equal-width bins, ``"quantile"`` equal-mass bins.
    """
    if strategy not in get_args(BinStrategy):
        raise ValueError(_INVALID_STRATEGY.format(strategy, get_args(BinStrategy)))
    yy = _labels(y)
    return _point(yy, _scores(p, len(yy)), "ece" if strategy == "uniform" else "ece_adaptive",
                  n_bins=n_bins)


def _point(y: np.ndarray, p: np.ndarray, metric: MetricName, n_bins: int = 10) -> float:
    if len(y) == 0:
        raise ValueError("no examples to evaluate")
    engine = _Metrics(y, p, n_bins, discrimination=metric in ("auroc", "auprc"))
    return float(engine(np.ones((1, len(y))))[metric][0])


# --------------------------------------------------------------------------- public API


def evaluate(y: Any, p: Any, patient_ids: Any, *, n_boot: int = 1000, seed: int = 0,
             alpha: float = 0.05, n_bins: int = 10) -> MetricReport:
    """All of :data:`METRICS` for one model, with patient-level bootstrap CIs.

    Parameters
    ----------
    y : array of 0/1, shape (n,)
        Labels, one per example.
    p : array of float, shape (n,)
        Predicted probabilities.
    patient_ids : array, shape (n,)
        Patient of each example; the bootstrap resamples these.
    n_boot : int, default 1000
        Usable replicates (one-class resamples are redrawn); 0 skips the CIs.
    seed : int, default 0
    alpha : float, default 0.05
        The intervals have level ``1 - alpha``.
    n_bins : int, default 10
        Bins for both ECE variants.

    Raises
    ------
    ValueError
        On malformed inputs, one-class labels, or too few patients with events to
        draw ``n_boot`` two-class resamples.
    """
    _check_common(n_boot, alpha, n_bins)
    yy = _labels(y)
    pp = _scores(p, len(yy))
    patient, n_patients = _patients(patient_ids, len(yy))
    boot = _run_bootstrap(yy, [pp], patient, n_patients, n_boot=n_boot, seed=seed,
                          n_bins=n_bins)
    return _report(boot, 0, y=yy, n_patients=n_patients, alpha=alpha, seed=seed, n_bins=n_bins)


def paired_difference(y: Any, p_a: Any, p_b: Any, patient_ids: Any, *,
                      metric: MetricName = "auroc", n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05, n_bins: int = 10) -> PairedDifference:
    """``metric(a) - metric(b)`` with a paired patient-level bootstrap CI.

    Both models are scored on the same resamples, so shared patient-level noise
    cancels and the interval is narrower than comparing two separate CIs.
    """
    if metric not in METRICS:
        raise ValueError(_INVALID_METRIC.format(metric, METRICS))
    _check_common(n_boot, alpha, n_bins)
    yy = _labels(y)
    pa, pb = _scores(p_a, len(yy), "p_a"), _scores(p_b, len(yy), "p_b")
    patient, n_patients = _patients(patient_ids, len(yy))
    boot = _run_bootstrap(yy, [pa, pb], patient, n_patients, n_boot=n_boot, seed=seed,
                          n_bins=n_bins)
    return PairedDifference(
        metric=metric, a=_estimate(boot.point[0][metric], boot.reps[0][metric], alpha),
        b=_estimate(boot.point[1][metric], boot.reps[1][metric], alpha),
        difference=_difference(boot, 0, 1, metric, alpha), n_examples=len(yy),
        n_patients=n_patients, n_boot=n_boot, n_degenerate=boot.n_degenerate, alpha=alpha,
        seed=seed)


def paired_auroc_difference(y: Any, p_a: Any, p_b: Any, patient_ids: Any, *,
                            n_boot: int = 1000, seed: int = 0,
                            alpha: float = 0.05) -> PairedDifference:
    """``AUROC(a) - AUROC(b)`` with a paired patient-level bootstrap CI."""
    return paired_difference(y, p_a, p_b, patient_ids, metric="auroc", n_boot=n_boot,
                             seed=seed, alpha=alpha)


def _availability(availability: pd.DataFrame, modalities: Sequence[str], n: int) -> np.ndarray:
    missing = [m for m in modalities if m not in availability.columns]
    if missing:
        raise KeyError(f"availability has no column for modalities {missing}; "
                       f"columns are {list(availability.columns)}")
    if len(availability) != n:
        raise ValueError(f"availability has {len(availability)} rows but there are {n} labels")
    frame = availability[list(modalities)]
    not_bool = [c for c in frame.columns if not pd.api.types.is_bool_dtype(frame[c])]
    if not_bool:
        raise ValueError(f"availability columns {not_bool} are not boolean; "
                         "pass True where the modality is present")
    return frame.to_numpy(dtype=bool)


def _subset_name(subset: frozenset[str], modalities: Sequence[str]) -> str:
    return "+".join(m for m in modalities if m in subset)


def ablation_table(y: Any, patient_ids: Any, predict: Callable[[frozenset[str]], Any],
                   modalities: Sequence[str], availability: pd.DataFrame, *,
                   population: Population = "all", n_boot: int = 1000, seed: int = 0,
                   alpha: float = 0.05, n_bins: int = 10) -> AblationTable:
    """Evaluate the fused model with modalities withheld at inference (HAIM-style).

    Rows, in order and without repeating a subset: the fused model (all
    modalities, named ``"fused"``), each single modality, each pair, and each
    modality removed. ``predict(subset)`` must return the fused model's
    probabilities with only ``subset`` allowed (the rest masked as missing).

    Parameters
    ----------
    population : {"all", "available"}, default "all"
        ``"all"``: every row is scored on every example (a withheld modality and a
        missing one look alike to the model), and all rows share resamples.
        ``"available"``: each row is scored only on examples where every modality
        in its subset is present (the fused row on complete cases), and its
        ``delta_auroc`` compares with the fused model on those same examples.

    Notes
    -----
    ``coverage`` is the fraction of all examples with every modality of the
    subset present. ``delta_auroc = AUROC(row) - AUROC(fused)``: negative means
    the row does worse than the fused model.
    """
    if population not in _POPULATIONS:
        raise ValueError(_INVALID_POPULATION.format(population, _POPULATIONS))
    _check_common(n_boot, alpha, n_bins)
    mods = tuple(modalities)
    if not mods or len(set(mods)) != len(mods):
        raise ValueError(f"modalities must be non-empty and distinct, got {list(mods)}")
    yy = _labels(y)
    patient_all, n_patients_all = _patients(patient_ids, len(yy))
    present = _availability(availability, mods, len(yy))
    full = frozenset(mods)

    # Subsets in table order; a subset reached twice gets a second kind, not a second row.
    kinds: dict[frozenset[str], list[AblationKind]] = {full: ["fused"]}
    planned: list[tuple[AblationKind, frozenset[str]]] = [("single", frozenset({m})) for m in mods]
    planned += [("pair", frozenset(c)) for c in combinations(mods, 2)]
    planned += [("without", full - {m}) for m in mods if len(mods) > 1]
    for kind, subset in planned:
        if kind not in kinds.setdefault(subset, []):
            kinds[subset].append(kind)

    preds: dict[frozenset[str], np.ndarray] = {}
    for subset in kinds:
        try:
            preds[subset] = _scores(predict(subset), len(yy), f"predict({sorted(subset)})")
        except ValueError as e:
            name = "fused" if subset == full else _subset_name(subset, mods)
            raise ValueError(f"ablation row {name}: {e}") from e

    subsets = list(kinds)
    masks = {s: np.asarray(present[:, [mods.index(m) for m in mods if m in s]].all(axis=1),
                           dtype=bool) for s in subsets}
    rows: list[AblationRow] = []
    if population == "all":
        boot = _run_bootstrap(yy, [preds[s] for s in subsets], patient_all, n_patients_all,
                              n_boot=n_boot, seed=seed, n_bins=n_bins)
        for i, s in enumerate(subsets):
            report = _report(boot, i, y=yy, n_patients=n_patients_all, alpha=alpha, seed=seed,
                             n_bins=n_bins)
            delta = None if i == 0 else _difference(boot, i, 0, "auroc", alpha)
            rows.append(_ablation_row(s, kinds[s], mods, masks[s], report, delta))
    else:
        for i, s in enumerate(subsets):
            keep = masks[s]
            if not keep.any():
                raise ValueError(f"no example has all of {sorted(s)} present; "
                                 "use population='all'")
            patient, n_pat = _patients(patient_all[keep], int(keep.sum()))
            scores = [preds[s]] if i == 0 else [preds[s], preds[full]]
            boot = _run_bootstrap(yy[keep], [sc[keep] for sc in scores], patient, n_pat,
                                  n_boot=n_boot, seed=seed, n_bins=n_bins)
            report = _report(boot, 0, y=yy[keep], n_patients=n_pat, alpha=alpha, seed=seed,
                             n_bins=n_bins)
            delta = None if i == 0 else _difference(boot, 0, 1, "auroc", alpha)
            rows.append(_ablation_row(s, kinds[s], mods, masks[s], report, delta))
    return AblationTable(rows=tuple(rows), modalities=mods, population=population,
                         n_boot=n_boot, alpha=alpha, seed=seed, n_bins=n_bins)


def _ablation_row(subset: frozenset[str], kinds: list[AblationKind], mods: tuple[str, ...],
                  mask: np.ndarray, report: MetricReport, delta: Estimate | None) -> AblationRow:
    name = "fused" if "fused" in kinds else _subset_name(subset, mods)
    return AblationRow(name=name, modalities=subset, kinds=tuple(kinds),
                       removed=tuple(m for m in mods if m not in subset),
                       coverage=float(mask.mean()), report=report, delta_auroc=delta)


def ece_by_missingness_pattern(y: Any, p: Any, availability: pd.DataFrame, patient_ids: Any,
                               *, modalities: Sequence[str] | None = None, min_n: int = 100,
                               strategy: BinStrategy = "uniform", n_bins: int = 10,
                               n_boot: int = 1000, seed: int = 0,
                               alpha: float = 0.05) -> PatternECETable:
    """ECE (with patient-bootstrap CI) for each observed pattern of present modalities.

    A pattern is named by its present modalities joined with ``+`` (``"none"`` when
    nothing is present). Patterns with fewer than ``min_n`` examples are listed
    with their counts but no ECE: binned ECE on a handful of examples is mostly
    noise. One-class patterns are fine: ECE does not need both classes.
    """
    if strategy not in get_args(BinStrategy):
        raise ValueError(_INVALID_STRATEGY.format(strategy, get_args(BinStrategy)))
    _check_common(n_boot, alpha, n_bins)
    if min_n < 1:
        raise ValueError(f"min_n must be >= 1, got {min_n}")
    yy = _labels(y)
    pp = _scores(p, len(yy))
    patient_all, _ = _patients(patient_ids, len(yy))
    mods = tuple(availability.columns if modalities is None else modalities)
    present = _availability(availability, mods, len(yy))
    keys: list[Hashable] = [tuple(row) for row in present]
    codes, patterns = pd.factorize(pd.Series(keys, dtype=object))
    metric: MetricName = "ece" if strategy == "uniform" else "ece_adaptive"
    rows = []
    for k, pattern in enumerate(patterns):
        keep = codes == k
        on = frozenset(m for m, flag in zip(mods, pattern, strict=True) if flag)
        patient, n_pat = _patients(patient_all[keep], int(keep.sum()))
        yk, pk = yy[keep], pp[keep]
        ece = None
        if keep.sum() >= min_n:
            boot = _run_bootstrap(yk, [pk], patient, n_pat, n_boot=n_boot, seed=seed,
                                  n_bins=n_bins, discrimination=False)
            ece = _estimate(boot.point[0][metric], boot.reps[0][metric], alpha)
        rows.append(PatternECERow(pattern=_subset_name(on, mods) or "none", present=on,
                                  n_examples=int(keep.sum()), n_patients=n_pat,
                                  n_events=int(yk.sum()), mean_predicted=float(pk.mean()),
                                  observed_rate=float(yk.mean()), ece=ece))
    rows.sort(key=lambda r: (-r.n_examples, r.pattern))
    return PatternECETable(rows=tuple(rows), modalities=mods, strategy=strategy, min_n=min_n,
                           n_boot=n_boot, alpha=alpha, seed=seed, n_bins=n_bins)


# --------------------------------------------------------------------------- formatting

Result = MetricReport | PairedDifference | AblationTable | PatternECETable


def report_to_dict(result: Result) -> dict[str, Any]:
    """JSON-ready dict (NaN becomes None) of any evaluation result."""
    return result.to_dict()


def _fmt(e: Estimate | None, digits: int) -> str:
    if e is None or not math.isfinite(e.point):
        return "n/a"
    if not math.isfinite(e.low):
        return f"{e.point:.{digits}f}"
    return f"{e.point:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _footer(result: Result) -> str:
    level = round(100 * (1 - result.alpha), 1)
    text = (f"{level:g}% percentile intervals from {result.n_boot} patient-level bootstrap "
            f"resamples (multinomial patient weights), seed {result.seed}")
    n_degenerate = getattr(result, "n_degenerate", 0)
    if n_degenerate:
        text += f"; {n_degenerate} one-class resamples redrawn"
    return text + "."


def report_to_markdown(result: Result, *, digits: int = 3) -> str:
    """A Markdown table of any evaluation result, with a footnote on the CI method."""
    if isinstance(result, MetricReport):
        body = [[m, _fmt(e, digits)] for m, e in result.estimates.items()]
        head = (f"n = {result.n_examples} examples, {result.n_patients} patients, "
                f"{result.n_events} events")
        return "\n\n".join([head, _table(["metric", "estimate [CI]"], body), _footer(result)])
    if isinstance(result, PairedDifference):
        body = [[name, _fmt(e, digits)] for name, e in
                (("model a", result.a), ("model b", result.b), ("a - b", result.difference))]
        return "\n\n".join([_table([result.metric, "estimate [CI]"], body), _footer(result)])
    if isinstance(result, AblationTable):
        header = ["modalities", "removed", "coverage", "n", *METRICS, "ΔAUROC vs fused"]
        body = [[r.name, ",".join(r.removed) or "-", f"{r.coverage:.2f}",
                 str(r.report.n_examples), *(_fmt(r.report[m], digits) for m in METRICS),
                 "-" if r.delta_auroc is None else _fmt(r.delta_auroc, digits)]
                for r in result.rows]
        return "\n\n".join([_table(header, body), _footer(result)])
    if isinstance(result, PatternECETable):
        header = ["present", "n", "patients", "events", "mean p", "event rate",
                  f"ECE ({result.strategy}, {result.n_bins} bins)"]
        body = [[r.pattern, str(r.n_examples), str(r.n_patients), str(r.n_events),
                 f"{r.mean_predicted:.{digits}f}", f"{r.observed_rate:.{digits}f}",
                 _fmt(r.ece, digits) if r.ece else f"n < {result.min_n}"]
                for r in result.rows]
        return "\n\n".join([_table(header, body), _footer(result)])
    raise TypeError(f"report_to_markdown cannot format {type(result).__name__}")
