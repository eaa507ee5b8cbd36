"""``clinfuse evaluate --cv``: the fused model and the baselines in the same patient folds.

Cohorts are tiny (a 120-patient synth folder, a 90-patient RGB JPEG + notes manifest)
and the fused model's config is cut down (a single L2 strength, 2 image epochs), so the
properties checked are structural (folds, coverage, the cv.json shape, a baseline
recomputed by hand, paired differences), not quality targets.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from audits.model_comparison import ModelComparison
from pipelines.baselines import BASELINES
from pipelines.cv_splits import SplitError, grouped_folds, temporal_folds
from pipelines.manifest import RESERVED_COLUMNS
from pipelines.synth import generate_cohort
from pipelines.training import train
from services.cli import build_parser
from tests.pipelines.png_cohort import write_png_cohort
from tests.pipelines.training_config import small_training_config

MODEL_KEYS = {"auroc", "ci", "auprc", "brier", "ece"}


def _config(path: Path) -> Path:
    cfg = small_training_config(image_epochs=2)
    # One L2 strength instead of the grid: the per-branch search is most of a fold's time.
    cfg["fusion"]["l2"] = [0.03]
    # The folds' image encoders train 2 epochs, so inner CV may rightly drop imaging in a
    # fold (models.fusion_simplify); these tests check the folds' own image embeddings.
    cfg["fusion"]["simplify"] = "off"
    path.write_text(yaml.safe_dump(cfg))
    return path


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_cli(argv: list[str]) -> tuple[int, str, list[str]]:
    """Run ``clinfuse`` through its parser; (exit code, stderr, warnings logged)."""
    args = build_parser().parse_args(argv)
    handler = _Records()
    logging.getLogger().addHandler(handler)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = args.func(args)
    finally:
        logging.getLogger().removeHandler(handler)
    return code, err.getvalue(), handler.messages


@pytest.fixture(scope="module")
def synth_cv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cv-synth")
    generate_cohort(120, root / "cohort", seed=41, n_slices=8, size=32, workers=1)
    manifest = root / "cohort" / "manifest.csv"
    code, err, warnings = _run_cli([
        "evaluate", "--cv", "3", "--manifest", str(manifest), "--out", str(root / "cv"),
        "--n-boot", "200", "--config", str(_config(root / "small.yaml")), "--seed", "5"])
    assert code == 0, err
    return {"root": root, "manifest": manifest, "out": root / "cv", "stderr": err,
            "warnings": warnings, "cv": json.loads((root / "cv" / "cv.json").read_text()),
            "oof": pd.read_csv(root / "cv" / "oof_scores.csv", dtype={"example_id": str,
                                                                     "patient_id": str})}


def _check_shape(cv: dict[str, Any], oof: pd.DataFrame) -> None:
    models = cv["models"]
    assert set(models) == {"fused", *BASELINES}, sorted(models)
    for name, m in models.items():
        assert set(m) >= MODEL_KEYS, (name, sorted(m))
        lo, hi = m["ci"]
        assert lo <= m["auroc"] <= hi, (name, m)
        assert 0 <= m["brier"] <= 1 and 0 <= m["ece"] <= 1 and 0 < m["auprc"] <= 1
    best = cv["best_baseline"]
    assert best != "fused"
    assert models[best]["auroc"] == max(m["auroc"] for k, m in models.items() if k != "fused")
    diff = cv["fused_minus_best"]
    assert diff["estimate"] == pytest.approx(models["fused"]["auroc"] - models[best]["auroc"],
                                             abs=1e-12)
    assert diff["ci"][0] <= diff["estimate"] <= diff["ci"][1]
    # Pooled out-of-fold metrics, recomputed here with scikit-learn.
    y = oof["label"].to_numpy()
    for name in models:
        assert models[name]["auroc"] == pytest.approx(roc_auc_score(y, oof[name]), abs=1e-12)
        assert models[name]["auprc"] == pytest.approx(average_precision_score(y, oof[name]),
                                                      abs=1e-12)
        assert models[name]["brier"] == pytest.approx(brier_score_loss(y, oof[name]),
                                                      abs=1e-12)
    assert list(oof.columns[:5]) == ["example_id", "patient_id", "fold", "repeat", "label"]


def _check_folds(oof: pd.DataFrame, manifest: pd.DataFrame) -> None:
    for _, part in oof.groupby("repeat"):
        # Every example scored exactly once per repeat ...
        assert sorted(part["example_id"]) == sorted(manifest["example_id"].astype(str))
        # ... and no patient in two test folds, so never in its own training rows.
        assert (part.groupby("patient_id")["fold"].nunique() == 1).all()


def test_cv_on_a_synth_folder(synth_cv: dict[str, Any]) -> None:
    cv, oof = synth_cv["cv"], synth_cv["oof"]
    manifest = pd.read_csv(synth_cv["manifest"], dtype={"example_id": str, "patient_id": str})
    _check_shape(cv, oof)
    _check_folds(oof, manifest)
    assert cv["split"]["kind"] == "grouped" and cv["split"]["k"] == 3
    assert cv["split"]["seeds"] == [5] and len(cv["folds"]) == 3
    assert sum(f["n_test_patients"] for f in cv["folds"]) == 120
    assert cv["skipped_baselines"] == {}
    assert all("image encoder embedding" in f["image_features"] for f in cv["folds"])
    assert cv["wall_seconds"] > 0 and cv["comparison"]["n_boot"] == 200
    assert "clinfuse evaluate: fused AUROC" in synth_cv["stderr"]
    # Folds train on < 500 patients by design: no "use --cv" warning from inside --cv.
    assert not any("evaluate --cv" in w for w in synth_cv["warnings"])
    page = (synth_cv["out"] / "cv.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Fused − best baseline" in page


def test_a_baseline_recomputed_by_hand_in_the_same_folds_matches(
        synth_cv: dict[str, Any]) -> None:
    """The tabular logistic regression, rebuilt from the manifest and oof fold labels."""
    oof = synth_cv["oof"]
    manifest = pd.read_csv(synth_cv["manifest"], dtype={"example_id": str, "patient_id": str})
    sidecar = yaml.safe_load(synth_cv["manifest"].with_suffix(".yaml").read_text())
    columns = [c for c in manifest.columns
               if c not in RESERVED_COLUMNS and c not in sidecar["sensitive"]]
    X = manifest.set_index("example_id")[columns].astype(float)
    y = manifest.set_index("example_id")["label"]
    expected = pd.Series(np.nan, index=oof["example_id"])
    for _, test in oof.groupby("fold"):
        train_ids = X.index.difference(test["example_id"])
        model = make_pipeline(SimpleImputer(strategy="median", add_indicator=True),
                              StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        model.fit(X.loc[train_ids], y.loc[train_ids])
        expected[test["example_id"].to_numpy()] = model.predict_proba(
            X.loc[test["example_id"]])[:, 1]
    np.testing.assert_allclose(oof["tabular_lr"].to_numpy(), expected.to_numpy(), atol=1e-6)
    assert synth_cv["cv"]["models"]["tabular_lr"]["auroc"] == pytest.approx(
        roc_auc_score(oof["label"], expected.to_numpy()), abs=1e-9)


def test_cv_on_rgb_jpeg_images_with_notes(tmp_path: Path) -> None:
    manifest = write_png_cohort(tmp_path / "cohort", 90, seed=7, size=32,
                                formats=(("RGB", ".jpg"),))
    assert {p.suffix for p in (tmp_path / "cohort" / "images").iterdir()} == {".jpg"}
    code, err, _ = _run_cli([
        "evaluate", "--cv", "3", "--repeats", "2", "--manifest", str(manifest),
        "--out", str(tmp_path / "cv"), "--n-boot", "200",
        "--config", str(_config(tmp_path / "small.yaml"))])
    assert code == 0, err
    cv = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert cv["split"]["seeds"] == [0, 1] and len(cv["folds"]) == 6
    assert all(len(v) == 2 for v in cv["auroc_per_repeat"].values())
    oof = pd.read_csv(tmp_path / "cv" / "oof_scores.csv", dtype={"example_id": str,
                                                                 "patient_id": str})
    assert len(oof) == 2 * 90 and set(oof["repeat"]) == {0, 1}
    # The two repeats are different partitions.
    folds = oof.pivot(index="example_id", columns="repeat", values="fold")
    assert not (folds[0] == folds[1]).all()
    _check_shape(cv, oof)
    _check_folds(oof, pd.read_csv(manifest, dtype={"patient_id": str}).assign(
        example_id=lambda f: [str(i) for i in range(len(f))]))
    # The fused model read the JPEGs: the probe used its image encoder in every fold.
    assert all("image encoder embedding" in f["image_features"] for f in cv["folds"])


def test_cv_temporal_split_tests_on_later_index_times(tmp_path: Path) -> None:
    manifest = write_png_cohort(tmp_path / "cohort", 90, seed=8, size=32)
    frame = pd.read_csv(manifest)
    rng = np.random.default_rng(8)
    start = pd.Timestamp("2023-01-01", tz="UTC")
    frame["index_time"] = [(start + pd.Timedelta(hours=int(h))).isoformat()
                           for h in rng.integers(0, 24 * 365, len(frame))]
    frame.to_csv(manifest, index=False)
    code, err, _ = _run_cli([
        "evaluate", "--cv", "2", "--split", "temporal", "--manifest", str(manifest),
        "--out", str(tmp_path / "cv"), "--n-boot", "100",
        "--config", str(_config(tmp_path / "small.yaml"))])
    assert code == 0, err
    cv = json.loads((tmp_path / "cv" / "cv.json").read_text())
    oof = pd.read_csv(tmp_path / "cv" / "oof_scores.csv", dtype={"example_id": str})
    assert cv["split"]["kind"] == "temporal" and len(cv["folds"]) == 2
    times = pd.to_datetime(frame["index_time"], utc=True)
    for f in cv["folds"]:
        assert pd.Timestamp(f["train_index_time_max"]) < pd.Timestamp(f["test_index_time_min"])
    # Checked from the out-of-fold rows too: fold k's test rows come after every row that
    # any earlier block (fold k's training rows are among them) holds.
    by_id = times.set_axis(frame.index.astype(str))
    tested = oof.assign(t=by_id[oof["example_id"]].to_numpy())
    first_block = by_id.drop(oof["example_id"])  # block 0: training data only
    assert tested["t"].min() > first_block.max()
    assert tested.groupby("fold")["t"].min().is_monotonic_increasing
    assert len(oof) == oof["example_id"].nunique() == 60  # blocks 1 and 2 of 3
    _check_shape(cv, oof)


def test_external_split_trains_on_one_cohort_and_tests_on_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--train-manifest``: every model fitted on cohort A only and scored on cohort B,
    whose relative image paths resolve against its own folder (both manifests given
    relative to the working directory); a patient in both is tested nowhere."""
    monkeypatch.chdir(tmp_path)
    train_csv = write_png_cohort(tmp_path / "a", 90, seed=8, size=32)
    test_csv = write_png_cohort(tmp_path / "b", 60, seed=9, size=32,
                                formats=(("RGB", ".jpg"),))
    test = pd.read_csv(test_csv)
    test["patient_id"] = [p if i < 2 else f"Q{i:05d}" for i, p in
                          enumerate(test["patient_id"])]  # rows 0, 1 share A's patients
    test.to_csv(test_csv, index=False)
    code, err, _ = _run_cli([
        "evaluate", "--train-manifest", "a/manifest.csv", "--manifest", "b/manifest.csv",
        "--out", str(tmp_path / "ext"), "--n-boot", "100",
        "--config", str(_config(tmp_path / "small.yaml"))])
    assert code == 0, err
    cv = json.loads((tmp_path / "ext" / "cv.json").read_text())
    oof = pd.read_csv(tmp_path / "ext" / "oof_scores.csv", dtype={"patient_id": str})
    assert cv["split"]["kind"] == "external" and len(cv["folds"]) == 1
    assert cv["external"] == {"train_manifest": "manifest.csv", "n_train_rows": 90,
                              "n_test_rows": 60, "n_test_rows_left_out_shared_patients": 2}
    assert cv["folds"][0]["n_train_rows"] == 90 and cv["folds"][0]["n_fused_refused"] == 0
    assert sorted(oof["patient_id"]) == sorted(test["patient_id"][2:])
    assert "image encoder embedding" in cv["folds"][0]["image_features"]
    _check_shape(cv, oof)
    # The tabular baseline, refitted by hand on A and scored on B, is the one reported.
    columns = ["age_years", "lactate", "sodium"]
    a = pd.read_csv(train_csv)
    model = make_pipeline(SimpleImputer(strategy="median", add_indicator=True),
                          StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    model.fit(a[columns], a["label"])
    np.testing.assert_allclose(oof["tabular_lr"], model.predict_proba(
        test[columns].iloc[2:])[:, 1], atol=1e-6)
    # A test cohort without a training feature column is refused in one line.
    test.drop(columns=["lactate"]).to_csv(test_csv, index=False)
    code, err, _ = _run_cli([
        "evaluate", "--train-manifest", str(train_csv), "--manifest", str(test_csv),
        "--out", str(tmp_path / "ext2"), "--config", str(_config(tmp_path / "small.yaml"))])
    assert code == 1 and "lacks the training manifest's feature column(s) ['lactate']" in err


def test_temporal_folds_train_on_the_past_only() -> None:
    rng = np.random.default_rng(0)
    n = 150
    pids = np.array([f"p{i // 3}" for i in range(n)])  # three rows per patient
    y = rng.integers(0, 2, n)
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    times = pd.Series([t0 + pd.Timedelta(hours=int(h)) for h in rng.integers(0, 5000, n)])
    folds = temporal_folds(pids, times, y, 4)
    assert len(folds) == 4
    seen: set[str] = set()
    for f in folds:
        assert times[f.train].max() < times[f.test].min()
        assert not set(pids[f.train]) & set(pids[f.test])
        assert not set(pids[f.test]) & seen  # each patient tested once at most
        seen |= set(pids[f.test])
    # The test blocks move forward in time, and the training window grows.
    starts = [times[f.test].min() for f in folds]
    assert starts == sorted(starts)
    with pytest.raises(SplitError, match="index_time"):
        temporal_folds(pids, pd.Series([None] * n), y, 4)


def test_grouped_folds_repeat_with_new_seeds() -> None:
    rng = np.random.default_rng(1)
    pids = np.array([f"p{i // 2}" for i in range(200)])
    y = rng.integers(0, 2, 200)
    folds = grouped_folds(pids, y, 4, repeats=2, seed=3)
    assert [(f.repeat, f.seed) for f in folds] == [(0, 3)] * 4 + [(1, 4)] * 4
    for r in (0, 1):
        tests = [f.test for f in folds if f.repeat == r]
        assert sorted(np.concatenate(tests)) == list(range(200))
        for f in folds:
            assert not set(pids[f.train]) & set(pids[f.test])
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(folds[:4], folds[4:],
                                                                  strict=True))
    with pytest.raises(SplitError, match="label 1"):
        grouped_folds(pids, np.r_[np.ones(2), np.zeros(198)].astype(int), 3)


def test_model_comparison_is_paired_and_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    n = 400
    y = rng.integers(0, 2, n)
    pids = np.arange(n) // 2
    good = 1 / (1 + np.exp(-(2.0 * y + rng.normal(size=n))))
    weak = 1 / (1 + np.exp(-(0.3 * y + rng.normal(size=n))))
    mc = ModelComparison(y, {"good": good, "weak": weak, "same": good.copy()}, pids,
                         n_boot=300, seed=0)
    assert mc.points["good"]["auroc"] == pytest.approx(roc_auc_score(y, good), abs=1e-12)
    assert mc.points["weak"]["auprc"] == pytest.approx(average_precision_score(y, weak),
                                                       abs=1e-12)
    # A model against its copy: every replicate gives 0 (the resamples are shared).
    assert mc.difference("good", "same").to_dict() == {"estimate": 0.0, "ci": [0.0, 0.0]}
    d = mc.difference("good", "weak")
    assert 0 < d.low < d.estimate < d.high
    lo, hi = mc.model_dict("weak")["ci"]
    assert lo < mc.points["weak"]["auroc"] < hi and hi - lo < 0.2


def test_train_on_a_small_cohort_points_to_cv(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(3)
    n = 80
    x = rng.normal(size=n)
    pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)],
                  "label": (rng.random(n) < 1 / (1 + np.exp(-2 * x))).astype(int),
                  "lactate": x, "sodium": rng.normal(size=n)}).to_csv(
        tmp_path / "m.csv", index=False)
    config = {"device": "cpu", "workers": 1, "fusion": {"l2": [0.03]}}
    with caplog.at_level(logging.WARNING, logger="pipelines.training"):
        train(tmp_path / "m.csv", tmp_path / "model", config=config)
    lines = [r.getMessage() for r in caplog.records if "evaluate --cv" in r.getMessage()]
    assert len(lines) == 1 and "80 patients (under 500)" in lines[0]
    assert "\n" not in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.training"):
        train(tmp_path / "m.csv", tmp_path / "model2", config=config, warn_small=False)
    assert not any("evaluate --cv" in r.getMessage() for r in caplog.records)


def test_evaluate_takes_a_model_or_cv_not_both(tmp_path: Path) -> None:
    code, err, _ = _run_cli(["evaluate", "--manifest", str(tmp_path / "m.csv")])
    assert code == 2 and "--model" in err and "--cv" in err and "--train-manifest" in err
    code, err, _ = _run_cli(["evaluate", "--cv", "3", "--train-manifest", "a",
                             "--manifest", "x"])
    assert code == 2
    code, err, _ = _run_cli(["evaluate", "--train-manifest", "a", "--split", "temporal",
                             "--manifest", "x"])
    assert code == 2 and "--train-manifest is one split" in err
    code, err, _ = _run_cli(["evaluate", "--model", "m", "--cv", "3", "--manifest", "x"])
    assert code == 2
    code, err, _ = _run_cli(["evaluate", "--model", "m", "--split", "temporal",
                             "--manifest", "x"])
    assert code == 2 and "go with --cv" in err
