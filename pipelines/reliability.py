"""Reliability (calibration) curves and their diagram.

Binning is shared with the ECE in :mod:`pipelines.evaluation`, so a curve and an
ECE computed with the same ``n_bins`` and ``strategy`` describe the same bins:

- ``"uniform"``: ``n_bins`` equal-width bins on [0, 1];
- ``"quantile"``: equal-mass bins whose edges are the sample quantiles of ``p``.

Bins are half-open ``[lo, hi)`` except the last, which is closed, so ``p == 1``
falls in the top bin. Tied scores always share a bin (quantile edges may
coincide, which leaves some bins empty rather than splitting a tie).

matplotlib is imported only by :func:`plot_reliability`, so the numeric part
works without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

__all__ = ["BinStrategy", "ReliabilityCurve", "bin_edges", "bin_index", "plot_reliability",
           "reliability_curve"]

BinStrategy = Literal["uniform", "quantile"]
_STRATEGIES: tuple[str, ...] = get_args(BinStrategy)
_INVALID_STRATEGY = "Unrecognised bin strategy: {0!r}; expected one of {1}"

# Okabe-Ito: distinguishable under the common colour-vision deficiencies. Markers and
# line styles vary too, so curves never differ by colour alone.
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LINESTYLES = ("-", "--", "-.", ":")


def _check_bins(n_bins: int, strategy: str) -> None:
    if strategy not in _STRATEGIES:
        raise ValueError(_INVALID_STRATEGY.format(strategy, _STRATEGIES))
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def bin_edges(p: np.ndarray, n_bins: int = 10, strategy: BinStrategy = "uniform") -> np.ndarray:
    """The ``n_bins + 1`` bin edges, from 0 to 1."""
    _check_bins(n_bins, strategy)
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    p = np.asarray(p, dtype=float)
    if p.size == 0:
        raise ValueError("quantile bins need at least one score, got none")
    edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))
    # Outer edges span [0, 1] so the bins cover every possible probability.
    edges[0], edges[-1] = 0.0, 1.0
    return edges


def bin_index(p: np.ndarray, n_bins: int = 10, strategy: BinStrategy = "uniform") -> np.ndarray:
    """Bin number (0 .. n_bins - 1) of each score."""
    p = np.asarray(p, dtype=float)
    edges = bin_edges(p, n_bins, strategy)
    return np.searchsorted(edges[1:-1], p, side="right").astype(np.intp)


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin mean predicted probability, observed event rate and count.

    Empty bins keep their place with ``count == 0`` and NaN means, so curves with
    the same edges line up; the plot skips them.
    """

    edges: np.ndarray
    mean_predicted: np.ndarray
    observed_frequency: np.ndarray
    counts: np.ndarray
    strategy: BinStrategy

    @property
    def ece(self) -> float:
        """Count-weighted mean |observed - predicted| over the bins (the binned ECE)."""
        total = self.counts.sum()
        if total == 0:
            return float("nan")
        gap = np.abs(self.observed_frequency - self.mean_predicted)
        return float(np.nansum(self.counts * gap) / total)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"bin_low": self.edges[:-1], "bin_high": self.edges[1:],
                             "count": self.counts, "mean_predicted": self.mean_predicted,
                             "observed_frequency": self.observed_frequency})

    def to_dict(self) -> dict[str, Any]:
        def clean(a: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(v) else float(v) for v in a]

        return {"strategy": self.strategy, "edges": clean(self.edges),
                "counts": [int(c) for c in self.counts],
                "mean_predicted": clean(self.mean_predicted),
                "observed_frequency": clean(self.observed_frequency)}


def reliability_curve(y: np.ndarray, p: np.ndarray, n_bins: int = 10,
                      strategy: BinStrategy = "uniform") -> ReliabilityCurve:
    """Bin ``p`` and return each bin's mean prediction, event rate and count.

    Unlike :func:`sklearn.calibration.calibration_curve`, empty bins are kept
    (as NaN) and the counts come back too.
    """
    y = np.asarray(y, dtype=float).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y has {y.size} values but p has {p.size}")
    edges = bin_edges(p, n_bins, strategy)
    idx = np.searchsorted(edges[1:-1], p, side="right")
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=n_bins) / counts
        freq = np.bincount(idx, weights=y, minlength=n_bins) / counts
    return ReliabilityCurve(edges=edges, mean_predicted=mean_p, observed_frequency=freq,
                            counts=counts, strategy=strategy)


def plot_reliability(curves: Mapping[str, ReliabilityCurve], path: str | Path, *,
                     title: str = "Reliability diagram", dpi: int = 150) -> Path:
    """Write a reliability diagram (PNG) with one line per curve and a count histogram.

    The PNG carries a text description of every curve in its metadata, for readers
    who cannot see the figure.
    """
    if not curves:
        raise ValueError("plot_reliability needs at least one curve, got none")
    # Figure + Agg canvas directly: no pyplot global state, no display backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6.0, 7.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax.plot([0, 1], [0, 1], color="0.5", linestyle=":", linewidth=1.2,
            label="Perfect calibration")
    described = []
    width = 0.8 / len(curves)
    for k, (name, curve) in enumerate(curves.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        keep = curve.counts > 0
        ax.plot(curve.mean_predicted[keep], curve.observed_frequency[keep],
                marker=_MARKERS[k % len(_MARKERS)],
                linestyle=_LINESTYLES[k % len(_LINESTYLES)], color=colour,
                label=f"{name} (ECE {curve.ece:.3f})")
        bin_width = np.diff(curve.edges)
        # Side-by-side bars so several models' histograms stay readable.
        hist.bar(curve.edges[:-1] + bin_width * (0.1 + width * k), curve.counts,
                 width=bin_width * width, align="edge", color=colour, label=name,
                 hatch=("", "//", "..", "xx")[k % 4], edgecolor="white")
        pairs = ", ".join(f"{mp:.2f}->{fr:.2f} (n={int(c)})" for mp, fr, c
                          in zip(curve.mean_predicted[keep], curve.observed_frequency[keep],
                                 curve.counts[keep], strict=True))
        described.append(f"{name}: ECE {curve.ece:.3f}; predicted->observed per bin: {pairs}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Observed event frequency")
    ax.set_title(title)
    ax.legend(loc="upper left", frameon=False)
    ax.grid(alpha=0.3)
    hist.set_xlabel("Mean predicted probability")
    hist.set_ylabel("Examples per bin")
    hist.grid(alpha=0.3, axis="y")
    fig.savefig(path, format="png", dpi=dpi,
                metadata={"Title": title, "Description": "; ".join(described)})
    return path
