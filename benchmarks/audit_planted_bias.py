"""Does the audit find the disparities planted by ``clinfuse synth --bias``, and only those?

Score tables come from ``pipelines.synth`` cohorts, built without the model code.

The score is a logistic regression on the *recorded* data (imaging statistic,
last pre-index EHR values on the generative model's latent scale, note
symptoms, age, sex), cross-fitted over two folds so every patient gets an
out-of-fold score. With ``bias=True`` the recorded lactate of Black patients is
42 % high, so this score over-predicts risk for them: the planted miscalibration.
Modality availability comes from the cohort's withheld flags.

Without ``--bias`` race and ethnicity are drawn independently of everything else
in the generator (``pipelines/synth/patient.py``), so every race or ethnicity
flag on a no-bias cohort is a false one. Age and sex do drive risk, so flags on
them are real and not counted.

The planted miscalibration is about -0.25 on the log-odds scale (Black minus
White calibration intercept; 2 to 3 probability points). Its test statistic
grows with the square root of the number of Black patients: at 10,000 patients
(about 2,000 Black) it averages about 3 standard errors and at 20,000 about 4.8
(seed to seed SD about 1.2), against a Holm cut-off of about 3.5 (p < 0.04 / 80
single-attribute comparisons). No valid multiplicity control over those
comparisons reaches it reliably at 10,000 (a Holm family of the ~10
calibration comparisons alone, at an equal share of alpha per disparity kind,
moves the cut-off only to about 3.4), so the full run audits 40,000 patients per
cohort (about 8,000 Black; 6.3 standard errors on average over the 10 seeds), with and without
``--bias`` on the same seeds. Cohorts are simulated in full (``simulate_cohort``:
the score needs the recorded lactate and respiratory-rate series, which are
most of its cost; images and note text are never rendered).
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from audits import AuditFrame
from pipelines.process_pool import process_pool
from pipelines.synth import SimulatedCohort, simulate_cohort

__all__ = ["BLACK", "HISPANIC", "audit_cohort", "audit_table", "cohort_scores", "run",
           "synth_scores"]

BLACK = "Black or African American"
HISPANIC = "Hispanic or Latino"


def _features(cohort: SimulatedCohort) -> np.ndarray:
    model = cohort.model
    # Lactate is the only lab: a lactate-driven early-warning score, as in sepsis
    # practice, so the planted lactate offset moves the score visibly.
    signals = [model.signal("lactate"), model.signal("resp_rate")]
    rows = []
    for p in cohort.patients:
        img = 0.0 if p.withheld_imaging else float(model.imaging_statistic(p.imaging.volume_ml))
        ehr = []
        for s in signals:
            g = [float(s.to_latent(o.spec_value)) for o in p.observations
                 if o.feature == s.name and o.offset_s <= 0]
            ehr += [(float(np.mean(g)) - s.mu) / s.sd, 0.0] if g else [0.0, 1.0]
        sym = (np.zeros(len(model.symptoms)) if p.withheld_notes
               else p.symptoms.astype(float))
        rows.append([img, float(p.withheld_imaging), *ehr, *sym, float(p.withheld_notes),
                     (p.age_years - 63.0) / 17.0, float(p.sex == "male")])
    return np.array(rows)


def cohort_scores(cohort: SimulatedCohort) -> pd.DataFrame:
    """One row per patient: the score table ``clinfuse score`` would write."""
    x = _features(cohort)
    y = cohort.labels
    pts = cohort.patients
    # Trained where lactate is recorded without offset (every group but Black
    # patients), two-fold cross-fitted, then applied to everyone: a model built
    # at a site whose lab does not carry the planted bias.
    train = np.array([p.race[1] != BLACK for p in pts])
    fold = np.arange(len(y)) % 2
    score = np.empty(len(y))
    for k in (0, 1):
        fit = LogisticRegression(C=1.0, max_iter=2000).fit(x[train & (fold != k)],
                                                           y[train & (fold != k)])
        score[fold == k] = fit.predict_proba(x[fold == k])[:, 1]
    has_image = np.array([not p.withheld_imaging for p in pts])
    has_ehr = np.array([not p.withheld_ehr for p in pts])
    has_note = np.array([not p.withheld_notes for p in pts])
    modalities = ["+".join(m for m, h in (("image", a), ("ehr", b), ("note", c)) if h)
                  for a, b, c in zip(has_image, has_ehr, has_note, strict=True)]
    return pd.DataFrame({
        "example_id": [p.example_id for p in pts],
        "patient_id": [p.patient_id for p in pts],
        "index_time": [(p.index_time - timedelta(0)).isoformat() for p in pts],
        "score": score,
        "label": y.astype(int),
        "sex": [p.sex for p in pts],
        "race": [p.race[1] for p in pts],
        "ethnicity": [p.ethnicity[1] for p in pts],
        "age_band": [p.age_band for p in pts],
        "modalities": modalities,
        "has_image": has_image, "has_ehr": has_ehr, "has_note": has_note,
        "model_version": f"synth-lr-seed{cohort.seed}",
        "threshold": 0.2,
    })


def synth_scores(n: int, seed: int, bias: bool) -> pd.DataFrame:
    return cohort_scores(simulate_cohort(n, seed=seed, bias=bias))


def _first(cohort: SimulatedCohort, n: int) -> SimulatedCohort:
    """The first ``n`` patients: patient ``i`` is drawn from its own child seed, so this
    is exactly the cohort ``simulate_cohort(n, seed)`` would draw."""
    return replace(cohort, patients=cohort.patients[:n],
                   posterior={k: v[:n] for k, v in cohort.posterior.items()})


def recorded_bayes_score(cohort: SimulatedCohort) -> np.ndarray:
    """The Bayes posterior recomputed from the EHR values *as recorded*.

    ``cohort.posterior["bayes"]`` removes the planted lactate offset; a model
    that trusts the recorded values does not, so this score is right for
    everyone except Black patients under ``bias=True``, whose risk it overstates.
    """
    from pipelines.synth.cohort import evidence
    from pipelines.synth.model import posteriors

    model = cohort.model
    ev = evidence(model, cohort.patients)
    prec, lin = ev.ehr_precision.copy(), ev.ehr_linear.copy()
    for i, p in enumerate(cohort.patients):
        series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for s in model.ehr_signals:
            obs = [o for o in p.observations if o.feature == s.name and o.offset_s <= 0]
            if obs:
                series[s.name] = (np.array([-o.offset_s / 3600.0 for o in obs]),
                                  np.array([float(s.to_latent(o.spec_value)) for o in obs]))
        if series:
            prec[i], lin[i] = model.ehr_evidence(series)
    ev.ehr_precision, ev.ehr_linear = prec, lin
    return posteriors(model, ev)["bayes"]


ATTRS = ["sex", "race", "ethnicity", "age_band"]


def audit_table(table: pd.DataFrame, *, seed: int, bias: bool, n_boot: int = 500,
                sensitive: list[str] | None = None, intersections: int = 2
                ) -> dict[str, Any]:
    """Audit one score table; what was flagged on race and ethnicity."""
    audit = AuditFrame(scores=table, sensitive=sensitive or ATTRS, threshold=0.2,
                       n_boot=n_boot, seed=seed, intersections=intersections)
    d = audit.disparities
    flags = audit.flags
    # Flags that attribute a disparity to race or ethnicity: single-attribute groups and
    # intersection cells compared with the same stratum at the reference race/ethnicity
    # (a race x age_band cell compared across age bands is an age finding).
    on_attr = flags[flags["attribute"].isin(["race", "ethnicity"])]

    def found(dim: str, group: str, comparison: str) -> bool:
        hit = flags[(flags["dimension"] == dim) & (flags["group"] == group)
                    & (flags["comparison"] == comparison)]
        return bool(len(hit)) and bool(((hit["difference_lower"] > 0)
                                        | (hit["difference_upper"] < 0)).all())

    def row(metric: str) -> pd.Series:
        return d[(d["dimension"] == "race") & (d["group"] == BLACK)
                 & (d["metric"] == metric)].iloc[0]

    cal, citl = row("calibration_intercept"), row("calibration_in_the_large")
    return {
        "seed": seed, "bias": bias, "n": len(table), "n_tests": audit.n_tests,
        "n_tests_by_tier": audit.n_tests_by_tier,
        "imaging_gap_black": found("race", BLACK, "missing_rate:has_image"),
        "imaging_gap_hispanic": found("ethnicity", HISPANIC, "missing_rate:has_image"),
        "miscalibration_black": found("race", BLACK, "calibration_intercept"),
        # Black minus White calibration intercept (log-odds; < 0: risk overstated) with
        # its 95 % CI and the raw and adjusted p of the score test.
        "calibration_intercept_gap_black": [float(cal["difference"]),
                                            float(cal["difference_lower"]),
                                            float(cal["difference_upper"])],
        "calibration_p_black": [float(cal["p_value"]), float(cal["p_adjusted"])],
        # The same gap in probability points (not tested; for the reader).
        "calibration_in_the_large_gap_black": [float(citl["difference"]),
                                               float(citl["difference_lower"]),
                                               float(citl["difference_upper"])],
        "any_flag_race_or_ethnicity": bool(len(on_attr)),
        "flags_race_or_ethnicity": sorted(f"{r.dimension}={r.group}:{r.comparison}"
                                          for r in on_attr.itertuples()),
    }


def audit_cohort(n: int, seed: int, bias: bool, n_boot: int = 500) -> dict[str, Any]:
    """Audit one synthetic cohort of ``n`` patients (4 attributes and their pairs)."""
    return audit_table(synth_scores(n, seed, bias), seed=seed, bias=bias, n_boot=n_boot)


def _job(args: tuple[tuple[int, ...], int, bool]) -> list[dict[str, Any]]:
    sizes, seed, bias = args
    cohort = simulate_cohort(max(sizes), seed=seed, bias=bias)
    return [audit_table(cohort_scores(_first(cohort, n)), seed=seed, bias=bias)
            for n in sizes]


def _summarise(results: list[dict[str, Any]], n: int, seeds: int) -> dict[str, Any]:
    biased = [r for r in results if r["bias"] and r["n"] == n]
    fair = [r for r in results if not r["bias"] and r["n"] == n]
    share = sum(r["any_flag_race_or_ethnicity"] for r in fair) / len(fair)
    found = {k: sum(r[k] for r in biased) for k in
             ("imaging_gap_black", "imaging_gap_hispanic", "miscalibration_black")}
    met = all(v == seeds for v in found.values()) and share <= 0.10
    return {"patients_per_cohort": n, "seeds": seeds, "bias_found": found, "goal_met": met,
            "no_bias_share_seeds_with_flag_on_race_or_ethnicity": share,
            "no_bias_false_flags": sum(len(r["flags_race_or_ethnicity"]) for r in fair),
            "text": (f"{n} patients x {seeds} seeds: bias found imaging gap "
                     f"{found['imaging_gap_black']}/{seeds} (Black), "
                     f"{found['imaging_gap_hispanic']}/{seeds} (Hispanic), "
                     f"miscalibration {found['miscalibration_black']}/{seeds}; "
                     f"no bias: {share:.0%} of seeds with any race/ethnicity flag "
                     f"(goal: all found, <= 10%: {'met' if met else 'not met'})")}


#: Patients per cohort in the full run (see the module docstring for the power).
FULL_SIZES = (40_000,)


def run(quick: bool = False) -> dict[str, Any]:
    """10 seeds with and without bias; quick: 2000 patients, full: 40,000."""
    sizes = (2000,) if quick else FULL_SIZES
    seeds = list(range(10))
    jobs = [(sizes, s, b) for b in (True, False) for s in seeds]
    started = time.perf_counter()
    with process_pool(2) as pool:  # started safely, never forked (pipelines.process_pool)
        results = [r for part in pool.map(_job, jobs) for r in part]
    by_size = [_summarise(results, n, len(seeds)) for n in sizes]
    return {
        "sizes": list(sizes), "seeds": len(seeds),
        "seconds": round(time.perf_counter() - started, 1),
        "method": ("flags need |difference| above the rule, a 95% patient-bootstrap CI "
                   "excluding 0 and a multiplicity-adjusted p < 0.05: Fisher exact tests "
                   "for rates, Farrington-Manning for the four-fifths rule, a score test "
                   "of equal calibration intercepts; Holm within single-attribute "
                   "comparisons (alpha 0.04) and within intersections (alpha 0.01)"),
        "by_size": by_size, "no_bias_goal": "<= 0.10", "per_seed": results,
        "summary": "; ".join(s["text"] for s in by_size),
    }
