"""Train -> score -> evaluate on small synthetic cohorts, and every refusal on bad input.

Cohorts are tiny (synth: 200 train / 300 test patients, 8 slices of 32x32), so the
bounds are loose: the Bayes AUROC of such cohorts is ~0.85 and a 40-patient
validation split is noisy. Full-size quality targets are a separate evaluation.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from models.artifact import generate_signing_key, load_artifact, save_artifact
from pipelines.evaluate_model import main_evaluate
from pipelines.scoring import main_score
from pipelines.synth import generate_cohort
from pipelines.training import main_train, train
from tests.pipelines.png_cohort import write_png_cohort
from tests.pipelines.training_config import small_training_config

SMALL = small_training_config(image_epochs=8)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fusion")
    generate_cohort(200, root / "train", seed=21, n_slices=8, size=32, workers=1)
    generate_cohort(300, root / "test", seed=22, n_slices=8, size=32, workers=1)
    model = train(root / "train" / "manifest.csv", root / "model", config=SMALL,
                  cache_dir=root / "cache")
    return {"root": root, "model": model, "key": root / "model.key.pub",
            "train": root / "train" / "manifest.csv", "test": root / "test" / "manifest.csv"}


def _err() -> io.StringIO:
    return io.StringIO()


def test_artifact_has_no_identifiers_and_records_provenance(synth: dict[str, Path]) -> None:
    art = load_artifact(synth["model"], trusted_public_keys=[synth["key"]])
    cfg = art.config
    assert cfg["feature_source"]["kind"] == "fhir-spec"
    assert cfg["population"]["min_age_years"] == 18.0
    assert cfg["outcome"]["horizon_days"] == 30
    assert cfg["note_encoder"].startswith("tfidf")
    assert set(cfg["input_modalities"]) == {"image", "ehr", "note"}
    # The CPU default image network, its auxiliary head refitted beside EHR and notes.
    assert cfg["image"]["encoders"][0]["network_name"] == "threshold"
    assert cfg["image"]["head_refit"] == "joint"
    # The spec's course statistics are reduced-rank blocks of the EHR branch (k = 2).
    blocks = cfg["fusion"]["params"]["rank"]["ehr"]
    assert len(blocks) >= 3 and {k for _, k in blocks} == {2}
    assert blocks[0][0] == [cfg["tabular"]["numeric"].index(f"{f}_course_mean_120h")
                            for f in ("heart_rate", "resp_rate", "sbp", "temperature", "spo2",
                                      "lactate", "wbc", "creatinine", "glucose", "sodium",
                                      "hemoglobin")]
    fp = art.documents["training_data"]
    assert fp["n_rows"] == 200 and len(fp["manifest_sha256"]) == 64
    ids = pd.read_csv(synth["train"], dtype=str)["patient_id"]
    blob = b"".join(p.read_bytes() for p in synth["model"].iterdir())
    assert not any(pid.split("|")[-1].encode() in blob for pid in ids)
    assert (synth["root"] / "model.salt").exists()


def test_train_score_evaluate_end_to_end(synth: dict[str, Path]) -> None:
    root = synth["root"]
    assert main_score(synth["model"], synth["test"], root / "scores.csv",
                      trusted_keys=[synth["key"]], stderr=_err()) == 0
    scores = pd.read_csv(root / "scores.csv")
    assert len(scores) == 300 and scores["score"].between(0, 1).all()
    for column in ("example_id", "patient_id", "index_time", "label", "sex", "race",
                   "modalities", "has_image", "has_ehr", "has_note", "model_version",
                   "threshold_high_risk", "refusal"):
        assert column in scores.columns
    fused = roc_auc_score(scores["label"], scores["score"])
    truth = pd.read_csv(root / "test" / "truth.csv")
    bayes = roc_auc_score(truth["label"], truth["bayes_posterior"])
    # Loose on purpose: 160 training patients and early stopping on 40 validation
    # patients (~6 events) is noisy; measured 0.63-0.67 here against a Bayes AUROC of
    # ~0.85. The full-size targets (2,000 train) are checked by a separate evaluation.
    assert fused > 0.6 and bayes > 0.75, (fused, bayes)

    err = _err()
    assert main_evaluate(synth["model"], synth["test"], root / "eval", 100,
                         trusted_keys=[synth["key"]], stderr=err) == 0, err.getvalue()
    report = json.loads((root / "eval" / "report.json").read_text())
    assert (root / "eval" / "report.md").exists() and (root / "eval" / "reliability.png").exists()
    rows = {r["name"]: r for r in report["ablation"]["rows"]}
    singles = [rows[m]["metrics"]["auroc"]["point"] for m in ("image", "ehr", "note")]
    fused_eval = rows["fused"]["metrics"]["auroc"]["point"]
    # The fused model is about as good as its best single modality (minus noise).
    assert fused_eval >= max(singles) - 0.05, (fused_eval, singles)
    assert "fused vs retrained without image" in report["baseline_comparisons"]


def test_evaluate_refuses_training_patients(synth: dict[str, Path]) -> None:
    err = _err()
    assert main_evaluate(synth["model"], synth["train"], synth["root"] / "leak", 50,
                         trusted_keys=[synth["key"]], stderr=err) == 1
    assert "both train and test" in err.getvalue()


def test_bad_signature_and_other_versions_are_refused(synth: dict[str, Path],
                                                      tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    generate_signing_key(other)
    err = _err()
    assert main_score(synth["model"], synth["test"], tmp_path / "s.csv",
                      trusted_keys=[tmp_path / "other.key.pub"], stderr=err) == 1
    assert "clinfuse score:" in err.getvalue() and "Traceback" not in err.getvalue()

    art = load_artifact(synth["model"], trusted_public_keys=[synth["key"]])
    foreign = tmp_path / "foreign"
    save_artifact(foreign, config={**art.config, "model_format": "someone-else/9"},
                  tensors=art.tensors, documents=art.documents, signing_key=other)
    err = _err()
    assert main_score(foreign, synth["test"], tmp_path / "s.csv",
                      trusted_keys=[tmp_path / "other.key.pub"], stderr=err) == 1
    assert "model format" in err.getvalue()


def test_out_of_population_rows_are_refused(synth: dict[str, Path], tmp_path: Path) -> None:
    frame = pd.read_csv(synth["test"], dtype={"patient_id": str})
    frame.loc[:4, "age_years"] = 15.0
    shutil.copy(synth["test"].with_suffix(".yaml"), tmp_path / "manifest.yaml")
    (tmp_path / "dicom").symlink_to(synth["test"].parent / "dicom")
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    assert main_score(synth["model"], tmp_path / "manifest.csv", tmp_path / "s.csv",
                      trusted_keys=[synth["key"]], stderr=_err()) == 0
    scores = pd.read_csv(tmp_path / "s.csv")
    assert scores.loc[:4, "score"].isna().all()
    assert scores.loc[:4, "refusal"].str.contains("out of population").all()
    assert scores.loc[5:, "score"].notna().all() and scores.loc[5:, "refusal"].isna().all()
    # Issue 20: the rules a manifest cannot answer (alive, admitted) flag every scored row.
    assert scores.loc[:4, "population_unchecked"].isna().all()
    assert scores.loc[5:, "population_unchecked"].str.contains(
        "population rule unchecked: inpatient_encounter_active").all()


def _copy_manifest(src: Path, dst: Path, frame: pd.DataFrame) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src.with_suffix(".yaml"), dst / "manifest.yaml")
    if not (dst / "dicom").exists():
        (dst / "dicom").symlink_to(src.parent / "dicom")
    frame.to_csv(dst / "manifest.csv", index=False)
    return dst / "manifest.csv"


@pytest.mark.parametrize("case, message", [
    ("missing_column", "missing required column"),
    ("bad_label", "no usable row"),  # one bad label only drops its row (test_manifest)
    ("one_class", "both classes"),
    ("unreadable_image", "could not be"),
])
def test_bad_training_input_is_a_clear_error(synth: dict[str, Path], tmp_path: Path,
                                             case: str, message: str) -> None:
    frame = pd.read_csv(synth["train"], dtype={"patient_id": str, "image": str})
    if case == "missing_column":
        frame = frame.drop(columns=["label"])
    elif case == "bad_label":
        frame["label"] = 2
    elif case == "one_class":
        frame["label"] = 0
    manifest = _copy_manifest(synth["train"], tmp_path / "data", frame)
    if case == "unreadable_image":
        (tmp_path / "data" / "dicom").unlink()
        (tmp_path / "data" / "dicom").mkdir()
        for image in frame["image"].dropna():
            (tmp_path / "data" / image).mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / image / "1.dcm").write_bytes(b"not a dicom file")
    err = _err()
    assert main_train(manifest, tmp_path / "model", config_path=None, stderr=err,
                      epochs=1) == 1
    assert message in err.getvalue() and "Traceback" not in err.getvalue(), err.getvalue()


def test_png_manifest_with_free_text_notes(tmp_path: Path) -> None:
    train_csv = write_png_cohort(tmp_path / "train", 200, seed=1)
    test_csv = write_png_cohort(tmp_path / "test", 150, seed=2)
    model = train(train_csv, tmp_path / "model", config=SMALL)
    art = load_artifact(model, trusted_public_keys=None)
    assert art.config["image"]["spatial_dims"] == 2
    assert art.config["feature_source"] == {"kind": "manifest-columns",
                                            "columns": ["age_years", "lactate", "sodium"]}
    assert art.config["fusion"]["params"]["rank"] is None  # free columns: a weight each
    assert main_score(model, test_csv, tmp_path / "s.csv", trusted_keys=[
        tmp_path / "model.key.pub"], stderr=_err()) == 0
    scores = pd.read_csv(tmp_path / "s.csv")
    assert roc_auc_score(scores["label"], scores["score"]) > 0.7
    assert set(scores["modalities"]) >= {"image+ehr+note"}
    assert np.isfinite(scores["score"]).all()


@pytest.mark.slow
def test_quality_targets_reproduced_at_a_smaller_size(tmp_path: Path) -> None:
    """The issue-5 quality targets at a smaller size, with looser bounds.

    Full size (docs/evaluation): train 2,000 / evaluate 5,000 patients of 32x64^2 CT,
    MiniLM notes, 5 seed pairs. Here: train 800 / evaluate 1,500 of 8x32^2 CT, TF-IDF
    notes, one seed pair, 100 bootstrap resamples -- so each bound is looser:

    ========================================  ==============  =================
    target                                    full size       here
    ========================================  ==============  =================
    fused AUROC vs observable Bayes AUROC     >= Bayes - 0.02  >= Bayes - 0.09
    fused - best masked single modality       CI low > 0.02    point > 0.02
    image withheld vs retrained tab+notes     >= -0.01         >= -0.03
    ECE overall                               <= 0.03          <= 0.05
    ECE per pattern (patterns >= 500 / 200)   <= 0.05          <= 0.08
    ========================================  ==============  =================

    Measured (2026-12-07, reduced-rank EHR branch): Bayes 0.855, fused 0.810 (0.800 with
    a free weight per EHR column), best single (ehr) 0.742, image withheld - tab+notes
    +0.005, ECE 0.033, per pattern 0.038 (all three, n=1048) and 0.054 (ehr+note,
    n=269). At this size the fusion head learns from 640 patients, so the gap to Bayes is
    wider than at full size (0.017).
    """
    generate_cohort(800, tmp_path / "train", seed=61, n_slices=8, size=32, workers=1)
    generate_cohort(1500, tmp_path / "test", seed=62, n_slices=8, size=32, workers=1)
    model = train(tmp_path / "train" / "manifest.csv", tmp_path / "model", config=SMALL,
                  cache_dir=tmp_path / "cache")
    err = _err()
    assert main_evaluate(model, tmp_path / "test" / "manifest.csv", tmp_path / "eval", 100,
                         trusted_keys=[tmp_path / "model.key.pub"], stderr=err) == 0, \
        err.getvalue()
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    truth = pd.read_csv(tmp_path / "test" / "truth.csv")
    bayes = roc_auc_score(truth["label"], truth["bayes_posterior"])
    rows = {r["name"]: r["metrics"] for r in report["ablation"]["rows"]}
    fused = rows["fused"]["auroc"]["point"]
    best_single = max(rows[m]["auroc"]["point"] for m in ("image", "ehr", "note"))
    withheld = report["baseline_comparisons"][
        "fused with image withheld vs retrained without image"]["difference"]["point"]
    ece = report["overall"]["metrics"]["ece"]["point"]
    per_pattern = {r["pattern"]: r["mean_predicted"] - r["observed_rate"]
                   for r in report["ece_by_pattern"]["rows"] if r["n_patients"] >= 200}
    pattern_ece = {r["pattern"]: r["ece"]["point"] for r in report["ece_by_pattern"]["rows"]
                   if r["ece"] is not None and r["n_patients"] >= 200}
    measured = {"bayes": bayes, "fused": fused, "best_single": best_single,
                "withheld_minus_tab_notes": withheld, "ece": ece, "pattern_ece": pattern_ece,
                "pattern_bias": per_pattern}
    assert fused >= bayes - 0.09, measured
    assert fused - best_single > 0.02, measured
    assert withheld >= -0.03, measured
    assert ece <= 0.05, measured
    assert all(v <= 0.08 for v in pattern_ece.values()), measured
    # And no large pattern is systematically over- or under-predicted.
    assert all(abs(v) <= 0.05 for v in per_pattern.values()), measured


def test_ehr_rank_blocks_map_spec_statistics_and_their_indicators_to_input_positions(
        ) -> None:
    from models.tabular import TabularPreprocessor
    from pipelines.feature_spec import DEFAULT_SPEC
    from pipelines.model_inputs import TabularEncoding
    from pipelines.training import TrainingError, ehr_rank_blocks

    columns = DEFAULT_SPEC.column_names()  # age, then (mean, trend, count) per feature
    encoding = TabularEncoding([*columns, "bmi"], {})
    raw = np.random.default_rng(0).normal(size=(50, len(columns) + 1))
    lactate = columns.index("lactate_course_mean_120h")
    raw[:5, lactate] = np.nan  # lactate never measured: mean and trend missing
    raw[:5, lactate + 1] = np.nan
    raw[:3, -1] = np.nan  # bmi: not a spec column, so its indicator stays free
    scaler = TabularPreprocessor().fit(raw)
    blocks = ehr_rank_blocks(encoding, scaler, DEFAULT_SPEC, 2)
    n_in = len(columns) + 1
    assert blocks[0] == ([columns.index(f"{f.name}_course_mean_120h")
                          for f in DEFAULT_SPEC.features], 2)
    assert [len(b) for b, _ in blocks] == [11, 11, 11]  # 2 spec indicators: not > k
    free = set(range(n_in + 3)) - {i for b, _ in blocks for i in b}
    assert free == {0, n_in - 1, n_in, n_in + 1, n_in + 2}  # age, bmi, 3 indicators
    with_indicators = ehr_rank_blocks(encoding, scaler, DEFAULT_SPEC, 1)
    assert with_indicators[-1] == ([n_in, n_in + 1], 1)  # lactate mean, trend indicators
    assert ehr_rank_blocks(encoding, scaler, DEFAULT_SPEC, None) == []
    with pytest.raises(TrainingError, match="ehr_rank"):
        ehr_rank_blocks(encoding, scaler, DEFAULT_SPEC, 0)
