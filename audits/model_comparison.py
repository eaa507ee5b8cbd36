"""Several models scored on the same rows: metrics with paired patient-bootstrap CIs.

Used by ``clinfuse evaluate --cv`` to put the fused model and its baselines side by
side. Point estimates are :func:`audits._metrics.exact_metrics` (AUROC with ties 1/2,
step-wise AUPRC, Brier, ECE over 10 equal-width bins). Intervals are 95 % percentile
intervals of a patient-level Poisson(1) bootstrap, as in the audit
(:mod:`audits._bootstrap`): a replicate gives every *patient* one weight, counted on
each of that patient's rows, and **every model sees the same weights**, so a
difference between two models (``difference``) is paired. Each model's replicate
histograms come from :meth:`HistogramBootstrap.weighted` on fine equal-mass score bins
(:func:`audits._metrics.make_binning`) and are shifted by ``exact - histogram`` on the
full data, as the audit does, so binning affects only an interval's spread.

Replicates in which the drawn patients have one class only give no AUROC/AUPRC; they
are left out of those percentiles (``n_degenerate`` counts them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from audits._bootstrap import HistogramBootstrap
from audits._metrics import (
    exact_metrics,
    hist_metrics,
    make_binning,
    reliability_curve,
    roc_points,
)

__all__ = ["COMPARED_METRICS", "Interval", "ModelComparison"]

#: The metrics reported for every model.
COMPARED_METRICS = ("auroc", "auprc", "brier", "ece")
_BLOCK = 250  # replicates per weight block: (block, rows) float32 stays small


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile interval."""

    estimate: float
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": _f(self.estimate), "ci": [_f(self.low), _f(self.high)]}


class ModelComparison:
    """Every model's metrics on one set of rows, with paired patient-bootstrap CIs.

    Parameters
    ----------
    y : (n,) array of 0/1
        Labels.
    scores : mapping of name to (n,) array of probabilities
        One score vector per model, on the same rows.
    patient_ids : (n,) array
        Rows of one patient share a bootstrap weight.
    n_boot : int, default=1000
    alpha : float, default=0.05
    seed : int, default=0
        Seeds the bootstrap's own generator (no global state).

    Attributes
    ----------
    points : dict of model -> {metric: float}
    replicates : dict of model -> {metric: (n_boot,) array}
    n_degenerate : int
        Replicates with one class only.
    """

    def __init__(self, y: Any, scores: Mapping[str, Any], patient_ids: Any, *,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> None:
        self.y = np.asarray(y).astype(int)
        n = self.y.size
        if not np.isin(np.unique(self.y), (0, 1)).all():
            raise ValueError("labels must be 0/1")
        if len(np.unique(self.y)) < 2:
            raise ValueError("the rows have one class only; AUROC needs both")
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.scores = {}
        for name, s in scores.items():
            arr = np.asarray(s, dtype=float)
            if arr.shape != (n,) or not np.isfinite(arr).all() or (arr < 0).any() or (
                    arr > 1).any():
                raise ValueError(f"scores of {name!r} must be {n} probabilities in [0, 1]")
            self.scores[name] = arr
        codes, uniques = pd.factorize(pd.Series(np.asarray(patient_ids, dtype=object)))
        if len(codes) != n or (codes < 0).any():
            raise ValueError("every row needs a patient id")
        self.patient = codes.astype(np.int64)
        self.n_patients = len(uniques)
        self.n_boot, self.alpha, self.seed = int(n_boot), float(alpha), int(seed)
        self.points = {name: {m: exact_metrics(s, self.y, 0.5)[m] for m in COMPARED_METRICS}
                       for name, s in self.scores.items()}
        self.replicates, self.n_degenerate = self._bootstrap()

    def _bootstrap(self) -> tuple[dict[str, dict[str, np.ndarray]], int]:
        engines, shifts = {}, {}
        for name, s in self.scores.items():
            binning = make_binning(s, 0.5)
            engine = HistogramBootstrap(cell=np.zeros(s.size, np.int64),
                                        bins=binning.index(s), label=self.y,
                                        patient=self.patient, membership=np.ones((1, 1)),
                                        n_bins=binning.n_bins)
            full = hist_metrics(engine.full[:, None], binning, calibration_fit=False,
                                need=COMPARED_METRICS)
            shifts[name] = {m: self.points[name][m] - float(full[m][0, 0])
                            for m in COMPARED_METRICS}
            engines[name] = (engine, binning)
        rng = np.random.default_rng(self.seed)
        parts: dict[str, dict[str, list[np.ndarray]]] = {
            name: {m: [] for m in COMPARED_METRICS} for name in self.scores}
        degenerate = 0
        done = 0
        while done < self.n_boot:
            block = min(_BLOCK, self.n_boot - done)
            # One Poisson(1) weight per patient, the same for every model: paired.
            w_patient = rng.poisson(1.0, size=(block, self.n_patients)).astype(np.float32)
            w = w_patient[:, self.patient]
            pos = w @ self.y.astype(np.float32)
            degenerate += int(((pos == 0) | (pos == w.sum(axis=1))).sum())
            for name, (engine, binning) in engines.items():
                hist = engine.weighted(w)[0]
                reps = hist_metrics(hist.astype(np.float64), binning, calibration_fit=False,
                                    need=COMPARED_METRICS)
                for m in COMPARED_METRICS:
                    parts[name][m].append(np.asarray(reps[m], np.float64) + shifts[name][m])
            done += block
        return ({name: {m: np.concatenate(v) for m, v in d.items()} for name, d in parts.items()},
                degenerate)

    def _percentiles(self, reps: np.ndarray) -> tuple[float, float]:
        ok = reps[np.isfinite(reps)]
        if ok.size == 0:
            return math.nan, math.nan
        q = 100 * self.alpha / 2
        lo, hi = np.percentile(ok, [q, 100 - q])
        return float(lo), float(hi)

    def interval(self, model: str, metric: str) -> Interval:
        """``metric`` of ``model`` with its bootstrap interval."""
        lo, hi = self._percentiles(self.replicates[model][metric])
        return Interval(self.points[model][metric], lo, hi)

    def difference(self, a: str, b: str, metric: str = "auroc") -> Interval:
        """``metric(a) - metric(b)`` on the same rows and the same patient resamples."""
        lo, hi = self._percentiles(self.replicates[a][metric] - self.replicates[b][metric])
        return Interval(self.points[a][metric] - self.points[b][metric], lo, hi)

    def model_dict(self, model: str) -> dict[str, Any]:
        """``{"auroc": x, "ci": [lo, hi], "auprc": x, "brier": x, "ece": x, "<m>_ci": ...}``
        (``ci`` is the AUROC's)."""
        out: dict[str, Any] = {}
        for m in COMPARED_METRICS:
            iv = self.interval(model, m)
            out[m] = _f(iv.estimate)
            out[f"{m}_ci"] = [_f(iv.low), _f(iv.high)]
        out["ci"] = out["auroc_ci"]
        return out

    def roc(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR) of ``model`` along descending thresholds."""
        return roc_points(self.scores[model], self.y)

    def reliability(self, model: str, n_bins: int = 10
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean score, observed rate, count) per non-empty equal-width bin (the ECE's)."""
        return reliability_curve(self.scores[model], self.y, n_bins)

    def provenance(self) -> dict[str, Any]:
        return {"resampling": "patient Poisson(1) bootstrap, the same weights for every "
                              "model (paired)", "interval": "percentile",
                "n_boot": self.n_boot, "alpha": self.alpha, "seed": self.seed,
                "n_degenerate": self.n_degenerate, "n_rows": int(self.y.size),
                "n_patients": self.n_patients, "n_events": int(self.y.sum())}


def _f(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
