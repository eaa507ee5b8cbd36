"""The service enforces the model's stated population, not just age (issue 20).

Real Synthea patients (the shared Bundles, read in place) are ingested through
``POST /fhir`` and sent to ``$predict``: they are outpatients with no active inpatient
encounter, and one died in 1999. Before issue 20 each got a score (the dead patient as
a 116-year-old); now each is refused with the reason, stored and answered as refusals
are. A record with no encounters at all cannot answer the inpatient rules: it is
scored, with a "population rule unchecked" warning stored in its explanation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from services.app import create_app
from services.auth.principal import Role
from services.db import session_scope
from services.tables import PatientRow
from tests.service_model import SynthModel
from tests.services.service_support import bearer
from tests.services.test_prediction import (
    FHIR,
    app_of,
    index_time_parameters,
    parameters,
    service_settings,
    stored,
)
from tests.shared_data import shared_data_dir

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def client(service_model: SynthModel, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(service_settings(None, tmp_path, service_model))) as c:
        yield c


def predict_synthea(client: TestClient, name: str) -> dict[str, dict[str, object]]:
    """Ingest the named Synthea patient by POST /fhir, then $predict it at NOW."""
    app = app_of(client)
    path = next(shared_data_dir("fhir/synthea_r4_bundles").glob(f"{name}_*.json"))
    r = client.post("/fhir", content=path.read_bytes(),
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 200, r.text
    mrn = path.stem.rsplit("_", 1)[1]  # the file is named by the patient's MRN
    with session_scope(app.state.sessions) as session:
        pid = session.scalar(select(PatientRow.id).where(PatientRow.identifier_value == mrn))
    assert pid is not None
    r = client.post(f"/fhir/Patient/{pid}/$predict", json=index_time_parameters(NOW),
                    headers={**FHIR, **bearer(app, Role.clinician)})
    assert r.status_code == 200, r.text
    return parameters(r.json())


def test_synthea_outpatient_and_deceased_patient_are_refused(client: TestClient) -> None:
    description = app_of(client).state.predictions.model.config["population"]["description"]
    params = predict_synthea(client, "Carlota_Muro")
    assert set(params) == {"prediction", "refusal"}
    assert params["refusal"]["valueString"] == (
        f"out of population: no inpatient encounter active at the index time ({description})")
    saved = stored(client, str(params["prediction"]["valueId"]))
    assert saved.probability is None and saved.refusal == params["refusal"]["valueString"]

    # Born 1910, died 1999: refused as deceased, never scored as a 116-year-old.
    params = predict_synthea(client, "Sydney_Oberbrunner")
    assert set(params) == {"prediction", "refusal"}
    refusal = str(params["refusal"]["valueString"])
    assert refusal.startswith("out of population: deceased before the index time; ")
    saved = stored(client, str(params["prediction"]["valueId"]))
    assert saved.probability is None and saved.refusal == refusal


def test_a_record_without_encounters_is_scored_and_flagged(client: TestClient,
                                                           service_model: SynthModel) -> None:
    row = service_model.rows()[0]
    bundle = copy.deepcopy(service_model.bundle(row))
    bundle["entry"] = [e for e in bundle["entry"]
                       if e["resource"]["resourceType"] != "Encounter"]
    # References to the dropped Encounters would dangle: drop them too.
    for e in bundle["entry"]:
        e["resource"].pop("encounter", None)
        e["resource"].pop("context", None)  # a DocumentReference's context.encounter
    app = app_of(client)
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "bundle", "resource": bundle},
        *index_time_parameters(service_model.index_time(row))["parameter"]]}
    r = client.post("/fhir/$predict", json=body,
                    headers={**FHIR, **bearer(app, Role.integration)})
    assert r.status_code == 200, r.text
    params = parameters(r.json())
    assert "refusal" not in params
    saved = stored(client, str(params["prediction"]["valueId"]))
    assert saved.probability is not None and saved.explanation is not None
    warnings = [w for w in saved.explanation["warnings"]
                if w.startswith("population rule unchecked: ")]
    assert [w.split(" (")[0] for w in warnings] == [
        "population rule unchecked: inpatient_encounter_active",
        "population rule unchecked: min_hours_since_admission"]


def test_stale_inputs_withhold_the_score_or_flag_it(client: TestClient,
                                                    service_model: SynthModel) -> None:
    """Freshness rules (issue 20): a stale input is withheld as insufficient data, or
    scored with a warning and the newest input's age, as the model config says."""
    app = app_of(client)
    config = app.state.predictions.model.config
    row = service_model.rows()[4]
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "bundle", "resource": service_model.bundle(row)},
        *index_time_parameters(service_model.index_time(row))["parameter"]]}
    headers = {**FHIR, **bearer(app, Role.integration)}
    # Labs no older than a minute: none at the index time is that fresh.
    config["freshness"] = {"labs_hours": 1 / 60, "action": "withhold"}
    params = parameters(client.post("/fhir/$predict", json=body, headers=headers).json())
    refusal = str(params["refusal"]["valueString"])
    assert refusal.startswith("insufficient data: ") and "laboratory results" in refusal
    assert stored(client, str(params["prediction"]["valueId"])).probability is None

    config["freshness"] = {"labs_hours": 1 / 60, "vitals_hours": 24 * 365, "action": "flag"}
    params = parameters(client.post("/fhir/$predict", json=body, headers=headers).json())
    assert "refusal" not in params
    r = client.get(f"/predictions/{params['prediction']['valueId']}",
                   headers=bearer(app, Role.clinician))
    explanation = r.json()["explanation"]
    [stale] = [w for w in explanation["warnings"] if w.startswith("stale data: ")]
    assert "laboratory results" in stale
    fresh = explanation["data_freshness"]
    assert fresh["action"] == "flag" and fresh["hours_since"]["labs"] > 1 / 60
    assert fresh["hours_since"]["vitals"] is not None and len(fresh["problems"]) == 1
