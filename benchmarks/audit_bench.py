"""Audit speed: 1M scored rows, 4 attributes + pairwise intersections, 1000 resamples;
and a 100k-row subset against fairlearn's MetricFrame with bootstrap CIs.

fairlearn resamples rows, so the subset keeps one row per patient (then a patient
bootstrap is a row bootstrap). fairlearn's bootstrap costs about a second per
resample, so it runs ``FAIRLEARN_BOOT`` resamples and its time for 1000 is
extrapolated linearly (its cost is per resample). With so few resamples its CI
endpoints carry Monte Carlo error, so the endpoints are also compared with an
exact row-level bootstrap (1000 multinomial resamples) of the same metrics.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from audits import AuditFrame, load_score_table

ATTRS = ["sex", "race", "ethnicity", "age_band"]
FAIRLEARN_BOOT = 40


def make_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` scored rows from ``0.8 n`` patients (a fifth are repeat encounters)."""
    rng = np.random.default_rng(seed)
    n_pat = int(0.8 * n)
    patient = np.concatenate([np.arange(n_pat), rng.integers(0, n_pat, n - n_pat)])
    pick = lambda levels, p: np.asarray(levels)[rng.choice(len(levels), n_pat, p=p)]  # noqa: E731
    sex = pick(["female", "male"], [0.52, 0.48])
    race = pick(["White", "Black", "Asian", "AIAN", "NHPI", "Unknown"],
                [0.6, 0.2, 0.08, 0.02, 0.01, 0.09])
    eth = pick(["Hispanic", "Not Hispanic"], [0.17, 0.83])
    age = pick(["18-44", "45-64", "65-79", "80+"], [0.3, 0.35, 0.25, 0.1])
    z = rng.normal(size=n)
    score = 1 / (1 + np.exp(-(-2.0 + 1.3 * z)))
    label = (rng.random(n) < 1 / (1 + np.exp(-(-2.0 + 1.3 * z + 0.2 * (race[patient] == "Black")))))
    return pd.DataFrame({"patient_id": patient, "score": score, "label": label.astype(int),
                         "sex": sex[patient], "race": race[patient], "ethnicity": eth[patient],
                         "age_band": age[patient], "has_image": rng.random(n) < 0.8,
                         "has_ehr": rng.random(n) < 0.97, "has_note": rng.random(n) < 0.9,
                         "threshold": 0.2})


def _fairlearn(sub: pd.DataFrame, n_boot: int) -> tuple[Any, float]:
    from fairlearn.metrics import MetricFrame, false_positive_rate, selection_rate
    from sklearn.metrics import recall_score

    metrics = {"selection_rate": lambda y, s: selection_rate(y, s >= 0.2),
               "tpr": lambda y, s: recall_score(y, s >= 0.2),
               "fpr": lambda y, s: false_positive_rate(y, s >= 0.2)}
    started = time.perf_counter()
    mf = MetricFrame(metrics=metrics, y_true=sub["label"], y_pred=sub["score"],
                     sensitive_features=sub[["race", "sex"]], n_boot=n_boot,
                     ci_quantiles=[0.025, 0.975], random_state=0)
    return mf, time.perf_counter() - started


def _row_bootstrap(sub: pd.DataFrame, n_boot: int) -> dict[tuple[str, str, str], tuple]:
    """Exact multinomial row bootstrap of selection rate, TPR, FPR per race x sex."""
    rng = np.random.default_rng(1)
    out = {}
    flag = (sub["score"].to_numpy() >= 0.2).astype(float)
    y = sub["label"].to_numpy().astype(float)
    for (race, sex), g in sub.groupby(["race", "sex"]).groups.items():
        idx = np.asarray([sub.index.get_loc(i) for i in g])
        f, yy = flag[idx], y[idx]
        w = rng.multinomial(idx.size, np.full(idx.size, 1 / idx.size), size=n_boot)
        # Group sizes vary across a full-sample bootstrap; within-group resampling is the
        # conditional version. Both agree closely for selection rate, TPR and FPR.
        sel = w @ f / w.sum(1)
        tpr = (w @ (f * yy)) / (w @ yy)
        fpr = (w @ (f * (1 - yy))) / (w @ (1 - yy))
        for m, rep in (("selection_rate", sel), ("tpr", tpr), ("fpr", fpr)):
            out[(race, sex, m)] = tuple(np.percentile(rep, [2.5, 97.5]))
    return out


def run(quick: bool = False) -> dict[str, Any]:
    n = 100_000 if quick else 1_000_000
    n_boot = 200 if quick else 1000
    rows = make_rows(n)
    started = time.perf_counter()
    table = load_score_table(rows, sensitive=ATTRS)
    audit = AuditFrame(scores=table, n_boot=n_boot, intersections=2)
    full_s = time.perf_counter() - started

    sub = rows.drop_duplicates("patient_id").iloc[: n // 10].reset_index(drop=True)
    started = time.perf_counter()
    small = AuditFrame(scores=load_score_table(sub, sensitive=ATTRS), n_boot=1000,
                       intersections=2)
    ours_s = time.perf_counter() - started
    fl_boot = 10 if quick else FAIRLEARN_BOOT
    mf, fl_s = _fairlearn(sub, fl_boot)
    fl_per = fl_s / fl_boot
    point_err, ci_err_fl, ci_err_row = 0.0, 0.0, 0.0
    ref = _row_bootstrap(sub, 1000)
    lo_fl, hi_fl = mf.by_group_ci
    for (race, sex), fl_row in mf.by_group.iterrows():
        key = ("sex x race", f"{sex} & {race}")
        for m in ("selection_rate", "tpr", "fpr"):
            ours = small.by_group_ci(m).loc[key]
            point_err = max(point_err, abs(ours["value"] - fl_row[m]))
            ci_err_fl = max(ci_err_fl, abs(ours["lower"] - lo_fl.loc[(race, sex), m]),
                            abs(ours["upper"] - hi_fl.loc[(race, sex), m]))
            r_lo, r_hi = ref[(race, sex, m)]
            ci_err_row = max(ci_err_row, abs(ours["lower"] - r_lo), abs(ours["upper"] - r_hi))
    speedup = fl_per * 1000 / ours_s
    return {
        "rows": n, "patients": int(rows["patient_id"].nunique()), "groups": len(audit.groups),
        "attributes": ATTRS, "n_boot": n_boot, "audit_seconds": round(full_s, 2),
        "goal_seconds": 60,
        "subset_rows": len(sub), "subset_audit_seconds_1000_boot": round(ours_s, 2),
        "fairlearn_n_boot_run": fl_boot, "fairlearn_seconds": round(fl_s, 2),
        "fairlearn_seconds_per_resample": round(fl_per, 3),
        "fairlearn_seconds_1000_extrapolated": round(fl_per * 1000, 1),
        "speedup_vs_fairlearn_1000": round(speedup, 1),
        "note": "ours computes 15 metrics, all groups + intersections + missingness; "
                "fairlearn 3 metrics over race x sex (12 groups)",
        "max_point_difference": point_err,
        "max_ci_endpoint_difference_vs_fairlearn": round(ci_err_fl, 4),
        "max_ci_endpoint_difference_vs_row_bootstrap_1000": round(ci_err_row, 4),
        "summary": (f"{n:,} rows, {len(audit.groups)} groups, {n_boot} resamples: "
                    f"{full_s:.1f} s; 100k subset {speedup:.0f}x fairlearn "
                    f"(extrapolated from {fl_boot} resamples), CI endpoints within "
                    f"{ci_err_row:.3f} of a row bootstrap"),
    }
