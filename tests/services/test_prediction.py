"""Predictions over FHIR on SQLite and PostgreSQL, cross-checked against ``clinfuse score``.

A small synth cohort and model (the explain tests' pattern) are built once. Patients
are ingested from their FHIR Bundles and their CT series stored in the DICOM
store; the service's prediction must equal ``clinfuse score`` and the Explainer on
the research manifest's row for the same patient and index time (to 1e-6), so the
FHIR path (features, notes, imaging from the store) reproduces the manifest.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.parameters import Parameters
from fhir.resources.R4B.riskassessment import RiskAssessment
from sqlalchemy import Engine, func, select

from fhir_adapters.record import record_from_json
from models.artifact import generate_signing_key
from pipelines.explain import NOT_VALIDATED
from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from services.db import session_scope
from services.prediction import ModelLoadError, PredictionService
from services.tables import AccessLogRow, PatientRow, PredictionRow
from tests.service_model import SynthModel
from tests.services.service_support import bearer

MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"
FHIR = {"Content-Type": "application/fhir+json"}
TOL = 1e-6


@pytest.fixture(scope="module")
def synth(service_model: SynthModel) -> SynthModel:
    return service_model


def service_settings(engine: Engine | None, tmp_path: Path, synth: SynthModel | None,
                     **extra: Any) -> Settings:
    url = (engine.url.render_as_string(hide_password=False) if engine is not None
           else f"sqlite:///{tmp_path / 'clinfuse.db'}")
    model: dict[str, Any] = {}
    if synth is not None:
        model = {"model_path": synth.model, "model_trusted_keys": [synth.key],
                 # Content-keyed caches may be shared between apps, as between restarts.
                 "cache_dir": synth.root / "service-cache"}
    return Settings(database_url=url, data_dir=tmp_path / "data", **{**model, **extra})


@pytest.fixture
def client(db_engine: Engine, synth: SynthModel, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(service_settings(db_engine, tmp_path, synth))) as c:
        yield c


def app_of(client: TestClient) -> FastAPI:
    app: FastAPI = client.app  # type: ignore[assignment]
    return app


def ingest(client: TestClient, synth: SynthModel, row: int,
           bundle: dict[str, Any] | None = None) -> str:
    """Store the row's patient (FHIR Bundle) and CT series; returns the opaque id."""
    app = app_of(client)
    r = client.post("/fhir", json=bundle or synth.bundle(row),
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 200, r.text
    results = app.state.dicom_store.store_many(synth.series(row))
    assert all(x.ok for x in results)
    return patient_id_of(client, synth, row)


def patient_id_of(client: TestClient, synth: SynthModel, row: int) -> str:
    mrn = str(synth.frame()["patient_id"].iloc[row]).split("|")[1]
    with session_scope(app_of(client).state.sessions) as session:
        pid = session.scalar(select(PatientRow.id).where(
            PatientRow.identifier_system == MRN_SYSTEM, PatientRow.identifier_value == mrn))
    assert pid is not None
    return str(pid)


def parameters(body: dict[str, Any]) -> dict[str, Any]:
    """Parameters by name, after validating the resource with fhir.resources R4B."""
    Parameters.model_validate(body)
    return {p["name"]: p for p in body["parameter"]}


def index_time_parameters(when: datetime) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "indexTime", "valueDateTime": when.isoformat().replace("+00:00", "Z")}]}


def stored(client: TestClient, prediction_id: str) -> PredictionRow:
    with session_scope(app_of(client).state.sessions) as session:
        row = session.get(PredictionRow, prediction_id)
        assert row is not None
        session.expunge(row)
        return row


# ----------------------------------------------------------------------------- $predict


def test_predict_stored_patient_matches_clinfuse_score(client: TestClient, synth: SynthModel,
                                                       tmp_path: Path) -> None:
    row = synth.rows()[0]
    pid = ingest(client, synth, row)
    app = app_of(client)
    r = client.post(f"/fhir/Patient/{pid}/$predict", json=index_time_parameters(
        synth.index_time(row)), headers={**FHIR, **bearer(app, Role.clinician)})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    params = parameters(r.json())
    assert set(params) == {"prediction", "riskAssessment", "explanation"}
    prediction_id = params["prediction"]["valueId"]
    explanation = json.loads(base64.b64decode(params["explanation"]["valueAttachment"]["data"]))
    assert params["explanation"]["valueAttachment"]["url"].endswith(
        f"/predictions/{prediction_id}")

    expected_p, expected_doc = synth.reference(row, tmp_path)
    saved = stored(client, prediction_id)
    assert saved.probability is not None
    assert abs(saved.probability - expected_p) < TOL
    assert abs(explanation["risk"]["probability"] - expected_doc["risk"]["probability"]) < TOL
    want = {d["modality"]: d["points"] for d in expected_doc["modalities"]}
    got = {d["modality"]: d["points"] for d in explanation["modalities"]}
    assert want.keys() == got.keys() == {"image", "ehr", "note"}
    assert all(abs(want[k] - got[k]) < TOL for k in want)
    # The note's sentences are the manifest's, attributed identically.
    assert [(h["sentence"], round(h["points"], 6)) for h in explanation["notes"]["highlights"]] \
        == [(h["sentence"], round(h["points"], 6)) for h in expected_doc["notes"]["highlights"]]
    assert explanation["patient_id"] == pid and explanation["validation_label"] == NOT_VALIDATED
    assert explanation["image"]["series"] == str(synth.frame()["image"].iloc[row]).split("/")[-1]
    assert explanation["ehr"]["background"].startswith("training mean")

    ra = params["riskAssessment"]["resource"]
    RiskAssessment.model_validate(ra)
    assert ra["id"] == prediction_id and ra["subject"]["reference"] == f"Patient/{pid}"
    assert ra["prediction"][0]["probabilityDecimal"] == round(expected_p, 6)
    assert ra["occurrenceDateTime"] == synth.index_time(row).isoformat().replace("+00:00", "Z")
    assert {b["type"] for b in ra["basis"]} == {"Observation", "DocumentReference",
                                                "ImagingStudy"}
    assert NOT_VALIDATED in [n["text"] for n in ra["note"]]

    frame = synth.frame()
    assert saved.patient_id == pid and saved.source == "fhir"
    assert saved.requested_by == "test-clinician" and saved.refusal is None
    assert saved.modalities == "image+ehr+note" and saved.model_version == "1.0.0"
    assert saved.attributes == {k: frame[k].iloc[row] for k in
                                ("sex", "race", "ethnicity", "age_band")}
    thresholds = {"high_risk": 0.3, "moderate_risk": 0.1}
    assert saved.decisions == {k: {"threshold": v, "flag": expected_p >= v}
                               for k, v in thresholds.items()}
    with session_scope(app.state.sessions) as session:
        logged = session.scalars(select(AccessLogRow).where(
            AccessLogRow.patient_id == pid, AccessLogRow.action == "predict")).all()
        assert [a.resource for a in logged] == ["POST /fhir/Patient/{patient_id}/$predict"]

    # The job worker's entry point computes the same from the stored record.
    service: PredictionService = app.state.predictions
    with session_scope(app.state.sessions) as session:
        again = service.predict_patient(session, pid, source="job", requested_by=None,
                                        index_time=synth.index_time(row))
        assert again.probability is not None
        assert abs(again.probability - expected_p) < TOL


def test_predict_posted_bundle(client: TestClient, synth: SynthModel, tmp_path: Path) -> None:
    row = synth.rows()[1]
    app = app_of(client)
    # The imaging is in the store before the record arrives; the posted Bundle links it.
    assert all(x.ok for x in app.state.dicom_store.store_many(synth.series(row)))
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "bundle", "resource": synth.bundle(row)},
        *index_time_parameters(synth.index_time(row))["parameter"]]}
    r = client.post("/fhir/$predict", json=body,
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 200, r.text
    params = parameters(r.json())
    saved = stored(client, params["prediction"]["valueId"])
    assert saved.patient_id == patient_id_of(client, synth, row)
    expected_p, _ = synth.reference(row, tmp_path)
    assert saved.probability is not None and abs(saved.probability - expected_p) < TOL
    assert saved.modalities == "image+ehr+note"

    # A bare Bundle works too (index time: now); a batch or two patients do not. Now is
    # years after this synthetic stay: a patient who died since is refused (issue 20).
    r = client.post("/fhir/$predict", json=synth.bundle(row),
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 200
    now = parameters(r.json())
    assert "riskAssessment" in now or now["refusal"]["valueString"].startswith(
        "out of population: deceased before the index time")
    two = synth.bundle(row)
    two["entry"] += synth.bundle(synth.rows()[2])["entry"]
    r = client.post("/fhir/$predict", json=two,
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert "one patient" in r.json()["issue"][0]["diagnostics"]
    batch = {**synth.bundle(row), "type": "batch"}
    r = client.post("/fhir/$predict", json=batch,
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    broken = copy.deepcopy(synth.bundle(row))
    broken["entry"][0]["resource"]["birthDate"] = "not a date"
    r = client.post("/fhir/$predict", json=broken,
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 400
    issue = r.json()["issue"][0]
    assert "birthDate" in issue["expression"][0] and "not a date" not in json.dumps(r.json())


def test_a_clinicians_bundle_is_scored_in_memory(client: TestClient, synth: SynthModel) -> None:
    """Issue 19, finding 5: a read role's Bundle is scored as posted and nothing is stored;
    the risk is the one the stored path gives the same record (no imaging linked)."""
    row = synth.rows()[3]
    bundle = copy.deepcopy(synth.bundle(row))
    for entry in bundle["entry"]:  # a new MRN: no stored imaging links to this patient
        for ident in entry["resource"].get("identifier", []):
            if ident.get("system") == MRN_SYSTEM:
                ident["value"] = "MRN-WHAT-IF-1"
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "bundle", "resource": bundle},
        *index_time_parameters(synth.index_time(row))["parameter"]]}
    app = app_of(client)
    with session_scope(app.state.sessions) as session:
        before = (session.scalar(select(func.count()).select_from(PatientRow)),
                  session.scalar(select(func.count()).select_from(PredictionRow)))
    r = client.post("/fhir/$predict", json=body, headers={**FHIR, **bearer(app, Role.clinician)})
    assert r.status_code == 200, r.text
    unsaved = parameters(r.json())
    assert unsaved["stored"]["valueBoolean"] is False and "prediction" not in unsaved
    RiskAssessment.model_validate(unsaved["riskAssessment"]["resource"])
    with session_scope(app.state.sessions) as session:
        assert (session.scalar(select(func.count()).select_from(PatientRow)),
                session.scalar(select(func.count()).select_from(PredictionRow))) == before
    r = client.post("/fhir/$predict", json=body,
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 200, r.text
    saved = stored(client, parameters(r.json())["prediction"]["valueId"])
    probability = unsaved["riskAssessment"]["resource"]["prediction"][0]["probabilityDecimal"]
    assert saved.probability is not None and abs(probability - saved.probability) < TOL
    assert saved.modalities == "ehr+note"


def test_out_of_population_is_refused_and_stored(client: TestClient, synth: SynthModel) -> None:
    row = synth.rows()[2]
    when = synth.index_time(row)
    bundle = copy.deepcopy(synth.bundle(row))
    patient = next(e["resource"] for e in bundle["entry"]
                   if e["resource"]["resourceType"] == "Patient")
    patient["birthDate"] = f"{when.year - 12}-01-15"  # a 11-12-year-old: outside "adults"
    app = app_of(client)
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "bundle", "resource": bundle}, *index_time_parameters(when)["parameter"]]}
    r = client.post("/fhir/$predict", json=body,
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 200, r.text
    params = parameters(r.json())
    assert set(params) == {"prediction", "refusal"}
    assert params["refusal"]["valueString"].startswith("out of population: age below 18 years")
    saved = stored(client, params["prediction"]["valueId"])
    assert saved.probability is None and saved.explanation is None
    assert saved.risk_assessment is None and saved.refusal == params["refusal"]["valueString"]
    assert saved.attributes["age_band"] == "0-17"
    assert saved.decisions == {"high_risk": {"threshold": 0.3, "flag": None},
                               "moderate_risk": {"threshold": 0.1, "flag": None}}
    # Refusals have no RiskAssessment: the search does not list them.
    r = client.get("/fhir/RiskAssessment", params={"subject": f"Patient/{saved.patient_id}"},
                   headers=bearer(app, Role.clinician))
    assert saved.id not in {e["resource"]["id"] for e in r.json()["entry"]}


def test_risk_assessment_search_and_prediction_json(client: TestClient, synth: SynthModel
                                                    ) -> None:
    row = synth.rows()[0]
    pid = ingest(client, synth, row)
    app = app_of(client)
    ids = []
    # Both index times at least 72 h into the stay (the population, issue 20).
    for hours in (0, 1):
        when = pd.Timestamp(synth.index_time(row)) + pd.Timedelta(hours=hours)
        r = client.post(f"/fhir/Patient/{pid}/$predict",
                        json=index_time_parameters(when.to_pydatetime()),
                        headers={**FHIR, **bearer(app, Role.integration)})
        assert r.status_code == 200, r.text
        ids.append(parameters(r.json())["prediction"]["valueId"])
    r = client.get("/fhir/RiskAssessment", params={"subject": f"Patient/{pid}"},
                   headers=bearer(app, Role.clinician))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    bundle = r.json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == "searchset"
    found = [e["resource"]["id"] for e in bundle["entry"]]
    # Newest first; the background job may have added its own (index time: now).
    assert [i for i in found if i in ids] == list(reversed(ids))
    assert bundle["total"] == len(found) >= 2
    for entry in bundle["entry"]:
        RiskAssessment.model_validate(entry["resource"])
        assert entry["resource"]["subject"]["reference"] == f"Patient/{pid}"
        assert entry["fullUrl"].endswith(f"/fhir/RiskAssessment/{entry['resource']['id']}")
    r = client.get("/fhir/RiskAssessment", params={"subject": f"Patient/{pid}", "_count": 1},
                   headers=bearer(app, Role.integration))
    assert len(r.json()["entry"]) == 1
    assert any(link["relation"] == "next" for link in r.json()["link"])
    r = client.get("/fhir/RiskAssessment", params={"subject": "Patient/" + "0" * 32},
                   headers=bearer(app, Role.clinician))
    assert r.status_code == 200 and r.json()["total"] == 0

    r = client.get(f"/predictions/{ids[0]}", headers=bearer(app, Role.clinician))
    assert r.status_code == 200
    doc = r.json()
    assert doc["patient_id"] == pid and doc["source"] == "fhir"
    assert doc["explanation"]["prediction_id"] == ids[0]
    assert doc["indicator"] in {"info", "warning", "critical"}
    assert doc["index_time"].startswith(synth.index_time(row).isoformat()[:19])
    assert doc["feedback"] == []

    # Errors: OperationOutcome under /fhir, plain JSON under /predictions.
    r = client.get("/fhir/RiskAssessment", headers=bearer(app, Role.clinician))
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    r = client.get(f"/predictions/{'f' * 32}", headers=bearer(app, Role.clinician))
    assert r.status_code == 404
    r = client.post(f"/fhir/Patient/{'f' * 32}/$predict", headers=bearer(app, Role.clinician))
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    r = client.post(f"/fhir/Patient/{pid}/$predict", json={"resourceType": "Parameters",
                    "parameter": [{"name": "indexTime", "valueDateTime": "2023"}]},
                    headers={**FHIR, **bearer(app, Role.clinician)})
    assert r.status_code == 400 and "indexTime" in r.json()["issue"][0]["diagnostics"]


def test_roles(client: TestClient, synth: SynthModel) -> None:
    """Compliance never reads or predicts for one patient; no token is 401."""
    app = app_of(client)
    pid = "a" * 32
    for method, url in (("POST", f"/fhir/Patient/{pid}/$predict"), ("POST", "/fhir/$predict"),
                        ("GET", f"/fhir/RiskAssessment?subject=Patient/{pid}"),
                        ("GET", f"/predictions/{pid}")):
        r = client.request(method, url, headers=bearer(app, Role.compliance))
        assert r.status_code == 403, url
        r = client.request(method, url)
        assert r.status_code == 401, url
        if url.startswith("/fhir"):
            assert r.json()["resourceType"] == "OperationOutcome"


# ----------------------------------------------------------------------------- start-up


def test_no_model_answers_503(tmp_path: Path) -> None:
    with TestClient(create_app(service_settings(None, tmp_path, None))) as client:
        app = app_of(client)
        assert app.state.predictions is None
        for url in (f"/fhir/Patient/{'a' * 32}/$predict", "/fhir/$predict"):
            r = client.post(url, json={"resourceType": "Bundle", "type": "collection"},
                            headers={**FHIR, **bearer(app, Role.integration)})
            assert r.status_code == 503, url
            outcome = r.json()
            assert outcome["resourceType"] == "OperationOutcome"
            assert "no model is configured" in outcome["issue"][0]["diagnostics"]


def test_bad_artifacts_stop_start_up(tmp_path: Path, synth: SynthModel) -> None:
    def start(**extra: Any) -> str:
        settings = service_settings(None, tmp_path, synth, **extra)
        with pytest.raises(ModelLoadError) as info, TestClient(create_app(settings)):
            pass
        return str(info.value)

    assert "does not exist" in start(model_path=tmp_path / "missing-model")
    assert "TRUSTED_KEYS" in start(model_trusted_keys=[])
    tampered = tmp_path / "tampered"
    shutil.copytree(synth.model, tampered)
    config = json.loads((tampered / "config.json").read_text())
    config["decision_thresholds"]["high_risk"] = 0.01
    (tampered / "config.json").write_text(json.dumps(config))
    message = start(model_path=tampered)
    assert "cannot be served" in message and "ArtifactError" in message
    generate_signing_key(tmp_path / "other.key")
    message = start(model_trusted_keys=[tmp_path / "other.key.pub"])
    assert "cannot be served" in message


# ----------------------------------------------------------------------------- imaging


def _restudy(data: list[bytes], when: datetime, *, issuer: bool = True) -> list[bytes]:
    """The same slices as a new study and series acquired at ``when`` (UTC)."""
    import pydicom
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    out = []
    for blob in data:
        ds = pydicom.dcmread(io.BytesIO(blob))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate, ds.StudyTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
        if not issuer:
            del ds.IssuerOfPatientID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def test_imaging_is_the_newest_linked_series_before_the_index_time(
        tmp_path: Path, synth: SynthModel) -> None:
    """Later studies and unlinked ones are ignored; an unusable series is left out."""
    row = synth.rows()[3]
    when = synth.index_time(row)
    with TestClient(create_app(service_settings(None, tmp_path, synth))) as client:
        app = app_of(client)
        pid = ingest(client, synth, row)
        store = app.state.dicom_store
        service: PredictionService = app.state.predictions
        original = synth.series(row)
        later = _restudy(original, when + pd.Timedelta(hours=2))
        unlinked = _restudy(original, when - pd.Timedelta(hours=1), issuer=False)
        assert all(x.ok for x in store.store_many(later + unlinked))
        with session_scope(app.state.sessions) as session:
            patient = session.get(PatientRow, pid)
            assert patient is not None
            record = record_from_json(patient.record)
        found = service.find_imaging(record, when)
        assert found is not None and found.n_instances == len(original)
        assert found.SeriesInstanceUID == str(synth.frame()["image"].iloc[row]).split("/")[-1]
        assert sorted(p.resolve() for p in found.folder.iterdir()) == sorted(
            store.path_for(r.sha256) for r in store.find(
                SeriesInstanceUID=found.SeriesInstanceUID))
        assert service.find_imaging(record, when - pd.Timedelta(days=30)) is None

        # A newer single slice is a 2-D image the 3-D model cannot take: predicted without
        # imaging, and the explanation says so.
        single = _restudy(original[:1], when - pd.Timedelta(minutes=30))
        assert all(x.ok for x in store.store_many(single))
        found = service.find_imaging(record, when)
        assert found is not None and found.n_instances == 1
        result = service.evaluate(record, when, found, patient_id=pid)
        assert result.probability is not None and result.modalities == "ehr+note"
        assert result.explanation is not None and "without imaging" in \
            result.explanation["warnings"][0]
