"""The fusion head on a small cohort: L2 and calibration from cross-fitted logits (issue 18).

On a large cohort ``train`` fits the fusion head on the training split, picks its L2
strengths on a 20 % validation split and fits the calibration there. On a cohort of a
few hundred patients that split is a few dozen patients with a handful of events, and
everything decided on it is noise. Measured on 200-patient ``--realism hard`` cohorts
(``evaluate --cv 5``, seed 200): per-branch L2 strengths picked from 125 combinations on
32 patients with ~4 events; Platt slopes between the 1e-3 floor and 1.7 from fold to
fold (one fold's model ranked every patient by the base rate alone); fold AUROCs of the
fused model below those of its own branches; pooled out-of-fold AUROC 0.496 while a
logistic regression on the tabular columns reached 0.570. The head also saw a fifth
fewer patients than the baselines it is compared with.

So below ``fusion.crossfit_below`` patients (default 500, the size under which
``train`` already warns that one validation split says little), the head is fitted
on **every** row of the training cohort (training and validation splits together) and:

- its **L2 strength** (one, shared by the branches and scaled by each branch's width as
  usual; the branch biases get the same penalty, ``bias_l2``) is chosen from
  ``fusion.crossfit_l2`` by patient-grouped, label-stratified K-fold cross-validation
  over those rows. Each value is scored by the log-loss of its out-of-fold logits after
  a Platt map fitted to them (the shipped model is head plus calibration, so a head
  that ranks well at the wrong scale is not penalised for the scale), with the
  **one-standard-error rule**: the strongest L2 within one patient-clustered SE of the
  best. Where the data cannot tell the values apart, the head is shrunk the most;
- its **calibration** (``fusion.crossfit_calibration``, default a temperature alone) is
  fitted on the out-of-fold logits at that L2 (each row scored by a head that never saw
  its patient), 160-odd patients instead of 32;
- its reported **metrics** are those out-of-fold scores.

**Why the branch biases are penalised and the calibration has no intercepts.** A
branch's bias is the logit offset of the rows that have that modality: a
missingness-pattern event rate. On the 200-patient cohorts a predictor that knows only
the training part's event rate per missingness pattern scores a pooled out-of-fold
AUROC of 0.335 / 0.304 / 0.450 / 0.443 / 0.478 (seeds 200-204): below chance on every
seed, because a pattern's events in the test fold are missing from its own training
part (the folds are label-stratified, so the totals are fixed). Rates resting on a
handful of events are noise at scoring time too. The old head learned them twice: free
branch biases, then per-pattern Platt offsets on the validation split. Replaying each
fold's head on the same branch inputs (5 seeds): old 0.495 mean pooled AUROC;
cross-fitted with free biases and platt-pattern 0.48 (one seed run); with penalised
biases: platt-pattern 0.479, platt 0.486, temperature **0.529**.

The branch inputs are those the rest of ``train`` built: the EHR trees' and the note
scorer's training-row logits are already out-of-fold; the image encoder's is in-sample
on the training split (it early-stops on the validation split), which the validation
rows, now in the head's fit, partly correct. Nothing here depends on what the data is:
the rule is the usual one-SE rule of penalised regression, and the threshold is the
existing small-cohort threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from models.calibration import PlattScaling
from models.fusion import FusionRiskModel
from models.inner_cv import clustered_se, log_loss_rows

__all__ = ["CrossfitHead", "crossfit_head", "describe_crossfit"]

log = logging.getLogger(__name__)

#: make(l2) -> an unfitted fusion head with the training config and this one L2 strength.
HeadFactory = Callable[[float], FusionRiskModel]


@dataclass
class CrossfitHead:
    """What :func:`crossfit_head` found: the L2 strength and the out-of-fold scores.

    ``logit``, ``contrib`` (per-branch contributions), ``bias`` (the inner head's global
    bias, per row) and ``present`` are the out-of-fold forward pass at ``l2``, one row
    per input row; ``record`` is JSON-ready for the artifact and the model card.
    """

    l2: float
    logit: np.ndarray
    contrib: np.ndarray
    bias: np.ndarray
    present: np.ndarray
    record: dict[str, Any]


def crossfit_head(make: HeadFactory, X: Mapping[str, np.ndarray], y: np.ndarray,
                  mask: np.ndarray, groups: np.ndarray, *, l2_grid: Sequence[float],
                  folds: int = 5, random_state: int = 0, one_se: bool = True
                  ) -> CrossfitHead:
    """Choose the head's L2 by grouped K-fold CV (one-SE rule); out-of-fold scores at it.

    Parameters
    ----------
    make : callable
        ``make(l2)``: an unfitted :class:`FusionRiskModel` with that single L2 strength.
    X, y, mask, groups
        The rows the head will be fitted on, as it sees them (``groups``: patient ids).
    l2_grid : sequence of float
        Candidate L2 strengths.
    folds : int, default=5
        Outer folds of this inner CV (fewer when a class has fewer patients).
    random_state : int, default=0

    Raises
    ------
    ValueError
        Fewer than two patients of a class (no cross-validation is possible).
    """
    started = time.perf_counter()
    y = np.asarray(y, dtype=int)
    groups = np.asarray(groups)
    grid = sorted({float(v) for v in l2_grid})
    if not grid:
        raise ValueError("fusion.l2 is empty: the cross-fitted head needs at least one value")
    k = int(min(folds, *(len(set(groups[y == c].tolist())) for c in (0, 1))))
    if k < 2:
        raise ValueError("too few patients of a class to cross-fit the fusion head")
    n, n_mod = len(y), mask.shape[1]
    logit = np.zeros((len(grid), n))
    contrib = np.zeros((len(grid), n, n_mod))
    bias = np.zeros((len(grid), n))
    present = np.zeros((n, n_mod), dtype=bool)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=random_state)
    for tr, te in splitter.split(np.zeros(n), y, groups):
        fit_X = {m: np.asarray(v)[tr] for m, v in X.items()}
        test_X = {m: np.asarray(v)[te] for m, v in X.items()}
        for g, lam in enumerate(grid):
            head = make(lam)
            # One L2 value: the "validation" rows only fill the fit history.
            head.fit(fit_X, y[tr], mask[tr], X_val=fit_X, y_val=y[tr], mask_val=mask[tr])
            lo, co, pr = head._forward(test_X, mask[te], "cpu")
            logit[g, te], contrib[g, te], present[te] = lo, co, pr
            bias[g, te] = float(head.net_.bias.detach()[0])
    # The shipped head is the head plus a Platt map fitted on these out-of-fold logits,
    # so each L2 is scored by the log-loss of its recalibrated logits: what the shipped
    # model would lose. Raw log-loss rewards a head shrunk to the base rate (its scale is
    # right by construction) over one that ranks patients better at the wrong scale,
    # which the calibration would have fixed.
    losses = np.stack([log_loss_rows(y, PlattScaling().fit(logit[g], y).transform(logit[g]))
                       for g in range(len(grid))])
    best = int(np.argmin(losses.mean(axis=1)))
    rows: list[dict[str, Any]] = []
    for g, lam in enumerate(grid):
        diff = losses[g] - losses[best]  # >= 0 on average: behind the best by
        se = clustered_se(diff, groups) if g != best else 0.0
        rows.append({"l2": lam, "log_loss": float(losses[g].mean()),
                     "auroc": float(roc_auc_score(y, logit[g])),
                     "behind_best": float(diff.mean()), "se": float(se)})
    # One-SE rule: the strongest penalty whose loss is within one SE of the best's.
    chosen = max(g for g, r in enumerate(rows)
                 if g == best or (one_se and r["behind_best"] <= r["se"]))
    seconds = round(time.perf_counter() - started, 1)
    record = {
        "rule": ("fusion head fitted on every training-cohort row; its L2 (shared by the "
                 f"branches) chosen by patient-grouped {k}-fold CV log-loss with the "
                 "one-standard-error rule (the strongest L2 within one patient-clustered "
                 "SE of the best), its calibration fitted on the out-of-fold logits"),
        "folds": k, "n_rows": n, "n_patients": len(set(groups.tolist())),
        "n_events": int(y.sum()), "grid": rows, "best_l2": grid[best],
        "chosen_l2": grid[chosen], "random_state": int(random_state), "seconds": seconds,
        "out_of_fold_auroc": rows[chosen]["auroc"],
        "out_of_fold_log_loss": rows[chosen]["log_loss"],
    }
    log.info("fusion head cross-fitted (%d folds, %.1f s): l2 %g (best %g), out-of-fold "
             "AUROC %.3f", k, seconds, grid[chosen], grid[best], rows[chosen]["auroc"])
    return CrossfitHead(l2=grid[chosen], logit=logit[chosen], contrib=contrib[chosen],
                        bias=bias[chosen], present=present, record=record)


def describe_crossfit(record: Mapping[str, Any] | None) -> str:
    """One line for the model card: how the fusion head's L2 and calibration were set."""
    if not record:
        return ("fitted on the training split; L2 strengths chosen and calibration fitted on "
                "the held-out validation split")
    return (f"small cohort ({record['n_patients']} patients, {record['n_events']} events): "
            f"fitted on every training-cohort row; L2 {record['chosen_l2']:g} chosen by "
            f"patient-grouped {record['folds']}-fold CV with the one-standard-error rule "
            f"(lowest CV log-loss at {record['best_l2']:g}); calibration fitted on the "
            f"out-of-fold logits (out-of-fold AUROC {record['out_of_fold_auroc']:.3f})")
