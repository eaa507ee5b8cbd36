"""The EHR learner choice (issue 18) on the two synthetic worlds, EHR columns only.

For each seed pair, a training cohort and a fresh evaluation cohort are simulated
(``pipelines.synth``: nothing written, no images); the FHIR-spec EHR columns are
scaled by :class:`models.tabular.TabularPreprocessor` fitted on the training rows;
:class:`models.tabular_learner.TabularLearner` (``auto``, 5 patient-grouped inner
folds) chooses on the training rows; both candidates are then scored on the fresh
cohort by AUROC and log-loss of their logit: the linear head (the learner's own
linear candidate, free weight per column, L2 chosen on a grouped 20 % split) and
the trees refitted on all training rows. The EHR oracle AUROC (the latent EHR
posterior) is the ceiling.

Run: ``python -m benchmarks.tabular_learner_bench [--quick] [--world hard|default]``.
Results (2,000 / 5,000, 3 seed pairs): docs/evaluation/tabular-learner/.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score


def _cohort(world: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                      np.ndarray]:
    from pipelines.feature_spec import DEFAULT_SPEC

    if world == "hard":
        from pipelines.synth.hard import (
            hard_manifest_frame,
            hard_truth_frame,
            simulate_hard_cohort,
        )
        hard = simulate_hard_cohort(n, seed=seed)
        frame, truth = hard_manifest_frame(hard), hard_truth_frame(hard)
    else:
        from pipelines.synth.cohort import simulate_cohort
        from pipelines.synth.manifest import manifest_frame, truth_frame
        cohort = simulate_cohort(n, seed=seed)
        frame, truth = manifest_frame(cohort), truth_frame(cohort)
    cols = DEFAULT_SPEC.column_names()
    return (frame[cols].to_numpy(float), frame["label"].to_numpy(int),
            frame["patient_id"].astype(str).to_numpy(), truth["oracle_ehr"].to_numpy(float))


def _log_loss(y: np.ndarray, z: np.ndarray) -> float:
    return float((np.logaddexp(0.0, z) - y * z).mean())


def run(quick: bool = False, world: str = "hard") -> dict[str, Any]:
    from models.inner_cv import inner_split
    from models.tabular import TabularPreprocessor
    from models.tabular_learner import TabularLearner

    n_train, n_eval = (600, 1500) if quick else (2000, 5000)
    seeds = [(0, 1)] if quick else [(0, 1), (2, 3), (4, 5)]
    rows = []
    for s_train, s_eval in seeds:
        t0 = time.perf_counter()
        X, y, pid, _ = _cohort(world, n_train, s_train)
        Xe, ye, _, oracle = _cohort(world, n_eval, s_eval)
        scaler = TabularPreprocessor().fit(X)
        Z, Ze = scaler.transform(X).astype(float), scaler.transform(Xe).astype(float)
        learner = TabularLearner(folds=5, random_state=s_train).fit(Z, y, pid)
        chose = time.perf_counter() - t0
        fit, stop = inner_split(y, pid, s_train)
        linear = learner._fit_linear(Z, y, fit, stop).predict_logit(
            {"ehr": Ze.astype(np.float32)}, calibrated=False)
        trees = (learner.ensemble_ if learner.ensemble_ is not None else
                 learner._fit_gbm(Z, y, np.arange(len(y)), None, learner.record_["gbm_trees"]))
        gbm = trees.decision_function(Ze)
        rows.append({
            "seeds": [s_train, s_eval], "chosen": learner.learner_,
            "inner_log_loss": {"linear": learner.record_["linear"],
                               "gbm": learner.record_["gbm"], "z": learner.record_["z"]},
            "eval_auroc": {"linear": roc_auc_score(ye, linear), "gbm": roc_auc_score(ye, gbm),
                           "oracle_ehr": roc_auc_score(ye, oracle)},
            "eval_log_loss": {"linear": _log_loss(ye, linear), "gbm": _log_loss(ye, gbm)},
            "choice_seconds": round(chose, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return {"world": world, "n_train": n_train, "n_eval": n_eval, "rows": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--world", choices=("hard", "default"), default="hard")
    args = ap.parse_args()
    run(args.quick, args.world)
