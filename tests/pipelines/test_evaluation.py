"""Evaluation metrics, patient-level bootstrap, ablation and reliability diagrams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from pipelines.evaluation import (
    Estimate,
    ablation_table,
    auprc,
    auroc,
    brier_score,
    ece_by_missingness_pattern,
    evaluate,
    expected_calibration_error,
    paired_auroc_difference,
    paired_difference,
    report_to_dict,
    report_to_markdown,
)
from pipelines.reliability import plot_reliability, reliability_curve

N_BOOT = 200  # enough for CI-width comparisons; keeps the module well under a few seconds


def cohort(n_patients: int, seed: int, rows_per_patient: int | np.ndarray = 1,
           signal: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, p, patient_ids): calibrated logistic scores, rows within a patient duplicated."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n_patients)
    p_pat = 1 / (1 + np.exp(-(signal * x - 1)))
    y_pat = (rng.random(n_patients) < p_pat).astype(int)
    reps = np.broadcast_to(rows_per_patient, (n_patients,))
    ids = np.repeat(np.arange(n_patients), reps)
    return np.repeat(y_pat, reps), np.repeat(p_pat, reps), ids


# --------------------------------------------------------------------------- point estimates


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [1, 6])  # 1 decimal forces many tied scores
def test_point_estimates_match_sklearn(seed: int, decimals: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(400), 0, 1), decimals)
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auprc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    report = evaluate(y, p, np.arange(400), n_boot=0)
    assert report["auroc"].point == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert report["auprc"].point == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert np.isnan(report["auroc"].low)


def test_ece_hand_worked() -> None:
    y = np.array([0, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.85, 0.95])
    # 10 bins: one example per bin -> (0.05 + 0.85 + 0.15 + 0.95) / 4.
    assert expected_calibration_error(y, p) == pytest.approx(0.5)
    # 2 bins: each has event rate 0.5 vs mean p 0.1 and 0.9 -> |0.4| in both.
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.4)
    # Equal-mass bins split at the median 0.5: the same two bins.
    assert expected_calibration_error(y, p, n_bins=2, strategy="quantile") == pytest.approx(0.4)
    # Edges: p == 0.5 opens the upper bin and p == 1 stays in the top bin, so both
    # share one bin: |0.5 - 0.75| (it would be 0.75 if 0.5 fell in the lower bin).
    assert expected_calibration_error([1, 0], [0.5, 1.0], n_bins=2) == pytest.approx(0.25)
    curve = reliability_curve(y, p, n_bins=10)
    assert curve.counts.tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert np.isnan(curve.mean_predicted[2])
    assert curve.ece == pytest.approx(0.5)


# --------------------------------------------------------------------------- bootstrap


def width(estimate: Estimate) -> float:
    return estimate.high - estimate.low


def test_bootstrap_resamples_patients_not_rows() -> None:
    base_y, base_p, base_ids = cohort(300, seed=3)
    dup_y, dup_p, dup_ids = cohort(300, seed=3, rows_per_patient=5)
    base = evaluate(base_y, base_p, base_ids, n_boot=N_BOOT, seed=7)
    by_patient = evaluate(dup_y, dup_p, dup_ids, n_boot=N_BOOT, seed=7)
    by_row = evaluate(dup_y, dup_p, np.arange(len(dup_y)), n_boot=N_BOOT, seed=7)
    assert (by_patient.n_examples, by_patient.n_patients) == (1500, 300)
    for metric in ("auroc", "auprc", "brier", "ece"):
        # Copying each patient's row 5 times adds no information: same resamples, same CI.
        assert by_patient[metric].low == pytest.approx(base[metric].low, abs=1e-9)
        assert by_patient[metric].high == pytest.approx(base[metric].high, abs=1e-9)
        # Treating the copies as independent rows would shrink the CI by about sqrt(5).
        assert width(by_patient[metric]) > 1.5 * width(by_row[metric]), metric


def test_ci_narrows_with_more_patients() -> None:
    small = evaluate(*cohort(150, seed=4, rows_per_patient=2), n_boot=N_BOOT)
    large = evaluate(*cohort(1500, seed=4, rows_per_patient=2), n_boot=N_BOOT)
    for metric in ("auroc", "auprc", "brier"):
        assert width(large[metric]) < 0.6 * width(small[metric]), metric
    assert small["auroc"].low < small["auroc"].point < small["auroc"].high


def test_ece_of_calibrated_predictor_is_small_and_separated_from_miscalibration() -> None:
    # The plug-in ECE is biased upwards (it is a sum of absolute values), so even a
    # perfectly calibrated model's percentile CI sits just above 0; what we can
    # require is that it is near 0 and clearly below a miscalibrated model's.
    hits = 0
    for seed in range(5):
        y, p, ids = cohort(800, seed=seed, rows_per_patient=np.arange(800) % 3 + 1)
        calibrated = evaluate(y, p, ids, n_boot=N_BOOT, seed=seed)["ece"]
        shifted = evaluate(y, np.clip(p + 0.15, 0, 1), ids, n_boot=N_BOOT, seed=seed)["ece"]
        assert calibrated.high < 0.08
        assert shifted.low > calibrated.high
        assert calibrated.bias > 0  # the bootstrap sees the upward bias
        low, _ = calibrated.basic_interval(lower_bound=0.0)
        hits += low < 0.02
    assert hits >= 3


def test_one_class_resamples_are_redrawn_and_counted() -> None:
    # 1 event patient among 30: about a third of resamples miss it.
    y = np.zeros(60, dtype=int)
    y[:2] = 1
    ids = np.repeat(np.arange(30), 2)
    p = np.linspace(0.9, 0.1, 60)
    report = evaluate(y, p, ids, n_boot=N_BOOT, seed=1)
    assert report.n_degenerate > 10
    assert report.n_boot == N_BOOT
    assert report["auroc"].high == pytest.approx(1.0)
    assert report.n_events == 2
    with pytest.raises(ValueError, match="one class"):
        evaluate(np.zeros(10), p[:10], ids[:10], n_boot=10)


def test_seed_reproducible() -> None:
    data = cohort(200, seed=5, rows_per_patient=2)
    assert evaluate(*data, n_boot=50, seed=3) == evaluate(*data, n_boot=50, seed=3)
    assert evaluate(*data, n_boot=50, seed=3) != evaluate(*data, n_boot=50, seed=4)


def test_invalid_inputs_name_the_problem() -> None:
    y, p, ids = cohort(20, seed=0)
    with pytest.raises(ValueError, match="0/1"):
        evaluate(y + 1, p, ids)
    with pytest.raises(ValueError, match=r"first at row 3: 1\.5"):
        evaluate(y, np.where(np.arange(20) == 3, 1.5, p), ids)
    with pytest.raises(ValueError, match="patient_ids has 19"):
        evaluate(y, p, ids[:-1])
    with pytest.raises(ValueError, match="Unrecognised metric"):
        paired_difference(y, p, p, ids, metric="accuracy")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- paired


def test_paired_difference_detects_better_model_and_not_identical_ones() -> None:
    rng = np.random.default_rng(11)
    y, p_good, ids = cohort(400, seed=11, rows_per_patient=2, signal=3.0)
    p_noise = rng.random(len(y))
    better = paired_auroc_difference(y, p_good, p_noise, ids, n_boot=N_BOOT)
    assert better.difference.point == pytest.approx(better.a.point - better.b.point)
    assert better.difference.low > 0
    same = paired_auroc_difference(y, p_good, p_good.copy(), ids, n_boot=N_BOOT)
    assert same.difference.point == 0.0
    assert same.difference.covers(0.0)
    # Tiny noise on the same model: difference CI still covers 0.
    jitter = np.clip(p_good + rng.normal(scale=1e-3, size=len(y)), 0, 1)
    assert paired_auroc_difference(y, p_good, jitter, ids, n_boot=N_BOOT).difference.covers(0.0)


# --------------------------------------------------------------------------- ablation


MODALITIES = ("ehr", "imaging", "notes")
WEIGHTS = {"ehr": 2.0, "imaging": 1.0, "notes": 0.0}  # notes carry no signal


def ablation_data(n_patients: int = 400) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(21)
    x = {m: np.repeat(rng.normal(size=n_patients), 2) for m in MODALITIES}
    logit = sum(WEIGHTS[m] * x[m] for m in MODALITIES)
    y = (rng.random(2 * n_patients) < 1 / (1 + np.exp(-logit))).astype(int)
    y = np.repeat(y[::2], 2)  # one label per patient, shared by its two rows
    return y, np.repeat(np.arange(n_patients), 2), x


def test_ablation_table_recovers_known_contributions() -> None:
    y, ids, x = ablation_data()
    calls: list[frozenset[str]] = []

    def predict(subset: frozenset[str]) -> np.ndarray:
        calls.append(subset)
        logit = sum((WEIGHTS[m] * x[m] for m in subset), np.zeros(len(y)))
        return 1 / (1 + np.exp(-logit))

    availability = pd.DataFrame({m: np.ones(len(y), dtype=bool) for m in MODALITIES})
    table = ablation_table(y, ids, predict, MODALITIES, availability, n_boot=N_BOOT)
    assert [r.name for r in table.rows] == ["fused", "ehr", "imaging", "notes",
                                            "ehr+imaging", "ehr+notes", "imaging+notes"]
    assert len(calls) == len(set(calls)) == 7  # each subset predicted once
    assert table["ehr+imaging"].kinds == ("pair", "without")
    assert table["ehr+imaging"].removed == ("notes",)
    assert table["fused"].delta_auroc is None
    # Dropping notes changes nothing; dropping ehr hurts, more than dropping imaging.
    no_notes = table["ehr+imaging"].delta_auroc
    assert no_notes is not None and no_notes.point == 0.0 and no_notes.covers(0.0)
    no_ehr, no_imaging = table["imaging+notes"].delta_auroc, table["ehr+notes"].delta_auroc
    assert no_ehr is not None and no_imaging is not None
    assert no_ehr.high < 0 and no_imaging.high < 0 and no_ehr.point < no_imaging.point
    assert table["notes"].report["auroc"].covers(0.5)
    assert table["ehr"].report["auroc"].point > table["imaging"].report["auroc"].point
    frame = table.to_frame()
    assert frame.loc["fused", "n_patients"] == 400
    assert frame["delta_auroc"].isna()["fused"]
    assert {"auroc_low", "ece_high", "delta_auroc_high"} <= set(frame.columns)


def test_ablation_available_population_restricts_rows() -> None:
    y, ids, x = ablation_data(300)
    availability = pd.DataFrame({"ehr": np.ones(len(y), dtype=bool),
                                 "imaging": np.repeat(np.arange(300) % 3 != 0, 2),
                                 "notes": np.ones(len(y), dtype=bool)})

    def predict(subset: frozenset[str]) -> np.ndarray:
        logit = sum((WEIGHTS[m] * x[m] for m in subset), np.zeros(len(y)))
        return 1 / (1 + np.exp(-logit))

    table = ablation_table(y, ids, predict, MODALITIES, availability, population="available",
                           n_boot=50)
    assert table["ehr"].report.n_examples == len(y)
    assert table["imaging"].report.n_examples == 400
    assert table["imaging"].coverage == pytest.approx(2 / 3)
    assert table["fused"].report.n_patients == 200
    with pytest.raises(ValueError, match="Unrecognised population"):
        ablation_table(y, ids, predict, MODALITIES, availability,
                       population="complete")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ablation row fused: predict\(\['ehr', 'imaging',"):
        ablation_table(y, ids, lambda s: np.full(len(y), 2.0), MODALITIES, availability)


def test_ece_by_missingness_pattern_counts() -> None:
    y, p, ids = cohort(500, seed=8, rows_per_patient=2)
    n = len(y)
    availability = pd.DataFrame({"ehr": np.ones(n, dtype=bool),
                                 "imaging": np.arange(n) % 4 != 0,
                                 "notes": np.arange(n) >= n - 20})
    table = ece_by_missingness_pattern(y, p, availability, ids, min_n=50, n_boot=N_BOOT)
    counts = {r.pattern: r.n_examples for r in table.rows}
    assert counts == {"ehr+imaging": 735, "ehr": 245, "ehr+imaging+notes": 15, "ehr+notes": 5}
    assert table.rows[0].pattern == "ehr+imaging"  # largest first
    assert table.rows[0].ece is not None and table.rows[0].ece.high < 0.15
    small = [r for r in table.rows if r.n_examples < 50]
    assert small and all(r.ece is None for r in small)
    frame = table.to_frame()
    assert frame["n_examples"].sum() == n
    assert "n < 50" in report_to_markdown(table)


# --------------------------------------------------------------------------- outputs


def test_markdown_and_json_outputs() -> None:
    y, p, ids = cohort(200, seed=9, rows_per_patient=2)
    report = evaluate(y, p, ids, n_boot=50)
    text = report_to_markdown(report)
    assert "| auroc |" in text and "200 patients" in text and "patient-level" in text
    payload = report_to_dict(report)
    json.dumps(payload, allow_nan=False)
    assert payload["metrics"]["auroc"]["point"] == pytest.approx(report["auroc"].point)
    assert payload["n_patients"] == 200 and payload["seed"] == 0
    paired = paired_auroc_difference(y, p, p, ids, n_boot=20)
    assert "a - b" in report_to_markdown(paired)
    json.dumps(report_to_dict(paired), allow_nan=False)


def test_reliability_png_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    y, p, _ = cohort(300, seed=10)
    curves = {"fused": reliability_curve(y, p),
              "EHR only": reliability_curve(y, np.clip(p + 0.1, 0, 1), strategy="quantile")}
    out = plot_reliability(curves, tmp_path / "reliability.png", title="Test diagram")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        assert image.size[0] > 400
        assert "EHR only" in image.info["Description"]
        assert image.info["Title"] == "Test diagram"
    with pytest.raises(ValueError, match="at least one curve"):
        plot_reliability({}, tmp_path / "empty.png")
