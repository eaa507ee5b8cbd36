"""``train`` with the inner-CV EHR learner choice (issue 18), end to end on a tiny cohort.

A 300-row, 150-patient tabular manifest whose risk is U-shaped in lactate: ``auto``
picks the boosted trees; the trees travel in the signed artifact as safetensors
arrays (no pickle); the loaded model's EHR input is the trees' logit; the dashboard
explanation uses exact TreeSHAP and adds up; the model card names the choice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from models.explain_trees import tree_ehr_shap
from models.model_card import build_model_card, render_markdown
from pipelines.explain import Explainer
from pipelines.manifest import read_manifest
from pipelines.scoring import load_model
from pipelines.training import TrainingError, train

CONFIG = {"workers": 1, "device": "cpu", "notes": {"encoder": "tfidf"},
          "tabular": {"learner": "auto", "inner_folds": 3}}


def _write(out: Path, n: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    lactate, sodium = rng.normal(size=n), rng.normal(size=n)
    z = 2.0 * lactate ** 2 - 2.0 + 0.3 * sodium
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    rows = [{"patient_id": f"P{i // 2:04d}", "label": int(y[i]),
             "index_time": f"2024-01-{1 + i % 2:02d}T00:00:00Z", "image": "", "note": "",
             "age_years": float(rng.integers(20, 90)), "lactate": float(lactate[i]),
             "sodium": float(sodium[i]) if rng.random() > 0.1 else np.nan,
             "sex": str(rng.choice(["female", "male"]))} for i in range(n)]
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    (out / "manifest.yaml").write_text(
        "sensitive: [sex]\nfeature_source: manifest\noutcome:\n  name: x\n  definition: toy\n"
        "  horizon_days: 30\n  population: adults\n")
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tabular_learner")
    manifest = _write(root / "cohort")
    model = train(manifest, root / "model", config=CONFIG, cache_dir=root / "cache",
                  warn_small=False)
    return {"root": root, "model": model, "manifest": manifest,
            "key": root / "model.key.pub"}


def test_auto_picks_trees_and_the_artifact_stores_them_without_pickle(
        trained: dict[str, Path]) -> None:
    names = sorted(p.name for p in trained["model"].iterdir())
    assert "tabular_gbm.safetensors" in names
    assert all(n.endswith((".json", ".safetensors", ".sig")) for n in names), names
    m = load_model(trained["model"], trusted_keys=[trained["key"]], device="cpu")
    rec = m.config["tabular_learner"]
    assert rec["learner"] == "gbm" and rec["metric"] == "log_loss" and rec["folds"] == 3
    assert rec["gbm"] < rec["linear"] and len(rec["per_fold"]) == 3
    assert rec["random_state"] == m.config["training"]["seed"]
    # Scoring feeds the fusion the loaded trees' logit on the scaled columns.
    manifest = read_manifest(trained["manifest"])
    inputs = m.inputs(manifest, trained["root"] / "cache")
    assert m.scaler is not None and m.tabular_learner.ensemble_ is not None
    scaled = m.scaler.transform(m.encoding.transform(manifest.frame, "x"))
    expected = m.tabular_learner.ensemble_.decision_function(scaled).astype(np.float32)
    np.testing.assert_array_equal(inputs.X["ehr"][:, 0], expected)
    # The trees carry the U-shape: their logit ranks the cohort far better than lactate.
    y = manifest.frame["label"].to_numpy(int)
    lactate = manifest.frame["lactate"].to_numpy(float)
    assert roc_auc_score(y, expected) > max(roc_auc_score(y, lactate),
                                            roc_auc_score(y, -lactate)) + 0.15


def test_explanations_are_exact_tree_shap_and_add_up(trained: dict[str, Path]) -> None:
    m = load_model(trained["model"], trusted_keys=[trained["key"]], device="cpu")
    manifest = read_manifest(trained["manifest"])
    doc = Explainer(m, trained["root"] / "cache").explain_row(manifest, 3)
    assert doc["ehr"]["method"].startswith("shap.TreeExplainer")
    assert doc["ehr"]["additivity_error"] < 1e-6
    assert doc["ehr"]["top_features"][0]["feature"] == "lactate"
    # Independently of the explainer's own bookkeeping: the EHR values add up to the
    # fused calibrated logit minus the fused model at the trees' expected logit.
    inputs = m.inputs(manifest, trained["root"] / "cache")
    mask = inputs.available[:, [("image", "ehr", "note").index(k) for k in m.modalities]]
    raw = m.encoding.transform(manifest.frame, "x")
    assert m.scaler is not None and m.tabular_learner.ensemble_ is not None
    for row in (0, 7, 42):
        X = {k: v[row:row + 1] for k, v in inputs.X.items() if k in m.modalities}
        es = tree_ehr_shap(m.fusion, m.tabular_learner.ensemble_,
                           m.scaler.transform(raw[row:row + 1]), X, mask[row])
        fx = float(m.fusion.predict_logit(X, mask[row:row + 1])[0])
        assert es.fx == pytest.approx(fx, abs=1e-5)
        assert abs(float(es.values.sum()) - (es.fx - es.base_value)) < 1e-6


def test_model_card_names_the_learner_choice(trained: dict[str, Path]) -> None:
    m = load_model(trained["model"], trusted_keys=[trained["key"]], device="cpu")
    card = build_model_card(m.artifact)
    assert card["inputs"]["tabular_learner"]["learner"] == "gbm"
    text = render_markdown(card)
    assert "Tabular learner:** Tabular (EHR) branch: gradient-boosted trees, chosen by " \
           "patient-grouped inner 3-fold cross-validation" in text


def test_unknown_learner_is_a_training_error(trained: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"tabular\.learner: tabular learner must be one of"):
        train(trained["manifest"], tmp_path / "model",
              config={**CONFIG, "tabular": {"learner": "forest"}}, cache_dir=tmp_path / "c",
              warn_small=False)
