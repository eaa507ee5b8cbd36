"""``AuditFrame``: every group metric, disparity, CI and flag, computed once.

Modelled on fairlearn's ``MetricFrame``: the keyword-only constructor computes
everything; ``overall`` and ``by_group`` are properties; ``difference()`` and
``ratio()`` are lookups with ``Literal`` options; intervals come from the
parallel ``*_ci`` methods, so turning them on never changes the main results.

Groups are the overall population, each level of each sensitive attribute and
(by default) each pairwise intersection. Point estimates are exact, from the
rows. Intervals are 95 % percentile intervals of a patient-level Poisson
bootstrap over (finest intersection x score bin x label) histograms (see
:mod:`audits._bootstrap`), shifted by ``exact - histogram`` on the full data so
binning cannot move their centre. Groups smaller than ``min_group_size`` are
suppressed everywhere ("insufficient data"), and so are the groups and missing-data
counts that would let one work them out by subtraction (complementary suppression,
decided once in :mod:`audits.suppression`).

Examples
--------
>>> import numpy as np, pandas as pd
>>> rng = np.random.default_rng(0)
>>> s = rng.random(400)
>>> df = pd.DataFrame({"patient_id": np.arange(400), "score": s,
...                    "label": (rng.random(400) < s).astype(int),
...                    "sex": rng.choice(["female", "male"], 400)})
>>> audit = AuditFrame(scores=df, sensitive=["sex"], threshold=0.5, n_boot=50)
>>> round(float(audit.overall["selection_rate"]), 3)
0.492
>>> audit.difference("tpr").index.tolist()
[('sex', 'female')]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from audits._bootstrap import HistogramBootstrap
from audits._inference import (
    adjust_families,
    calibration_intercept_test,
    design_effect,
    rate_equality_test,
    rate_ratio_test,
)
from audits._metrics import METRICS, Binning, _logit, exact_metrics, hist_metrics, make_binning
from audits.suppression import Margin, complementary_suppression
from audits.table import MODALITY_COLUMNS, AuditInputError, ScoreTable, load_score_table

__all__ = ["INSUFFICIENT", "AuditFrame", "FlagRules"]

INSUFFICIENT = "insufficient data"
CompareMethod = Literal["to_reference", "between_groups", "to_overall"]
Multiplicity = Literal["holm", "bh"]
_COMPARE: tuple[str, ...] = get_args(CompareMethod)
_MULTIPLICITY: tuple[str, ...] = get_args(Multiplicity)
_INVALID_COMPARE_METHOD = "Unrecognised comparison method: {0!r}; expected one of {1}"
_INVALID_METRIC = "Unrecognised metric: {0!r}; expected one of {1}"
_INVALID_MULTIPLICITY = "Unrecognised multiplicity correction: {0!r}; expected one of {1}"

# Metrics that need both outcome classes in a group (else "undefined").
_TWO_CLASS = {"auroc", "auprc", "calibration_intercept", "calibration_slope"}
#: What an event-conditional metric's denominator counts (see ``min_events``).
_EVENT_DENOMINATOR = {"tpr": "events", "fnr": "events", "fpr": "non-events",
                      "ppv": "flagged", "npv": "unflagged", "auroc": "of each class",
                      "auprc": "of each class", "calibration_intercept": "of each class",
                      "calibration_slope": "of each class"}
_MISSING_PERF = ("auroc", "brier", "calibration_in_the_large", "tpr")


@dataclass(frozen=True)
class FlagRules:
    """When a disparity is flagged. Every flag also needs the multiplicity-adjusted test.

    ``min_gap`` maps a metric to the smallest |difference| worth flagging; a
    flag needs the point estimate beyond it *and* a 95 % CI excluding 0 *and*
    an adjusted p-value below ``alpha``. Selection rate uses the four-fifths
    rule instead: flagged only when the whole CI of the ratio lies below
    ``four_fifths`` (or above its inverse). Calibration is judged on the
    calibration intercept (log-odds; 0.1 is about a 10 % relative error in the
    odds), whose test has power where an ECE gap has none (see
    :mod:`audits._inference`).

    ``multiplicity`` (default Holm: the chance of *any* false flag stays at
    ``alpha``) is applied separately to single-attribute comparisons, at
    ``(1 - intersection_share) alpha``, and to intersection comparisons, at
    ``intersection_share alpha``.
    """

    four_fifths: float = 0.8
    min_gap: Mapping[str, float] = field(default_factory=lambda: {
        "tpr": 0.1, "fpr": 0.1, "ppv": 0.1, "calibration_intercept": 0.1,
        "missing_rate": 0.05})
    alpha: float = 0.05
    multiplicity: Multiplicity = "holm"
    intersection_share: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["min_gap"] = dict(self.min_gap)
        return out


#: Disparity families of the issue, each a metric compared with the reference group.
FAMILIES: dict[str, tuple[str, ...]] = {
    "demographic parity": ("selection_rate",),
    "equalized odds": ("tpr", "fpr"),  # reported separately: opposite gaps must not cancel
    "equal opportunity": ("tpr",),
    "predictive parity": ("ppv",),
    "calibration": ("calibration_in_the_large", "calibration_intercept", "calibration_slope",
                    "ece"),
    "modality missingness": ("missing_rate",),
}
# Metrics that enter the multiplicity family and can raise flags. Calibration is tested
# on the intercept (log-odds), not on calibration-in-the-large or ECE: see _inference.
_FLAGGED = ("selection_rate", "tpr", "fpr", "ppv", "calibration_intercept", "missing_rate")


@dataclass(frozen=True)
class Group:
    """One audited group: ``dimension`` attributes set to ``levels``; () is everyone."""

    dimension: tuple[str, ...]
    levels: tuple[str, ...]

    @property
    def dim_name(self) -> str:
        return " x ".join(self.dimension) if self.dimension else "overall"

    @property
    def name(self) -> str:
        return " & ".join(self.levels) if self.levels else "all patients"

    @property
    def key(self) -> tuple[str, str]:
        return self.dim_name, self.name


class AuditFrame:
    """Group metrics, disparities, missingness and flags of one score table.

    Parameters
    ----------
    scores : ScoreTable or DataFrame
        A checked table (see :func:`audits.table.load_score_table`) or a frame
        with ``patient_id``, ``score``, ``label`` and the sensitive columns.
    sensitive : list of str, optional
        Attributes to audit (needed for a DataFrame without a ScoreTable).
    threshold : float, optional
        Decision threshold (needed for a plain DataFrame).
    intersections : int, default 2
        1: single attributes only; 2: also every pair of attributes.
    reference : dict, optional
        Reference level per attribute; default the largest group.
    min_group_size : int, default 30
        Smaller groups are reported as "insufficient data" and never compared.
    min_events : int, default 10
        Event-conditional metrics need this many rows in their denominator: TPR/FNR
        need positives, FPR negatives, PPV flagged and NPV unflagged patients,
        AUROC/AUPRC/calibration fit both classes. Below it the metric is
        "insufficient data" and its comparisons are not tested.
    n_boot : int, default 1000
        Bootstrap replicates. ``n_bins`` (>= 1000) fine score bins.
    rules : FlagRules, optional
    seed : int, default 0
    """

    def __init__(self, *, scores: ScoreTable | pd.DataFrame,
                 sensitive: Sequence[str] | None = None, threshold: float | None = None,
                 intersections: int = 2, reference: Mapping[str, str] | None = None,
                 min_group_size: int = 30, min_events: int = 10, n_boot: int = 1000,
                 n_bins: int = 1000,
                 n_ece_bins: int = 10, rules: FlagRules | None = None, seed: int = 0,
                 ci_level: float = 0.95) -> None:
        if isinstance(scores, pd.DataFrame):
            scores = load_score_table(scores, sensitive=sensitive,
                                      threshold=0.5 if threshold is None else threshold)
        elif threshold is not None:
            scores.threshold = float(threshold)
        if intersections not in (1, 2):
            raise ValueError(f"intersections must be 1 or 2, got {intersections!r}")
        if n_boot < 100:
            # Tails of a percentile interval need replicates; fewer is only for doctests.
            n_boot = max(n_boot, 20)
        rules = rules or FlagRules()
        if rules.multiplicity not in _MULTIPLICITY:
            raise ValueError(_INVALID_MULTIPLICITY.format(rules.multiplicity, _MULTIPLICITY))
        if not 0.0 <= rules.intersection_share < 1.0:
            raise ValueError(f"intersection_share must be in [0, 1), got "
                             f"{rules.intersection_share!r}")
        self.table = scores
        self.sensitive = list(sensitive) if sensitive is not None else list(scores.sensitive)
        self.threshold = scores.threshold
        self.min_group_size = int(min_group_size)
        self.min_events = int(min_events)
        self.n_boot, self.n_bins, self.seed = int(n_boot), int(n_bins), int(seed)
        self.n_ece_bins, self.ci_level, self.rules = n_ece_bins, ci_level, rules
        self.intersections = intersections
        self.warnings: list[str] = []
        df = scores.data
        self._s = df["score"].to_numpy(float)
        self._y = df["label"].to_numpy(int)
        self._patient = np.unique(df["patient_id"].to_numpy(), return_inverse=True)[1]
        self.n_rows: int = len(df)
        self.n_patients: int = int(self._patient.max()) + 1
        self.binning: Binning = make_binning(self._s, self.threshold, n_bins=n_bins,
                                             n_ece_bins=n_ece_bins)
        self._build_groups(df, dict(reference or {}))
        self._compute_points()
        self._compute_bootstrap()
        self._compute_missingness(df)
        self._compute_test_sums(df)
        self._compute_disparities()

    # ----------------------------------------------------------------- construction
    def _build_groups(self, df: pd.DataFrame, reference: dict[str, str]) -> None:
        n_attr = len(self.sensitive)
        self._levels: dict[str, np.ndarray] = {}
        key = np.zeros(len(df), dtype=np.int64)
        radix = []
        for col in self.sensitive:
            inv, levels = pd.factorize(df[col], sort=True)  # hash-based, then sorted levels
            self._levels[col] = np.asarray(levels, dtype=str)
            radix.append(len(levels))
            key = key * len(levels) + inv
        ukeys, self._cell = np.unique(key, return_inverse=True)
        self._cell = self._cell.ravel()
        cells = np.empty((ukeys.size, n_attr), dtype=np.int64)
        rest = ukeys.copy()
        for j in range(n_attr - 1, -1, -1):
            cells[:, j] = rest % radix[j]
            rest //= radix[j]
        self._cells = cells  # (n_cells, n_attrs) level codes
        dims: list[tuple[int, ...]] = [(i,) for i in range(n_attr)]
        if self.intersections == 2:
            dims += list(combinations(range(n_attr), 2))
        groups = [Group((), ())]
        rows = [np.ones(len(cells), bool)]
        codes_of: list[tuple[int, ...]] = [()]
        for dim in dims:
            combos = np.unique(cells[:, list(dim)], axis=0)
            for combo in combos:
                groups.append(Group(tuple(self.sensitive[i] for i in dim),
                                    tuple(str(self._levels[self.sensitive[i]][c])
                                          for i, c in zip(dim, combo, strict=True))))
                rows.append(np.all(cells[:, list(dim)] == combo, axis=1))
                codes_of.append(tuple(int(c) for c in combo))
        self.groups = groups
        self._membership = np.array(rows, dtype=np.float64)
        cell_n = np.bincount(self._cell, minlength=len(cells))
        self._group_n = self._membership @ cell_n
        index = {g.key: i for i, g in enumerate(groups)}
        self._group_margins = _group_margins(groups, index)
        # Primary (n < min_group_size) and complementary suppression: no hidden group
        # size can be solved for from the shown ones (see audits.suppression).
        self.suppressed = complementary_suppression(
            self._group_n, self._group_n < self.min_group_size, self._group_margins)
        # Reference of a single attribute: the requested level, else its largest group.
        self.reference: dict[str, Group] = {}
        ref_level: dict[str, str] = {}
        for a in self.sensitive:
            members = [i for i, g in enumerate(groups) if g.dimension == (a,)
                       and not self.suppressed[i]]
            if not members:
                continue
            wanted = reference.get(a)
            chosen = [i for i in members if groups[i].levels == (wanted,)]
            if wanted is not None and not chosen:
                raise AuditInputError(f"reference level {wanted!r} of {a!r} is not "
                                      f"among its reported groups (at least "
                                      f"{self.min_group_size}, and not hidden to protect a "
                                      f"smaller one): {[groups[i].name for i in members]}")
            best = chosen[0] if chosen else max(members, key=lambda i: float(self._group_n[i]))
            self.reference[a] = groups[best]
            ref_level[a] = groups[best].levels[0]
        # Reference of an intersection: the cell of both attributes' reference levels
        # (e.g. White & 45-64), for difference()/ratio(). Disparities compare each cell
        # with the cell that differs only in the audited attribute (``_comparisons``).
        for g in groups:
            if len(g.dimension) != 2 or g.dim_name in self.reference:
                continue
            if not all(a in ref_level for a in g.dimension):
                continue
            i = index.get((g.dim_name, " & ".join(ref_level[a] for a in g.dimension)))
            if i is not None and not self.suppressed[i]:
                self.reference[g.dim_name] = groups[i]
        # (group, comparator, audited attribute): a single-attribute group against its
        # reference; an intersection cell against the cell of the same stratum of the
        # other attribute with the audited attribute at its reference level, so a
        # race x age comparison (Black & 80+ vs White & 80+) is not confounded by age.
        self._comparisons: list[tuple[int, int, str]] = []
        for i, g in enumerate(groups):
            if not g.dimension or self.suppressed[i]:
                continue
            for k, a in enumerate(g.dimension):
                if a not in ref_level or g.levels[k] == ref_level[a]:
                    continue
                alt = list(g.levels)
                alt[k] = ref_level[a]
                r = index.get((g.dim_name, " & ".join(alt)))
                if r is not None and not self.suppressed[r]:
                    self._comparisons.append((i, r, a))

    def _rows_of(self, group: int) -> np.ndarray:
        """Boolean row mask of one group."""
        return self._membership[group].astype(bool)[self._cell]

    def _compute_points(self) -> None:
        points = []
        order = np.argsort(self._s, kind="stable")  # sort once; every group is a subsequence
        s_sorted, y_sorted, cell_sorted = self._s[order], self._y[order], self._cell[order]
        for i in range(len(self.groups)):
            m = self._membership[i].astype(bool)[cell_sorted]
            points.append(exact_metrics(s_sorted[m], y_sorted[m], self.threshold,
                                        self.n_ece_bins, presorted=True))
        self._points = pd.DataFrame(points, index=pd.MultiIndex.from_tuples(
            [g.key for g in self.groups], names=["dimension", "group"]))[list(METRICS)]
        # A group with one outcome class has no AUROC, calibration fit, TPR or FPR.
        one_class = (self._points["prevalence"] == 0) | (self._points["prevalence"] == 1)
        for i in map(int, np.flatnonzero(one_class.to_numpy() & ~self.suppressed)):
            g = self.groups[i]
            what = "no events" if self._points["prevalence"].iloc[i] == 0 else "only events"
            self.warnings.append(f"{g.dim_name} = {g.name}: {what} (single outcome class); "
                                 f"AUROC, AUPRC, calibration fit and TPR/FPR are undefined")

    def _compute_bootstrap(self) -> None:
        engine = HistogramBootstrap(cell=self._cell, bins=self.binning.index(self._s),
                                    label=self._y, patient=self._patient,
                                    membership=self._membership, n_bins=self.binning.n_bins)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1,)))
        full = hist_metrics(engine.full[:, None], self.binning)
        # Replicates start Newton from the full-data fit: 4 steps reach 1e-8 there.
        init = tuple(np.nan_to_num(v, nan=d)[:, None] for v, d in (
            (full["calibration_intercept"][:, 0], 0.0), (_slope_intercept(full), 0.0),
            (full["calibration_slope"][:, 0], 1.0)))
        reps = engine.run(self.n_boot, rng, lambda h: hist_metrics(
            h, self.binning, init=init, steps=4))
        self._boot_engine, self._boot_init = engine, init
        # Kept for the calibration-intercept test: full-data histograms and each fine
        # bin's mean logit (the exact rows' logits, not the bin's midpoint).
        self._hist_full = engine.full
        idx = self.binning.index(self._s)
        count = np.bincount(idx, minlength=self.binning.n_bins)
        self._bin_logit = np.bincount(idx, weights=_logit(self._s),
                                      minlength=self.binning.n_bins) / np.maximum(count, 1)
        exact = self._points
        # Shift each replicate by the binning error on the full data (see module docstring).
        self._boot_shift = {m: exact[m].to_numpy() - full[m][:, 0] for m in METRICS}
        self._reps = {m: reps[m] + self._boot_shift[m][:, None] for m in METRICS}
        self.n_multi_patients = engine.n_multi_patients

    def _compute_missingness(self, df: pd.DataFrame) -> None:
        self.modalities = [c for c in self.table.modalities if c in df.columns]
        if not self.modalities:
            self._miss_points = pd.DataFrame()
            self._miss_perf = pd.DataFrame()
            self._miss_hidden = np.zeros((len(self.groups), 0), bool)
            return
        have = np.stack([df[c].to_numpy(bool) for c in self.modalities], axis=1)
        self._miss_hidden = self._missing_suppression(have)
        pattern = (have * (1 << np.arange(have.shape[1]))).sum(1)
        n_pat = 1 << have.shape[1]
        engine = HistogramBootstrap(cell=self._cell, bins=pattern,
                                    label=np.zeros_like(pattern), patient=self._patient,
                                    membership=self._membership, n_bins=n_pat, n_labels=1)
        missing_of = np.array([[not (p >> k) & 1 for p in range(n_pat)]
                               for k in range(have.shape[1])], float)  # (mods, patterns)

        def rates(h: np.ndarray) -> dict[str, np.ndarray]:
            counts = h[..., 0]  # (groups, block, patterns)
            tot = counts.sum(-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                return {c: (counts @ missing_of[k]) / tot
                        for k, c in enumerate(self.modalities)}

        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(2,)))
        reps = engine.run(self.n_boot, rng, rates)
        full = rates(engine.full[:, None])
        self._miss_reps = reps
        self._miss_points = pd.DataFrame({c: full[c][:, 0] for c in self.modalities},
                                         index=self._points.index)
        # What missing a modality does to performance: present vs missing, per group.
        perf_rows: list[dict[str, Any]] = []
        self._miss_perf_reps: dict[tuple[int, str, str], np.ndarray] = {}
        single = [i for i, g in enumerate(self.groups) if len(g.dimension) <= 1]
        for k, col in enumerate(self.modalities):
            present = have[:, k].astype(np.int64)
            cell = self._cell * 2 + present
            memb = np.repeat(self._membership[single], 2, axis=1)
            memb2 = np.concatenate([memb * np.tile([1.0, 0.0], len(self._cells)),
                                    memb * np.tile([0.0, 1.0], len(self._cells))])
            eng = HistogramBootstrap(cell=cell, bins=self.binning.index(self._s), label=self._y,
                                     patient=self._patient, membership=memb2,
                                     n_bins=self.binning.n_bins)
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(3, k)))
            r = eng.run(self.n_boot, rng, lambda h: hist_metrics(
                h, self.binning, calibration_fit=False, need=_MISSING_PERF))
            f = hist_metrics(eng.full[:, None], self.binning, calibration_fit=False,
                             need=_MISSING_PERF)
            ns = len(single)
            for j, gi in enumerate(single):
                rec: dict[str, Any] = {"dimension": self.groups[gi].dim_name,
                                       "group": self.groups[gi].name,
                                       "modality": MODALITY_COLUMNS.get(col, col)}
                for side, off in (("missing", 0), ("present", ns)):
                    rec[f"n_{side}"] = float(f["n"][j + off, 0])
                for m in _MISSING_PERF:
                    for side, off in (("missing", 0), ("present", ns)):
                        rec[f"{m}_{side}"] = float(f[m][j + off, 0])
                    self._miss_perf_reps[(gi, col, m)] = r[m][j] - r[m][j + ns]
                    rec[f"{m}_diff"] = rec[f"{m}_missing"] - rec[f"{m}_present"]
                perf_rows.append(rec)
        self._miss_perf = pd.DataFrame(perf_rows)

    def _missing_suppression(self, have: np.ndarray) -> np.ndarray:
        """(groups, modalities): whether a group's missing/present counts are hidden.

        Cells per modality: group sizes, then missing counts, then present counts.
        A count under ``min_group_size`` is hidden, missing + present = group size and
        every group margin hold for both, and complementary suppression closes the
        gaps. A hidden cell hides the group's missing rate too (rate x n is the count).
        """
        n_g = len(self.groups)
        out = np.zeros((n_g, have.shape[1]), bool)
        for k in range(have.shape[1]):
            per_cell = np.bincount(self._cell, weights=(~have[:, k]).astype(float),
                                   minlength=len(self._cells))
            miss = self._membership @ per_cell
            pres = self._group_n - miss
            values = np.concatenate([self._group_n, miss, pres])
            primary = np.concatenate([self.suppressed,
                                      self.suppressed | (miss < self.min_group_size),
                                      self.suppressed | (pres < self.min_group_size)])
            margins: list[Margin] = [(g, [n_g + g, 2 * n_g + g]) for g in range(n_g)]
            for off in (n_g, 2 * n_g):
                margins += [(t + off, [p + off for p in parts])
                            for t, parts in self._group_margins]
            hidden = complementary_suppression(values, primary, margins)
            out[:, k] = hidden[n_g:2 * n_g] | hidden[2 * n_g:]
        return out

    # ---------------------------------------------------------------- disparities
    def _compute_test_sums(self, df: pd.DataFrame) -> None:
        """Per group and tested metric: sums for the patient-clustered score test.

        Each tested metric is a ratio ``sum(a) / sum(b)`` over rows (TPR: flagged
        events over events, ...). Per group this keeps ``A = sum a``, ``B = sum b``
        and, over patients ``i`` (within a finest cell), ``sum a_i^2``, ``sum a_i b_i``
        and ``sum b_i^2`` of the patient totals: the variance of the ratio at any
        hypothesised value ``t`` is then ``sum (a_i - t b_i)^2 / B^2``. The same three
        sums over rows (``_row_sums``) give the design effect of several rows per
        patient (:func:`audits._inference.design_effect`).
        """
        flag = (self._s >= self.threshold).astype(float)
        y = self._y.astype(float)
        ones = np.ones_like(y)
        rows: dict[str, tuple[np.ndarray, np.ndarray]] = {
            "tpr": (flag * y, y), "fpr": (flag * (1 - y), 1 - y), "ppv": (flag * y, flag),
            "selection_rate": (flag, ones), "calibration_in_the_large": (self._s - y, ones)}
        for c in self.modalities:
            rows[f"missing_rate:{c}"] = ((~df[c].to_numpy(bool)).astype(float), ones)
        n_cells = len(self._cells)
        pc: np.ndarray | None = None
        pc_cell = self._cell
        if self.n_patients != self.n_rows:
            key = self._patient.astype(np.int64) * n_cells + self._cell
            ukey, pc = np.unique(key, return_inverse=True)
            pc_cell = ukey % n_cells
        self._test_sums: dict[str, np.ndarray] = {}
        self._row_sums: dict[str, np.ndarray] = {}
        for name, (a, b) in rows.items():
            if pc is not None:
                row_cell = np.stack([np.bincount(self._cell, weights=v, minlength=n_cells)
                                     for v in (a * a, a * b, b * b)])
                self._row_sums[name] = self._membership @ row_cell.T  # (groups, 3)
                a = np.bincount(pc, weights=a)
                b = np.bincount(pc, weights=b)
            per_cell = np.stack([np.bincount(pc_cell, weights=v, minlength=n_cells)
                                 for v in (a, b, a * a, a * b, b * b)])
            self._test_sums[name] = self._membership @ per_cell.T  # (groups, 5)

    def _denominator(self, metric: str, i: int) -> float:
        """Rows in the denominator of an event-conditional metric (else the group size)."""
        if not hasattr(self, "_denoms"):
            pt = self._points
            n = pt["n"].to_numpy(float)
            pos = np.round(n * pt["prevalence"].to_numpy(float))
            flagged = np.round(n * pt["selection_rate"].to_numpy(float))
            both = np.minimum(pos, n - pos)
            self._denoms = {"tpr": pos, "fnr": pos, "fpr": n - pos, "ppv": flagged,
                            "npv": n - flagged, "auroc": both, "auprc": both,
                            "calibration_intercept": both, "calibration_slope": both, "": n}
        return float(self._denoms.get(metric, self._denoms[""])[i])

    def _deff(self, label: str, i: int, r: int, t: float) -> float:
        """Design effect of a comparison at the pooled null value ``t`` (1: one row each)."""
        if label not in self._row_sums:
            return 1.0
        s = self._test_sums[label][i] + self._test_sums[label][r]
        rs = self._row_sums[label][i] + self._row_sums[label][r]
        return design_effect(float(s[2] - 2 * t * s[3] + t * t * s[4]),
                             float(rs[0] - 2 * t * rs[1] + t * t * rs[2]))

    def _p_value(self, metric: str, label: str, i: int, r: int) -> float:
        """Two-sided p of one rate comparison (see :mod:`audits._inference`)."""
        g, ref = self._test_sums[label][i], self._test_sums[label][r]
        t = float((g[0] + ref[0]) / (g[1] + ref[1])) if g[1] + ref[1] > 0 else 0.0
        deff = self._deff(label, i, r, t)
        if metric == "selection_rate":
            return rate_ratio_test(g[0], g[1], ref[0], ref[1], self.rules.four_fifths, deff)
        return rate_equality_test(g[0], g[1], ref[0], ref[1], deff)

    def _calibration_p(self) -> dict[tuple[int, int], float]:
        """Calibration-intercept score test of every comparison, in one vectorised pass."""
        pairs = list(dict.fromkeys((i, r) for i, r, _ in self._comparisons))
        if not pairs:
            return {}
        gi, ri = np.array(pairs).T
        deff = np.array([self._deff("calibration_in_the_large", int(i), int(r),
                                    float((self._test_sums["calibration_in_the_large"][i, 0]
                                           + self._test_sums["calibration_in_the_large"][r, 0])
                                          / max(self._group_n[i] + self._group_n[r], 1.0)))
                         for i, r in pairs])
        _, p = calibration_intercept_test(self._hist_full[gi], self._hist_full[ri],
                                          self._bin_logit, deff)
        return {pair: float(v) for pair, v in zip(pairs, p, strict=True)}

    def _compute_disparities(self) -> None:
        rows: list[dict[str, Any]] = []
        lo_q, hi_q = 50 * (1 - self.ci_level), 100 - 50 * (1 - self.ci_level)
        cal_p = self._calibration_p()
        for i, r, attribute in self._comparisons:
            g, ref = self.groups[i], self.groups[r]
            metric_sources: list[tuple[str, str, np.ndarray, np.ndarray, float, float]] = []
            for m in METRICS:
                if m in ("n", "prevalence"):
                    continue
                metric_sources.append((m, m, self._reps[m][i], self._reps[m][r],
                                       float(self._points[m].iloc[i]),
                                       float(self._points[m].iloc[r])))
            for k, c in enumerate(self.modalities):
                if self._miss_hidden[i, k] or self._miss_hidden[r, k]:
                    continue  # a shown rate x a shown n would give a hidden count
                metric_sources.append(("missing_rate", f"missing_rate:{c}", self._miss_reps[c][i],
                                       self._miss_reps[c][r],
                                       float(self._miss_points[c].iloc[i]),
                                       float(self._miss_points[c].iloc[r])))
            for metric, label, rep_g, rep_r, pg, pr in metric_sources:
                enough = min(self._denominator(metric, i), self._denominator(metric, r))
                p_value: float | None = None
                if metric == "calibration_intercept":
                    p_value = cal_p.get((i, r))
                elif metric in _FLAGGED and label in self._test_sums:
                    p_value = self._p_value(metric, label, i, r)
                rec = _compare(metric, label, rep_g, rep_r, pg, pr, lo_q, hi_q, self.rules,
                               p_value, enough >= self.min_events)
                rec.update({"dimension": g.dim_name, "group": g.name, "reference": ref.name,
                            "attribute": attribute, "n_group": float(self._group_n[i]),
                            "n_reference": float(self._group_n[r]),
                            "tier": "intersection" if len(g.dimension) > 1
                            else "single attribute"})
                rows.append(rec)
        table = pd.DataFrame(rows)
        self.n_tests = 0
        self.n_tests_by_tier = {"single attribute": 0, "intersection": 0}
        if table.empty:
            self._disparities = table
            return
        tested = table["tested"].to_numpy(bool)
        p = table["p_value"].to_numpy(float)
        secondary = (table["tier"] == "intersection").to_numpy(bool)
        adj = np.full(p.size, np.nan)
        adj[tested] = adjust_families(p[tested], secondary[tested], self.rules.multiplicity,
                                      self.rules.intersection_share)
        table["p_adjusted"] = adj
        table["flagged"] = tested & table["meets_threshold"] & table["ci_excludes_null"] & (
            np.nan_to_num(adj, nan=1.0) < self.rules.alpha)
        self.n_tests = int(tested.sum())
        self.n_tests_by_tier = {"single attribute": int((tested & ~secondary).sum()),
                                "intersection": int((tested & secondary).sum())}
        self._disparities = table

    # ----------------------------------------------------------------- public API
    @property
    def overall(self) -> pd.Series:
        """Every metric for all patients (a Series indexed by metric name)."""
        return self._points.iloc[0]

    @property
    def by_group(self) -> pd.DataFrame:
        """Metrics per group (rows: (dimension, group)); suppressed groups are NaN.

        Check :attr:`suppressed` or use :meth:`to_dict` for the "insufficient data" marks.
        """
        out = self._points.copy()
        out.loc[self.suppressed, :] = np.nan
        return out

    def _ci(self, reps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = 50 * (1 - self.ci_level)
        # A group undefined in every replicate (one class) gives NaN bounds, by design.
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo = np.nanpercentile(reps, q, axis=-1)
            hi = np.nanpercentile(reps, 100 - q, axis=-1)
        return lo, hi

    def by_group_ci(self, metric: str) -> pd.DataFrame:
        """Point, lower and upper bound of ``metric`` per group (suppressed rows NaN)."""
        if metric not in METRICS:
            raise ValueError(_INVALID_METRIC.format(metric, METRICS))
        lo, hi = self._ci(self._reps[metric])
        out = pd.DataFrame({"value": self._points[metric], "lower": lo, "upper": hi},
                           index=self._points.index)
        out.loc[self.suppressed, :] = np.nan
        return out

    def replicate_metrics(self, row_weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every group metric on given bootstrap replicates, by the audit's own path.

        ``row_weights`` is ``(n_replicates, n_rows)``, in the order of the score
        table's rows (rows of one patient should share a weight). The replicates go
        through the same (finest cell x score bin x label) histograms, metric code
        and binning shift as the audit's intervals; only the random weights are
        supplied instead of drawn. Returns ``{metric: (n_groups, n_replicates)}``,
        groups in the order of :attr:`groups`. For checking the histogram path
        against a row-level computation on the same replicates.
        """
        hist = self._boot_engine.weighted(row_weights)
        reps = hist_metrics(hist, self.binning, init=self._boot_init, steps=4)
        return {m: np.asarray(reps[m], np.float64) + self._boot_shift[m][:, None]
                for m in METRICS}

    def overall_ci(self) -> pd.DataFrame:
        """Point, lower, upper for every metric, all patients."""
        rows = {m: self.by_group_ci(m).iloc[0] for m in METRICS}
        return pd.DataFrame(rows).T

    def difference(self, metric: str, method: CompareMethod = "to_reference") -> pd.Series:
        """Group minus comparator, per group (``to_reference``/``to_overall``) or the
        largest minus the smallest per dimension (``between_groups``)."""
        return self._compare_table(metric, method, "difference")["value"]

    def ratio(self, metric: str, method: CompareMethod = "to_reference") -> pd.Series:
        """Group over comparator, or smallest over largest per dimension (``between_groups``)."""
        return self._compare_table(metric, method, "ratio")["value"]

    def difference_ci(self, metric: str, method: CompareMethod = "to_reference"
                      ) -> pd.DataFrame:
        return self._compare_table(metric, method, "difference")

    def ratio_ci(self, metric: str, method: CompareMethod = "to_reference") -> pd.DataFrame:
        return self._compare_table(metric, method, "ratio")

    def _compare_table(self, metric: str, method: str, kind: str) -> pd.DataFrame:
        if method not in _COMPARE:
            raise ValueError(_INVALID_COMPARE_METHOD.format(method, _COMPARE))
        if metric not in METRICS:
            raise ValueError(_INVALID_METRIC.format(metric, METRICS))
        pts, reps = self._points[metric].to_numpy(), self._reps[metric]
        ok = ~self.suppressed

        def combine(a: Any, b: Any) -> Any:
            with np.errstate(invalid="ignore", divide="ignore"):
                return a - b if kind == "difference" else a / b

        rows: dict[tuple[str, str], tuple[float, float, float]] = {}
        if method == "between_groups":
            for dim in dict.fromkeys(g.dim_name for g in self.groups[1:]):
                idx = [i for i, g in enumerate(self.groups) if g.dim_name == dim and ok[i]
                       and np.isfinite(pts[i])]
                if len(idx) < 2:
                    continue
                hi_i, lo_i = max(idx, key=lambda i: pts[i]), min(idx, key=lambda i: pts[i])
                value = combine(pts[hi_i], pts[lo_i]) if kind == "difference" else combine(
                    pts[lo_i], pts[hi_i])
                sub = reps[idx]
                rep = (np.nanmax(sub, 0) - np.nanmin(sub, 0) if kind == "difference"
                       else np.nanmin(sub, 0) / np.nanmax(sub, 0))
                lo, hi = self._ci(rep)
                rows[(dim, "max vs min")] = (float(value), float(lo), float(hi))
        else:
            for i, g in enumerate(self.groups):
                if not g.dimension or not ok[i]:
                    continue
                if method == "to_overall":
                    r = 0
                else:
                    ref = self.reference.get(g.dim_name)
                    if ref is None or ref == g:
                        continue
                    r = self.groups.index(ref)
                lo, hi = self._ci(combine(reps[i], reps[r]))
                rows[g.key] = (float(combine(pts[i], pts[r])), float(lo), float(hi))
        out = pd.DataFrame.from_dict(rows, orient="index", columns=["value", "lower", "upper"])
        out.index = pd.MultiIndex.from_tuples(list(rows), names=["dimension", "group"])
        return out

    @property
    def disparities(self) -> pd.DataFrame:
        """Every comparison with the reference group: difference and ratio with CIs,
        p-values (raw and adjusted) and whether it is flagged."""
        return self._disparities

    @property
    def flags(self) -> pd.DataFrame:
        if self._disparities.empty:
            return self._disparities
        return self._disparities[self._disparities["flagged"]]

    @property
    def missingness(self) -> pd.DataFrame:
        """Missing rate of each modality per group, with CIs (suppressed groups dropped)."""
        if self._miss_points.empty:
            return pd.DataFrame()
        rows = []
        for k, c in enumerate(self.modalities):
            lo, hi = self._ci(self._miss_reps[c])
            for i, g in enumerate(self.groups):
                if self.suppressed[i] or self._miss_hidden[i, k]:
                    continue
                rows.append({"dimension": g.dim_name, "group": g.name,
                             "modality": MODALITY_COLUMNS.get(c, c),
                             "missing_rate": float(self._miss_points[c].iloc[i]),
                             "lower": float(lo[i]), "upper": float(hi[i])})
        return pd.DataFrame(rows)

    @property
    def missingness_performance(self) -> pd.DataFrame:
        """Per single-attribute group and modality: metrics with the modality missing vs
        present, and the difference (missing minus present) with its CI. Sides with
        fewer than ``min_group_size`` rows are suppressed."""
        if self._miss_perf.empty:
            return self._miss_perf
        out = self._miss_perf.copy()
        keys = {(g.dim_name, g.name): i for i, g in enumerate(self.groups)}
        inv = {v: k for k, v in MODALITY_COLUMNS.items()}
        for m in _MISSING_PERF:
            los, his = [], []
            for _, row in out.iterrows():
                gi = keys[(row["dimension"], row["group"])]
                col = inv.get(row["modality"], row["modality"])
                lo, hi = self._ci(self._miss_perf_reps[(gi, col, m)])
                los.append(float(lo))
                his.append(float(hi))
            out[f"{m}_diff_lower"], out[f"{m}_diff_upper"] = los, his
        mod_index = {MODALITY_COLUMNS.get(c, c): k for k, c in enumerate(self.modalities)}
        # The audit's one suppression decision (primary and complementary).
        small = np.array([bool(self._miss_hidden[keys[(d, g)], mod_index[m]]) for d, g, m in
                          zip(out["dimension"], out["group"], out["modality"], strict=True)],
                         bool)
        value_cols = [c for c in out.columns if c not in ("dimension", "group", "modality",
                                                           "n_missing", "n_present")]
        out.loc[small, value_cols] = np.nan
        for side in ("missing", "present"):
            tiny = out[f"n_{side}"] < self.min_group_size
            out[f"n_{side}"] = out[f"n_{side}"].astype(object)
            out.loc[small & ~tiny, f"n_{side}"] = INSUFFICIENT
            out.loc[small & tiny, f"n_{side}"] = f"<{self.min_group_size}"
        return out

    def reliability(self, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from audits._metrics import reliability_curve

        m = self._rows_of(group)
        return reliability_curve(self._s[m], self._y[m], self.n_ece_bins)

    def roc(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        from audits._metrics import roc_points

        m = self._rows_of(group)
        return roc_points(self._s[m], self._y[m])

    def metric_shown(self, metric: str, group: int) -> bool:
        """Whether a group's metric may be shown anywhere (table, chart, legend, JSON).

        Not for a suppressed group, nor (event-conditional metrics) with fewer than
        ``min_events`` rows in the metric's denominator, nor when it is undefined.
        """
        if self.suppressed[group]:
            return False
        if not math.isfinite(float(self._points[metric].iloc[group])):
            return False
        return not (metric in _EVENT_DENOMINATOR
                    and self._denominator(metric, group) < self.min_events)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready results; suppressed groups carry "insufficient data", never numbers."""
        groups = []
        for i, g in enumerate(self.groups):
            rec: dict[str, Any] = {"dimension": g.dim_name, "group": g.name}
            if self.suppressed[i]:
                rec.update({"n": f"<{self.min_group_size}", "status": INSUFFICIENT})
                groups.append(rec)
                continue
            rec["status"] = "ok"
            rec["metrics"] = {}
            for m in METRICS:
                value = float(self._points[m].iloc[i])
                if not math.isfinite(value):
                    rec["metrics"][m] = {"value": None, "status": "undefined: single outcome "
                                         "class in this group" if m in _TWO_CLASS or m in (
                                             "tpr", "fnr", "fpr", "ppv", "npv")
                                         else "undefined"}
                    continue
                if not self.metric_shown(m, i):
                    rec["metrics"][m] = {"value": None, "status": f"{INSUFFICIENT} (<"
                                         f"{self.min_events} {_EVENT_DENOMINATOR[m]})"}
                    continue
                lo, hi = self._ci(self._reps[m][i])
                rec["metrics"][m] = {"value": value, "lower": _f(lo), "upper": _f(hi)}
            groups.append(rec)
        disp = self._disparities
        return {
            "threshold": self.threshold, "n_rows": self.n_rows, "n_patients": self.n_patients,
            "n_boot": self.n_boot, "n_bins": self.binning.n_bins, "ci_level": self.ci_level,
            "min_group_size": self.min_group_size, "min_events": self.min_events,
            "sensitive": self.sensitive,
            "intersections": self.intersections, "rules": self.rules.to_dict(),
            "n_tests": getattr(self, "n_tests", 0),
            "n_tests_by_tier": dict(getattr(self, "n_tests_by_tier", {})),
            "reference": {k: v.name for k, v in self.reference.items()},
            "groups": groups,
            "disparities": _records(disp),
            "missingness": _records(self.missingness),
            "missingness_performance": _records(self.missingness_performance),
            "warnings": list(self.warnings),
        }


def _group_margins(groups: list[Group], index: dict[tuple[str, str], int]) -> list[Margin]:
    """Every additive relation among group sizes (the same holds for any count).

    The levels of one attribute sum to everyone; the cells of an intersection
    ``a x b`` with ``a`` at one level sum to that level of ``a`` (and likewise for
    ``b``). Absent cells are zero and add nothing.
    """
    margins: list[Margin] = []
    by_dim: dict[tuple[str, ...], list[int]] = {}
    for i, g in enumerate(groups):
        if g.dimension:
            by_dim.setdefault(g.dimension, []).append(i)
    for dim, members in by_dim.items():
        if len(dim) == 1:
            margins.append((0, members))
            continue
        for pos, attr in enumerate(dim):
            parts: dict[str, list[int]] = {}
            for i in members:
                parts.setdefault(groups[i].levels[pos], []).append(i)
            for level, cells in parts.items():
                total = index.get((attr, level))
                if total is not None:
                    margins.append((total, cells))
    return margins


def _slope_intercept(full: dict[str, np.ndarray]) -> np.ndarray:
    """Intercept of the (intercept, slope) fit, the slope's Newton starting point."""
    return full["_slope_model_intercept"][:, 0]


def _f(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in df.to_dict(orient="records"):
        clean: dict[str, Any] = {}
        for k, v in rec.items():
            if isinstance(v, float | np.floating):
                clean[str(k)] = _f(v)
            elif isinstance(v, np.bool_ | bool):
                clean[str(k)] = bool(v)
            else:
                clean[str(k)] = v
        out.append(clean)
    return out


def _compare(metric: str, label: str, rep_g: np.ndarray, rep_r: np.ndarray, pg: float,
             pr: float, lo_q: float, hi_q: float, rules: FlagRules,
             p_value: float | None = None, enough_events: bool = True) -> dict[str, Any]:
    """Difference and ratio of one group against its comparator, with CIs and a test.

    Intervals are bootstrap percentiles. The p-value (for the multiplicity
    correction) comes from :mod:`audits._inference`: an exact test for rates, the
    Farrington-Manning score test for the four-fifths rule and a score test for
    calibration intercepts, all valid where a bootstrap collapses (e.g. a group
    whose few events were all flagged).
    """
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d_rep = rep_g - rep_r
        r_rep = rep_g / rep_r
        diff, ratio = pg - pr, (pg / pr if pr != 0 else np.nan)
        d_lo, d_hi = np.nanpercentile(d_rep, [lo_q, hi_q]) if np.isfinite(d_rep).any() else (
            np.nan, np.nan)
        fin = np.isfinite(r_rep)
        r_lo, r_hi = np.nanpercentile(np.where(fin, r_rep, np.nan), [lo_q, hi_q]) \
            if fin.any() else (np.nan, np.nan)
    rec: dict[str, Any] = {"metric": metric, "comparison": label,
                           "family": ", ".join(f for f, ms in FAMILIES.items() if metric in ms),
                           "value_group": pg, "value_reference": pr,
                           "difference": diff, "difference_lower": float(d_lo),
                           "difference_upper": float(d_hi), "ratio": float(ratio),
                           "ratio_lower": float(r_lo), "ratio_upper": float(r_hi),
                           "tested": False, "p_value": np.nan, "meets_threshold": False,
                           "ci_excludes_null": False, "rule": ""}
    if metric not in _FLAGGED or p_value is None:
        return rec
    if not enough_events:
        rec["rule"] = "not tested: too few events"
        return rec
    if not (math.isfinite(diff) and np.isfinite(d_rep).sum() > 10):
        return rec
    rec["tested"] = True
    rec["p_value"] = float(p_value)
    if metric == "selection_rate":
        ff = rules.four_fifths
        rec["meets_threshold"] = bool(ratio < ff or ratio > 1 / ff)
        rec["ci_excludes_null"] = bool(r_hi < ff or r_lo > 1 / ff)
        rec["rule"] = f"selection-rate ratio CI wholly outside [{ff:g}, {1 / ff:.3g}]"
        return rec
    gap = rules.min_gap.get(metric, 0.0)
    rec["meets_threshold"] = bool(abs(diff) > gap)
    rec["ci_excludes_null"] = bool(d_lo > 0 or d_hi < 0)
    rec["rule"] = f"|difference| > {gap:g} and CI excludes 0"
    return rec


