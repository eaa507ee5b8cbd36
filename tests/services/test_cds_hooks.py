"""A CDS Hooks 2.0 client sequence against the service, on SQLite and PostgreSQL.

Discovery; a patient-view call with prefetch (a synth patient with CT, labs and
notes, cross-checked against ``clinfuse score``); a call that makes the service
fetch from a FHIR server (the shared Synthea Bundles behind the read-only test
endpoint, with paging and a bearer token), with the patient's real values
asserted; feedback stored and read back; malformed calls answered with
OperationOutcomes. The hook's latency is measured and printed, not asserted.
"""

from __future__ import annotations

import io
import json
import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from fhir_adapters.fhir_json import records_from_json
from fhir_adapters.record import record_from_json
from pipelines.ehr_features import EHRFeatureBuilder
from pipelines.scoring import main_score
from services.app import create_app
from services.auth.principal import Role
from services.cds_hooks import OVERRIDE_REASONS, PREFETCH, SERVICE_ID
from services.db import session_scope
from services.prediction import PredictionService
from services.tables import FeedbackRow, FhirResourceRow, PatientRow, PredictionRow
from tests.service_model import SynthModel
from tests.services.fhir_test_server import FhirTestServer, server_resources
from tests.services.service_support import bearer
from tests.services.test_prediction import service_settings
from tests.shared_data import shared_data_dir

TOKEN = "ehr-issued-token-5b1f"
#: Synthea's Patient ids (what the EHR's context.patientId carries) and Carlota's MRN.
CARLOTA = "09246e38-84b9-4348-a487-ace2af8d4f7e"  # born 1981-07-27, female
CARLOTA_MRN = "ba29bb08-e7d6-44c2-92cc-894cc29b8494"
EARNESTINE = "d6e95d44-d6b2-4963-80b0-079f8a3821c2"  # born 2013: outside the population
#: Just after Carlota's last visit (2019-07-01 05:39:22Z): her vitals and labs are in window.
CARLOTA_NOW = datetime(2019, 7, 1, 12, 0, tzinfo=UTC)
TOL = 1e-6
HOOK_URL = f"/cds-services/{SERVICE_ID}"


@pytest.fixture(scope="module")
def synth(service_model: SynthModel) -> SynthModel:
    return service_model


@pytest.fixture(scope="module")
def ehr() -> Iterator[FhirTestServer]:
    """The EHR's FHIR server: the shared Synthea Bundles, 20 resources a page."""
    folder = shared_data_dir("fhir/synthea_r4_bundles")
    with FhirTestServer.from_files(sorted(folder.glob("[A-Z]*_*.json")), token=TOKEN,
                                   page_size=20) as server:
        yield server


@pytest.fixture
def client(db_engine: Engine, synth: SynthModel, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(service_settings(db_engine, tmp_path, synth))) as c:
        yield c


def app_of(client: TestClient) -> FastAPI:
    app: FastAPI = client.app  # type: ignore[assignment]
    return app


def allow_fhir_server(client: TestClient, ehr: FhirTestServer) -> None:
    """Put the test FHIR server's loopback origin on the app's outbound allow-list."""
    app = app_of(client)
    app.state.settings = app.state.settings.model_copy(update={
        "outbound_allowed_origins": [ehr.base_url.removesuffix("/fhir")]})


def set_clock(client: TestClient, when: datetime) -> None:
    service: PredictionService = app_of(client).state.predictions
    service.clock = lambda: when


def hook(patient_id: str, **extra: Any) -> dict[str, Any]:
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/example", "patientId": patient_id}, **extra}


def fetch_hook(ehr: FhirTestServer, patient_id: str, token: str = TOKEN) -> dict[str, Any]:
    return hook(patient_id, fhirServer=ehr.base_url, fhirAuthorization={
        "access_token": token, "token_type": "Bearer", "expires_in": 300,
        "scope": "user/Patient.read user/Observation.read user/Condition.read "
                 "user/DocumentReference.read", "subject": "clinfuse"})


def prefetch_for(bundle: dict[str, Any]) -> dict[str, Any]:
    """What an EHR would prefetch for our templates, from a patient's Bundle."""
    resources = server_resources(bundle)
    patient = next(r for r in resources if r["resourceType"] == "Patient")

    def searchset(kind: str) -> dict[str, Any]:
        found = [r for r in resources if r["resourceType"] == kind]
        return {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                "entry": [{"resource": r, "search": {"mode": "match"}} for r in found]}

    return {"patient": patient, "observations": searchset("Observation"),
            "conditions": searchset("Condition"), "documents": searchset("DocumentReference")}


def call(client: TestClient, body: dict[str, Any], role: Role = Role.integration
         ) -> tuple[Any, float]:
    app = app_of(client)
    started = time.perf_counter()
    r = client.post(HOOK_URL, json=body, headers=bearer(app, role))
    return r, 1000 * (time.perf_counter() - started)


def prediction_of(client: TestClient, card_uuid: str) -> PredictionRow:
    with session_scope(app_of(client).state.sessions) as session:
        row = session.scalars(select(PredictionRow).where(
            PredictionRow.cds_card_uuid == card_uuid)).one()
        session.expunge(row)
        return row


def assert_outcome(r: Any, status: int, expression: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["resourceType"] == "OperationOutcome"
    if expression is not None:
        assert body["issue"][0]["expression"] == [expression], body
    return body


# ----------------------------------------------------------------------------- sequence


def test_discovery(client: TestClient) -> None:
    app = app_of(client)
    r = client.get("/cds-services", headers=bearer(app, Role.integration))
    assert r.status_code == 200
    [service] = r.json()["services"]
    assert service["id"] == SERVICE_ID and service["hook"] == "patient-view"
    assert service["prefetch"] == PREFETCH
    assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert {t.split("?")[0] for t in service["prefetch"].values()} == {
        "Patient/{{context.patientId}}", "Observation", "Condition", "DocumentReference"}
    assert all("{{context.patientId}}" in t for t in service["prefetch"].values())
    assert "Not validated for clinical use" in service["description"]
    assert client.get("/cds-services", headers=bearer(app, Role.compliance)).status_code == 403


def test_hook_with_prefetch_then_feedback(client: TestClient, synth: SynthModel,
                                          tmp_path: Path) -> None:
    row = synth.rows()[0]
    app = app_of(client)
    assert all(x.ok for x in app.state.dicom_store.store_many(synth.series(row)))
    set_clock(client, synth.index_time(row))
    bundle = synth.bundle(row)
    ehr_patient_id = next(e["resource"]["id"] for e in bundle["entry"]
                          if e["resource"]["resourceType"] == "Patient")
    body = hook(ehr_patient_id, prefetch=prefetch_for(bundle))
    r, first_ms = call(client, body)
    assert r.status_code == 200, r.text
    [card] = r.json()["cards"]
    # Again, as when the chart is reopened: data unchanged, so the fresh prediction
    # (prediction_reuse_s) is answered again, card and all.
    r2, warm_ms = call(client, {**body, "hookInstance": str(uuid.uuid4())})
    assert r2.status_code == 200
    assert r2.json()["cards"][0]["uuid"] == card["uuid"]
    print(f"\nCDS hook with prefetch (synth patient, CT + labs + notes): first {first_ms:.0f} ms, "
          f"warm {warm_ms:.0f} ms (server {r2.headers['server-timing']})")

    saved = prediction_of(client, card["uuid"])
    expected_p, expected_doc = synth.reference(row, tmp_path)
    assert saved.probability is not None and abs(saved.probability - expected_p) < TOL
    assert saved.source == "cds-hooks" and saved.modalities == "image+ehr+note"
    assert saved.requested_by == "test-integration"
    # A risk that rounds to 0 % (or 100 %) is shown as "<1%" (">99%"), never as certainty.
    shown = ("<1%" if expected_p < 0.005 else ">99%" if expected_p > 0.995
             else f"{100 * expected_p:.0f}%")
    assert f"risk {shown}" in card["summary"] and len(card["summary"]) < 140
    thresholds = sorted([0.1, 0.3])
    assert card["indicator"] == ("critical" if expected_p >= thresholds[1] else
                                 "warning" if expected_p >= thresholds[0] else "info")
    assert card["source"]["label"] == ("clinfuse-late-fusion 1.0.0 · Not validated for "
                                       "clinical use")
    [link] = card["links"]
    assert link["type"] == "smart"
    assert link["url"].endswith(f"/dashboard/patients/{saved.patient_id}")
    assert json.loads(link["appContext"]) == {"patient": saved.patient_id,
                                              "prediction": saved.id}
    assert card["overrideReasons"] == list(OVERRIDE_REASONS)
    assert "Not validated for clinical use" in card["detail"]
    assert saved.explanation is not None and saved.explanation["rationale"] in card["detail"]
    assert {d["modality"]: round(d["points"], 6) for d in saved.explanation["modalities"]} == {
        d["modality"]: round(d["points"], 6) for d in expected_doc["modalities"]}
    with session_scope(app.state.sessions) as session:
        sources = set(session.scalars(select(FhirResourceRow.source).where(
            FhirResourceRow.patient_id == saved.patient_id)))
        assert sources == {"cds-prefetch"}

    # Feedback on both cards: one overridden with a reason and comment, one accepted.
    r = client.post(f"{HOOK_URL}/feedback", json={"feedback": [
        {"card": card["uuid"], "outcome": "overridden",
         "overrideReason": {"reason": OVERRIDE_REASONS[0], "userComment": "Reviewed today."},
         "outcomeTimestamp": "2023-09-09T10:00:00Z"},
        {"card": r2.json()["cards"][0]["uuid"], "outcome": "accepted",
         "outcomeTimestamp": "2023-09-09T10:05:00+02:00"}]},
        headers=bearer(app, Role.clinician, "dr-house"))
    assert r.status_code == 200, r.text
    with session_scope(app.state.sessions) as session:
        rows = session.scalars(select(FeedbackRow).order_by(FeedbackRow.outcome)).all()
        assert [(f.outcome, f.channel, f.recorded_by) for f in rows] == [
            ("accepted", "cds-hooks", "dr-house"), ("overridden", "cds-hooks", "dr-house")]
        accepted, overridden = rows
        assert overridden.prediction_id == saved.id
        assert overridden.override_reason == OVERRIDE_REASONS[0]
        assert overridden.user_comment == "Reviewed today."
        assert overridden.outcome_timestamp.replace(tzinfo=UTC) == datetime(
            2023, 9, 9, 10, tzinfo=UTC)
        assert accepted.outcome_timestamp.replace(tzinfo=UTC) == datetime(
            2023, 9, 9, 8, 5, tzinfo=UTC)
        assert accepted.override_reason is None
    r = client.get(f"/predictions/{saved.id}", headers=bearer(app, Role.clinician))
    assert sorted(f["outcome"] for f in r.json()["feedback"]) == ["accepted", "overridden"]

    # Unknown card: 404, and nothing of the request is stored.
    r = client.post(f"{HOOK_URL}/feedback", json={"feedback": [
        {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2023-09-09T11:00:00Z"},
        {"card": str(uuid.uuid4()), "outcome": "accepted",
         "outcomeTimestamp": "2023-09-09T11:00:00Z"}]}, headers=bearer(app, Role.integration))
    assert_outcome(r, 404, "feedback[1].card")
    with session_scope(app.state.sessions) as session:
        assert len(session.scalars(select(FeedbackRow)).all()) == 2
    for bad, where in (
            ({"feedback": [{"card": card["uuid"], "outcome": "maybe",
                            "outcomeTimestamp": "2023-09-09T11:00:00Z"}]}, "feedback[0].outcome"),
            ({"feedback": [{"card": card["uuid"], "outcome": "accepted",
                            "overrideReason": {"userComment": "x"},
                            "outcomeTimestamp": "2023-09-09T11:00:00Z"}]}, "feedback[0]"),
            ({"feedback": [{"card": card["uuid"], "outcome": "accepted"}]},
             "feedback[0].outcomeTimestamp"),
            ({"feedback": []}, "feedback")):
        assert_outcome(client.post(f"{HOOK_URL}/feedback", json=bad,
                                   headers=bearer(app, Role.integration)), 400, where)
    r = client.post(f"{HOOK_URL}/feedback", json={"feedback": []},
                    headers=bearer(app, Role.compliance))
    assert r.status_code == 403


def test_hook_reuses_a_fresh_prediction_only_for_the_same_data(
        client: TestClient, synth: SynthModel) -> None:
    row = synth.rows()[1]
    app = app_of(client)
    set_clock(client, synth.index_time(row))
    bundle = synth.bundle(row)
    patient_id = next(e["resource"]["id"] for e in bundle["entry"]
                      if e["resource"]["resourceType"] == "Patient")
    prefetch = prefetch_for(bundle)

    def card_of(body: dict[str, Any]) -> dict[str, Any]:
        r, _ = call(client, body)
        assert r.status_code == 200, r.text
        card: dict[str, Any] = r.json()["cards"][0]
        return card

    first = card_of(hook(patient_id, prefetch=prefetch))
    assert card_of(hook(patient_id, prefetch=prefetch))["uuid"] == first["uuid"]
    # A new result changes the record: the model runs again.
    observations = prefetch["observations"]
    new = {**observations["entry"][0]["resource"], "id": "late-result",
           "identifier": [{"system": "urn:test", "value": "late-result"}]}
    changed = {**prefetch, "observations": {**observations, "entry": [
        *observations["entry"], {"resource": new}]}}
    second = card_of(hook(patient_id, prefetch=changed))
    assert second["uuid"] != first["uuid"]
    # Reuse switched off: every call predicts.
    app.state.settings = app.state.settings.model_copy(update={"prediction_reuse_s": 0})
    third = card_of(hook(patient_id, prefetch=changed))
    assert third["uuid"] != second["uuid"]
    with session_scope(app.state.sessions) as session:
        rows = session.scalars(select(PredictionRow).join(
            PatientRow, PatientRow.id == PredictionRow.patient_id).where(
            PredictionRow.source == "cds-hooks")).all()
        mine = [p for p in rows if p.cds_card_uuid in {first["uuid"], second["uuid"],
                                                         third["uuid"]}]
        assert len(mine) == 3
        assert mine[0].input_digest is not None
        assert len({p.input_digest for p in mine}) == 2


def test_hook_fetches_synthea_patient_from_the_fhir_server(
        client: TestClient, ehr: FhirTestServer, synth: SynthModel, tmp_path: Path) -> None:
    set_clock(client, CARLOTA_NOW)
    allow_fhir_server(client, ehr)
    seen = len(ehr.requests)
    r, ms = call(client, fetch_hook(ehr, CARLOTA))
    assert r.status_code == 200, r.text
    asked = ehr.requests[seen:]
    r2, warm_ms = call(client, fetch_hook(ehr, CARLOTA))
    assert r2.status_code == 200
    print(f"\nCDS hook with fetch (Synthea patient, paged searches): first {ms:.0f} ms, "
          f"warm {warm_ms:.0f} ms (server {r2.headers['server-timing']})")
    assert f"GET /fhir/Patient/{CARLOTA}" in asked
    # 57 vital-sign and laboratory Observations at 20 a page: three pages, all followed.
    observation_pages = [q for q in asked if q.startswith("GET /fhir/Observation")]
    assert len(observation_pages) == 3 and "_offset=40" in observation_pages[-1]
    assert all("category=vital-signs" in q and "laboratory" in q for q in observation_pages)

    [card] = r.json()["cards"]
    saved = prediction_of(client, card["uuid"])
    app = app_of(client)
    service: PredictionService = app.state.predictions
    assert saved.attributes == {"sex": "female", "race": "Other",
                                "ethnicity": "Not Hispanic or Latino", "age_band": "18-44"}
    assert saved.modalities == "ehr"  # no notes in Synthea, no imaging stored
    assert saved.index_time.replace(tzinfo=UTC) == CARLOTA_NOW
    with session_scope(app.state.sessions) as session:
        patient = session.get(PatientRow, saved.patient_id)
        assert patient is not None
        assert (patient.identifier_system, patient.identifier_value) == (
            "http://hospital.smarthealthit.org", CARLOTA_MRN)
        n_obs = len(session.scalars(select(FhirResourceRow).where(
            FhirResourceRow.patient_id == saved.patient_id,
            FhirResourceRow.resource_type == "Observation")).all())
        assert n_obs == 57
        record = record_from_json(patient.record)
    manifest = service.build_manifest(record, CARLOTA_NOW, None, row_id="x", patient_id="y")
    row = manifest.frame.iloc[0]
    # Carlota's 2019-07-01 visit, as Synthea recorded it: one panel at 05:39:22, the only
    # values in the 120 h course; glucose and creatinine are averaged on the log scale.
    assert row["sbp_course_mean_120h"] == pytest.approx(135.26853095834338, abs=1e-12)
    assert row["sbp_course_count_120h"] == 1 and pd.isna(row["sbp_course_trend_120h"])
    assert row["creatinine_course_mean_120h"] == pytest.approx(math.log(0.9788522990019917),
                                                               abs=1e-12)
    assert row["sodium_course_mean_120h"] == pytest.approx(143.2189634869484, abs=1e-12)
    assert row["glucose_course_mean_120h"] == pytest.approx(math.log(91.89908418483871),
                                                            abs=1e-12)
    assert row["age_years"] == pytest.approx((CARLOTA_NOW.date().toordinal()
                                              - datetime(1981, 7, 27).toordinal()) / 365.25)
    assert row["heart_rate_course_count_120h"] == 0 and pd.isna(row["lactate_course_mean_120h"])

    # `clinfuse score` on a manifest built independently from the Synthea file itself.
    path = next(shared_data_dir("fhir/synthea_r4_bundles").glob(f"*_{CARLOTA_MRN}.json"))
    [independent] = records_from_json(path.read_bytes())
    spec = service.spec
    features = EHRFeatureBuilder(spec=spec).fit_transform([independent.as_of(CARLOTA_NOW)])
    head = pd.DataFrame({"example_id": ["carlota"], "patient_id": [CARLOTA], "label": [0],
                         "index_time": [CARLOTA_NOW.isoformat()]})
    pd.concat([head, features], axis=1).to_csv(tmp_path / "carlota.csv", index=False,
                                               float_format="%.17g")
    err = io.StringIO()
    assert main_score(synth.model, tmp_path / "carlota.csv", tmp_path / "scores.csv",
                      trusted_keys=[synth.key], device="cpu", stderr=err) == 0, err.getvalue()
    expected = float(pd.read_csv(tmp_path / "scores.csv")["score"].iloc[0])
    assert saved.probability is not None and abs(saved.probability - expected) < TOL
    assert len(card["summary"]) < 140 and card["summary"].startswith("Deterioration risk ")
    assert f"{100 * expected:.0f}%" in card["summary"]

    # A child: refused (outside the adult population), answered with an info card.
    r, _ = call(client, fetch_hook(ehr, EARNESTINE))
    assert r.status_code == 200, r.text
    [card] = r.json()["cards"]
    assert card["indicator"] == "info" and len(card["summary"]) < 140
    assert card["summary"].startswith("Deterioration risk not scored: out of population")
    refused = prediction_of(client, card["uuid"])
    assert refused.probability is None and refused.attributes["age_band"] == "0-17"

    # The FHIR server refuses a wrong token: the data cannot be had (412), nothing stored.
    # The message is the same for every failure: no status code (no port-scan oracle).
    before = ehr.unauthorized
    r, _ = call(client, fetch_hook(ehr, CARLOTA, token="stolen"))
    body = assert_outcome(r, 412, "fhirServer")
    refused = body["issue"][0]["diagnostics"]
    assert "401" not in refused and ehr.unauthorized > before
    assert "stolen" not in r.text
    r, _ = call(client, fetch_hook(ehr, "no-such-patient"))
    assert assert_outcome(r, 412, "fhirServer")["issue"][0]["diagnostics"] == refused


def test_bad_hook_requests_are_operation_outcomes(client: TestClient, synth: SynthModel
                                                  ) -> None:
    app = app_of(client)
    good = hook("p1", prefetch=prefetch_for(synth.bundle(synth.rows()[0])))
    cases: list[tuple[Any, int, str | None]] = [
        ({k: v for k, v in good.items() if k != "hookInstance"}, 400, "hookInstance"),
        ({**good, "hookInstance": "not-a-uuid"}, 400, "request"),
        ({**good, "hook": "order-select"}, 400, "hook"),
        ({**good, "context": {"userId": "Practitioner/1"}}, 400, "context.patientId"),
        ({**good, "context": {"userId": "Practitioner/1", "patientId": "a b"}}, 400,
         "context.patientId"),
        ({**good, "fhirAuthorization": {"access_token": "t", "token_type": "Bearer",
                                        "expires_in": 1, "scope": "s", "subject": "c"}},
         400, "request"),
        ({**good, "fhirServer": "http://ehr.example.org/fhir"}, 400, "request"),
        ({**good, "prefetch": {"patient": []}}, 400, "prefetch.patient"),
        ({**good, "prefetch": None}, 412, "prefetch"),
        ({**good, "prefetch": {**good["prefetch"], "observations": None}}, 412, "prefetch"),
        (good, 400, "prefetch.patient"),  # the Patient is not context.patientId
    ]
    for body, status, where in cases:
        r, _ = call(client, body)
        outcome = assert_outcome(r, status, where)
        assert "Traceback" not in r.text and "MRN" not in outcome["issue"][0]["diagnostics"]
    r = client.post(HOOK_URL, content=b"{not json", headers=bearer(app, Role.integration))
    assert_outcome(r, 400, "request")
    r = client.post("/cds-services/other-service", json=good,
                    headers=bearer(app, Role.integration))
    assert_outcome(r, 404)
    r, _ = call(client, good, Role.clinician)
    assert_outcome(r, 403)
    r, _ = call(client, good, Role.compliance)
    assert_outcome(r, 403)
    r = client.post(HOOK_URL, json=good)
    assert_outcome(r, 401)
    with session_scope(app.state.sessions) as session:
        assert session.scalars(select(PredictionRow)).all() == []
        assert session.scalars(select(FhirResourceRow)).all() == []


def test_hook_without_a_model_is_503(tmp_path: Path) -> None:
    with TestClient(create_app(service_settings(None, tmp_path, None))) as client:
        app = app_of(client)
        r = client.get("/cds-services", headers=bearer(app, Role.integration))
        assert r.status_code == 200 and "No model is loaded" in r.json()["services"][0][
            "description"]
        r = client.post(HOOK_URL, json=hook("p1"), headers=bearer(app, Role.integration))
        assert_outcome(r, 503)
