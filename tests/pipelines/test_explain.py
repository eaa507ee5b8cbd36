"""``clinfuse explain`` end to end on a synth cohort and on a PNG manifest.

Faithfulness checks on the trained synth model: additivity of every part,
EHR features carrying planted signal (truth.yaml) rank above the noise
features on average, and deleting the top-attributed EHR columns moves the
risk more than deleting random ones.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fhir.resources.R4B.riskassessment import RiskAssessment
from PIL import Image

from models.explain_tabular import ehr_shap
from pipelines.explain import (
    NOT_VALIDATED,
    Explainer,
    _one_row,
    explain,
    main_explain,
    select_row,
)
from pipelines.manifest import read_manifest
from pipelines.scoring import load_model
from pipelines.synth import generate_cohort
from pipelines.training import train
from tests.pipelines.png_cohort import write_png_cohort
from tests.pipelines.training_config import small_training_config

SMALL = small_training_config(image_epochs=6)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain")
    generate_cohort(200, root / "cohort", seed=31, n_slices=8, size=32, workers=1)
    model = train(root / "cohort" / "manifest.csv", root / "model", config=SMALL,
                  cache_dir=root / "cache")
    return {"root": root, "model": model, "manifest": root / "cohort" / "manifest.csv",
            "key": root / "model.key.pub", "cache": root / "cache"}


@pytest.fixture(scope="module")
def explainer(synth: dict[str, Path]) -> Explainer:
    return Explainer(load_model(synth["model"], trusted_keys=[synth["key"]], device="cpu"),
                     synth["cache"])


def test_explain_writes_json_fhir_and_overlays(synth: dict[str, Path]) -> None:
    manifest = read_manifest(synth["manifest"])
    avail = manifest.modalities_present()
    # A patient whose labs came as FHIR Observations (others' came over HL7 v2).
    truth = pd.read_csv(synth["manifest"].parent / "truth.csv")
    ok = (truth["hl7"] == 0) & (truth["withheld_ehr"] == 0)
    row = int(np.flatnonzero(avail.all(axis=1).to_numpy() & ok.to_numpy())[0])
    example = str(manifest.frame["example_id"].iloc[row])
    out = synth["root"] / "out"
    err = io.StringIO()
    assert main_explain(synth["model"], synth["manifest"], out, example_id=example,
                        trusted_keys=[synth["key"]], cache_dir=synth["cache"], stderr=err) == 0
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["example_id"] == example and doc["validation_label"] == NOT_VALIDATED
    assert "percentage points" in doc["scale"] and NOT_VALIDATED in doc["rationale"]
    assert {d["modality"] for d in doc["modalities"]} == {"image", "ehr", "note"}
    assert doc["modality_additivity_error"] < 1e-5 and doc["ehr"]["additivity_error"] < 1e-5
    total = sum(d["points"] for d in doc["modalities"])
    assert abs(total - 100 * (doc["risk"]["probability"] - doc["risk"]["baseline_probability"])
               ) < 1e-6
    top = doc["ehr"]["top_features"][0]
    assert top["text"].endswith("points") and top["column"] in manifest.frame.columns
    # Raw values as recorded, never the scaled model input.
    recorded = manifest.frame[top["column"]].iloc[row]
    assert top["raw_value"] is None or abs(top["raw_value"] - float(recorded)) < 1e-9
    overlays = doc["image"]["overlays"]
    assert overlays and all((out / o["file"]).is_file() and o["alt_text"] for o in overlays)
    with Image.open(out / overlays[0]["file"]) as png:
        assert png.format == "PNG"
    notes = doc["notes"]
    assert not any(s["negated"] and s["logit"] > 0 for s in notes["highlights"])

    ra = json.loads((out / "risk_assessment.json").read_text())
    RiskAssessment.model_validate(ra)
    assert ra["contained"][0]["version"][0]["value"] == doc["model"]["version"]
    assert ra["prediction"][0]["probabilityDecimal"] == pytest.approx(
        doc["risk"]["probability"], abs=1e-6)
    assert "whenPeriod" in ra["prediction"][0]
    assert {c["code"] for c in ra["prediction"][0]["outcome"]["coding"]} == {
        "419620001", "305351004"}
    # The basis references the patient's resources that were used, by id.
    mrn = doc["patient_id"].split("|")[-1]
    bundle = json.loads((synth["manifest"].parent / "fhir" / f"{mrn}.json").read_text())
    ids = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    refs = [b["reference"] for b in ra["basis"]]
    assert refs and set(refs) <= ids
    kinds = {r.split("/")[0] for r in refs}
    assert kinds == {"Observation", "DocumentReference", "ImagingStudy"}


def test_patient_picks_latest_example_and_bad_ids_fail(synth: dict[str, Path]) -> None:
    manifest = read_manifest(synth["manifest"])
    pid = str(manifest.frame["patient_id"].iloc[5])
    assert select_row(manifest, patient_id=pid.split("|")[-1]) == 5
    err = io.StringIO()
    assert main_explain(synth["model"], synth["manifest"], synth["root"] / "bad",
                        example_id="no-such-example", trusted_keys=[synth["key"]],
                        stderr=err) == 1
    assert "no-such-example" in err.getvalue()


def test_signal_features_rank_above_noise_and_deletion(synth: dict[str, Path],
                                                       explainer: Explainer) -> None:
    truth = yaml.safe_load((synth["manifest"].parent / "truth.yaml").read_text())
    roles = {k: v["role"] for k, v in truth["signal"]["ehr"].items()}
    manifest = read_manifest(synth["manifest"])
    model = explainer.model
    rows = np.flatnonzero(manifest.modalities_present()["ehr"].to_numpy())[:80]
    importance: dict[str, list[float]] = {k: [] for k in roles}
    top_moves: list[float] = []
    random_moves: list[float] = []
    rng = np.random.default_rng(0)
    bg, _ = explainer.background(manifest)
    for row in rows:
        doc = explainer.explain_row(manifest, int(row))
        for name in roles:
            importance[name].append(abs(doc["ehr"]["by_feature_points"].get(name, 0.0)))
        # Deletion: set the 5 top-|SHAP| model-input columns to the background mean.
        sub = manifest.frame.iloc[[int(row)]]
        assert model.scaler is not None
        z = model.scaler.transform(model.encoding.transform(sub, "t"))
        inputs = model.inputs(_one_row(manifest, int(row)), synth["cache"])
        X = {k: v[:1] for k, v in inputs.X.items()}
        mask = model.mask(inputs.available)
        res = ehr_shap(model.fusion, X, mask[0], bg)
        order = np.argsort(-np.abs(res.values))
        p = model.fusion.predict_proba(X, mask)[0, 1]
        for cols, sink in ((order[:5], top_moves),
                           (rng.choice(z.shape[1], 5, replace=False), random_moves)):
            z2 = X["ehr"].copy()
            z2[0, cols] = bg[:, cols].mean(axis=0)
            sink.append(abs(model.fusion.predict_proba({**X, "ehr": z2}, mask)[0, 1] - p))
    mean_imp = {k: float(np.mean(v)) for k, v in importance.items()}
    ranked = sorted(mean_imp, key=lambda k: -mean_imp[k])
    signal_rank = np.mean([ranked.index(k) for k in roles if roles[k] == "signal"])
    noise_rank = np.mean([ranked.index(k) for k in roles if roles[k] == "noise"])
    signal_mean = np.mean([v for k, v in mean_imp.items() if roles[k] == "signal"])
    noise_mean = np.mean([v for k, v in mean_imp.items() if roles[k] == "noise"])
    # Measured with the 160-patient model: mean rank 4.9 (signal) vs 5.3 (noise), mean
    # |points| 1.19 vs 1.12 -- a slim margin, because so small a model barely learns
    # the EHR signal; the explainer itself is checked exactly in tests/models.
    assert signal_rank < noise_rank, (signal_rank, noise_rank, mean_imp)
    assert signal_mean > noise_mean, (signal_mean, noise_mean, mean_imp)
    assert np.mean(top_moves) > 2 * np.mean(random_moves)


def test_explain_on_png_manifest(tmp_path: Path) -> None:
    manifest = write_png_cohort(tmp_path / "png", n=120, seed=3)
    model = train(manifest, tmp_path / "model", config=SMALL, cache_dir=tmp_path / "cache")
    frame = read_manifest(manifest).frame
    row = int(np.flatnonzero((frame["image"].fillna("") != "") &
                             (frame["note"].fillna("") != ""))[0])
    pid = str(frame["patient_id"].iloc[row])
    doc = explain(model, manifest, tmp_path / "out", patient_id=pid,
                  trusted_keys=[tmp_path / "model.key.pub"], cache_dir=tmp_path / "cache")
    assert doc["image"]["shape"] == [32, 32] and doc["image"]["overlays"]
    assert (tmp_path / "out" / doc["image"]["overlays"][0]["file"]).is_file()
    ra = doc["risk_assessment"]
    RiskAssessment.model_validate(ra)
    assert {b["type"] for b in ra["basis"]} >= {"ImagingStudy", "DocumentReference",
                                                 "Observation"}
    assert any("lactate" in f["column"] for f in doc["ehr"]["top_features"])
