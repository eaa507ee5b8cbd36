"""FHIR ingest routes on SQLite and PostgreSQL: Bundles, batch, NDJSON, metadata, Patient read."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from fhir_adapters.fhir_json import records_from_json
from pipelines.synth import generate_cohort
from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from services.db import session_factory, session_scope
from services.tables import (
    AccessLogRow,
    FhirResourceRow,
    JobRow,
    PatientIdentifierRow,
    PatientRow,
)
from tests.services.service_support import bearer
from tests.shared_data import shared_data_dir

FHIR = {"Content-Type": "application/fhir+json"}
NDJSON = {"Content-Type": "application/fhir+ndjson"}
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic cohort (FHIR Bundles and HL7 v2), written once for the module."""
    out = tmp_path_factory.mktemp("synth")
    generate_cohort(12, out, seed=3, n_slices=4, size=16, workers=1)
    return out


@pytest.fixture
def bundle(cohort: Path) -> dict[str, Any]:
    first = sorted((cohort / "fhir").glob("*.json"))[0]
    data: dict[str, Any] = json.loads(first.read_text())
    return data


def _settings(engine: Engine, tmp_path: Path, **extra: Any) -> Settings:
    return Settings(database_url=engine.url.render_as_string(hide_password=False),
                    data_dir=tmp_path / "data", **extra)


@pytest.fixture
def app(db_engine: Engine, tmp_path: Path) -> FastAPI:
    return create_app(_settings(db_engine, tmp_path))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=bearer(app, Role.integration)) as test_client:
        yield test_client



def _count(engine: Engine, table: Any) -> int:
    with session_scope(session_factory(engine)) as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def _post(client: TestClient, payload: Any, headers: dict[str, str] = FHIR) -> Any:
    body = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    return client.post("/fhir", content=body, headers=headers)


def _statuses(response: Any) -> list[str]:
    return [e["response"]["status"] for e in response.json()["entry"]]


def _outcomes(response: Any) -> list[str]:
    return [e["response"]["outcome"]["issue"][0]["diagnostics"].split(":")[0]
            for e in response.json()["entry"]]


def _patient_id(response: Any) -> str:
    locations = [e["response"]["location"] for e in response.json()["entry"]
                 if e["response"].get("location", "").startswith("Patient/")]
    return str(locations[0].split("/")[1])


def _record(engine: Engine, patient_id: str) -> dict[str, Any]:
    with session_scope(session_factory(engine)) as session:
        row = session.get(PatientRow, patient_id)
        assert row is not None
        return dict(row.record)


def _of_type(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


# --------------------------------------------------------------------------- transactions


def test_transaction_twice_changes_nothing(client: TestClient, db_engine: Engine,
                                           bundle: dict[str, Any]) -> None:
    n = len(bundle["entry"])
    mrn = _of_type(bundle, "Patient")[0]["identifier"][0]["value"]
    first = _post(client, bundle)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"].startswith("application/fhir+json")
    assert first.json()["type"] == "transaction-response"
    assert _statuses(first) == ["201 Created"] * n
    patient_id = _patient_id(first)
    assert mrn not in patient_id and len(patient_id) == 32
    counts = (_count(db_engine, FhirResourceRow), _count(db_engine, PatientRow),
              _count(db_engine, PatientIdentifierRow))
    assert counts == (n, 1, 1)
    record = _record(db_engine, patient_id)
    assert record["key"] == {"system": MRN_SYSTEM, "value": mrn}
    assert len(record["observations"]) == len(_of_type(bundle, "Observation"))
    assert len(record["conditions"]) == len(_of_type(bundle, "Condition"))
    # The record is exactly what the FHIR adapter reads from the Bundle itself.
    direct = records_from_json(bundle)[0]
    assert sorted(o.value for o in direct.observations if isinstance(o.value, float)) == sorted(
        o["value"] for o in record["observations"] if isinstance(o["value"], float))
    assert record["demographics"]["birth_date"] == str(direct.demographics.birth_date)

    second = _post(client, bundle)
    assert second.status_code == 200
    assert _statuses(second) == ["200 OK"] * n
    assert set(_outcomes(second)) == {"unchanged"}
    assert (_count(db_engine, FhirResourceRow), _count(db_engine, PatientRow),
            _count(db_engine, PatientIdentifierRow)) == counts
    assert _record(db_engine, patient_id) == record
    with session_scope(session_factory(db_engine)) as session:
        jobs = session.scalars(select(JobRow).where(JobRow.kind == "patient-updated")).all()
        assert [j.dedupe_key for j in jobs] == [f"patient-updated:{patient_id}"]
        assert jobs[0].payload == {"patient_id": patient_id}


def test_fresh_urn_uuids_for_the_same_content_change_nothing(
        client: TestClient, db_engine: Engine, bundle: dict[str, Any]) -> None:
    assert _post(client, bundle).status_code == 200
    text = json.dumps(bundle).replace("urn:uuid:", "urn:uuid:f")
    again = _post(client, text)
    assert again.status_code == 200
    assert set(_outcomes(again)) == {"unchanged"}


def test_a_bad_entry_refuses_the_whole_transaction(client: TestClient, db_engine: Engine,
                                                   bundle: dict[str, Any]) -> None:
    broken = copy.deepcopy(bundle)
    index = next(i for i, e in enumerate(broken["entry"])
                 if e["resource"]["resourceType"] == "Observation")
    broken["entry"][index]["resource"]["effectiveDateTime"] = "31/12/2023 SECRET"
    response = _post(client, broken)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == [
        f"Bundle.entry[{index}].resource.effectiveDateTime"]
    assert "SECRET" not in response.text and "31/12" not in response.text
    assert _count(db_engine, FhirResourceRow) == 0
    assert _count(db_engine, PatientRow) == 0


def test_a_store_time_failure_rolls_the_transaction_back(
        client: TestClient, db_engine: Engine, bundle: dict[str, Any]) -> None:
    # The Patient is written before the dangling subject is found: the savepoint undoes it.
    broken = copy.deepcopy(bundle)
    index = len(broken["entry"]) - 1
    broken["entry"][index]["resource"]["subject"] = {"reference": "Patient/nobody-here"}
    response = _post(client, broken)
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["expression"] == [f"Bundle.entry[{index}].resource.subject.reference"]
    assert "nobody-here" not in response.text
    assert _count(db_engine, FhirResourceRow) == 0
    assert _count(db_engine, PatientRow) == 0
    assert _count(db_engine, PatientIdentifierRow) == 0


def test_malformed_json_names_line_and_column_not_values(client: TestClient,
                                                         db_engine: Engine) -> None:
    body = ('{"resourceType": "Bundle",\n "type": "transaction",\n'
            ' "entry": [{"resource": {"resourceType": "Patient", "id": "MRN-SECRET-77"}}\n'
            ' "oops"]}')
    response = _post(client, body)
    assert response.status_code == 400
    issue = response.json()["issue"][0]
    assert issue["code"] == "structure"
    assert "line 4, column 2" in issue["diagnostics"]
    assert "MRN-SECRET-77" not in response.text and "oops" not in response.text
    assert _count(db_engine, FhirResourceRow) == 0


def test_not_a_bundle_is_refused(client: TestClient) -> None:
    response = _post(client, {"resourceType": "Patient", "id": "x"})
    assert response.status_code == 422
    assert response.json()["issue"][0]["expression"] == ["resourceType"]


def test_collection_and_searchset_are_ingested_like_a_transaction(
        client: TestClient, db_engine: Engine, bundle: dict[str, Any]) -> None:
    collection = copy.deepcopy(bundle)
    collection["type"] = "collection"
    for entry in collection["entry"]:
        entry.pop("request", None)
    response = _post(client, collection)
    assert response.status_code == 200
    assert _statuses(response) == ["201 Created"] * len(bundle["entry"])
    searchset = copy.deepcopy(collection)
    searchset["type"] = "searchset"
    assert set(_outcomes(_post(client, searchset))) == {"unchanged"}


def test_entered_in_error_drops_out_of_the_record(client: TestClient, db_engine: Engine,
                                                  bundle: dict[str, Any]) -> None:
    patient_id = _patient_id(_post(client, bundle))
    before = _record(db_engine, patient_id)["observations"]
    # Resend one observation (same sender id, so same identity) marked entered-in-error.
    fixed = copy.deepcopy(bundle)
    obs_entry = next(e for e in fixed["entry"] if e["resource"]["resourceType"] == "Observation")
    obs_entry["resource"]["status"] = "entered-in-error"
    obs_entry["resource"].pop("encounter")  # that entry is not resent
    patient_entry = next(e for e in fixed["entry"] if e["resource"]["resourceType"] == "Patient")
    response = _post(client, {"resourceType": "Bundle", "type": "transaction",
                              "entry": [patient_entry, obs_entry]})
    assert response.status_code == 200
    assert _outcomes(response) == ["unchanged", "updated"]
    after = _record(db_engine, patient_id)["observations"]
    assert len(after) == len(before) - 1
    gone = obs_entry["resource"]["valueQuantity"]["value"]
    assert sum(o["value"] == gone for o in after) == sum(o["value"] == gone for o in before) - 1
    with session_scope(session_factory(db_engine)) as session:
        statuses = session.scalars(select(FhirResourceRow.status).where(
            FhirResourceRow.resource_type == "Observation")).all()
        assert sorted(set(statuses)) == ["active", "entered-in-error"]
        assert statuses.count("entered-in-error") == 1


# --------------------------------------------------------------------------- batch


def test_batch_answers_entry_by_entry(client: TestClient, db_engine: Engine) -> None:
    patient = {"resourceType": "Patient", "id": "b1",
               "identifier": [{"system": MRN_SYSTEM, "value": "MRN-B-1"}], "gender": "female"}
    good = {"resourceType": "Observation", "status": "final",
            "identifier": [{"system": "urn:example:lab", "value": "L-1"}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2524-7"}]},
            "subject": {"reference": f"Patient?identifier={MRN_SYSTEM}|MRN-B-1"},
            "effectiveDateTime": "2026-01-02T03:04:00Z",
            "valueQuantity": {"value": 4.1, "unit": "mmol/L"}}
    bad = {**good, "identifier": [{"system": "urn:example:lab", "value": "L-2"}],
           "effectiveDateTime": "yesterday"}
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient, "request": {"method": "POST", "url": "Patient"}},
        {"resource": bad, "request": {"method": "POST", "url": "Observation"}},
        {"resource": good, "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "DELETE", "url": "Observation/abc"}},
    ]}
    response = _post(client, batch)
    assert response.status_code == 200
    body = response.json()
    assert body["type"] == "batch-response"
    assert _statuses(response) == ["201 Created", "422 Unprocessable Entity", "201 Created",
                                   "422 Unprocessable Entity"]
    entries = body["entry"]
    assert entries[1]["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[1].resource.effectiveDateTime"]
    assert entries[3]["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[3].request.method"]
    assert "yesterday" not in response.text
    patient_id = entries[0]["response"]["location"].split("/")[1]
    assert entries[2]["response"]["location"].startswith("Observation/")
    record = _record(db_engine, patient_id)
    assert [(o["code"], o["value"]) for o in record["observations"]] == [("2524-7", 4.1)]
    assert _count(db_engine, FhirResourceRow) == 2
    again = _post(client, batch)
    assert _statuses(again)[::2] == ["200 OK", "200 OK"]


# --------------------------------------------------------------------------- NDJSON


def _ndjson_lines(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The Bundle as a bulk export writes it: urn:uuid references become Type/id."""
    names = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
             for e in bundle["entry"]}
    text = json.dumps([e["resource"] for e in bundle["entry"]])
    for urn, relative in names.items():
        text = text.replace(f'"{urn}"', f'"{relative}"')
    resources: list[dict[str, Any]] = json.loads(text)
    return resources


def _ndjson(resources: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in resources)


def test_ndjson_import_links_across_files_and_is_idempotent(
        client: TestClient, db_engine: Engine, bundle: dict[str, Any]) -> None:
    resources = _ndjson_lines(bundle)
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    others = [r for r in resources if r["resourceType"] != "Patient"]
    # Two files, as an export writes them: the second refers to the first's Patient by id.
    first = client.post("/fhir/$import", content=_ndjson(patients), headers=NDJSON)
    assert first.status_code == 200, first.text
    assert first.json()["issue"][0]["diagnostics"] == (
        "ingested 1 resources for 1 patient(s): 1 created, 0 updated, 0 unchanged")
    second = client.post("/fhir/$import", content=_ndjson(others), headers=NDJSON)
    assert second.status_code == 200, second.text
    assert second.json()["issue"][0]["diagnostics"] == (
        f"ingested {len(others)} resources for 1 patient(s): {len(others)} created, 0 updated, "
        "0 unchanged")
    again = client.post("/fhir/$import", content=_ndjson(others), headers=NDJSON)
    assert again.json()["issue"][0]["diagnostics"].endswith(
        f"0 created, 0 updated, {len(others)} unchanged")
    assert _count(db_engine, PatientRow) == 1
    with session_scope(session_factory(db_engine)) as session:
        record = session.scalars(select(PatientRow)).one().record
    assert len(record["observations"]) == len(_of_type(bundle, "Observation"))
    assert len(record["encounters"]) == len(_of_type(bundle, "Encounter"))


def test_ndjson_bad_line_is_dropped_and_named_the_rest_stored(
        client: TestClient, db_engine: Engine, bundle: dict[str, Any]) -> None:
    # Issue 17: $import goes line by line (it was all or nothing).
    resources = _ndjson_lines(bundle)
    lines = _ndjson(resources).splitlines()
    lines[2] = lines[2][:40] + ' "SECRET": }'
    response = client.post("/fhir/$import", content="\n".join(lines) + "\n", headers=NDJSON)
    assert response.status_code == 200, response.text
    info, *warnings = response.json()["issue"]
    n = len(resources) - 1
    assert info == {"severity": "information", "code": "informational", "diagnostics":
                    f"ingested {n} resources for 1 patient(s): {n} created, 0 updated, "
                    "0 unchanged; 1 line(s) dropped (see the warnings)"}
    [warning] = warnings
    assert (warning["severity"], warning["code"]) == ("warning", "structure")
    assert warning["diagnostics"].startswith("line 3: malformed JSON at line 1, column")
    assert warning["diagnostics"].endswith("the line was dropped")
    assert "SECRET" not in response.text
    assert _count(db_engine, FhirResourceRow) == n


def test_ndjson_lines_the_reader_or_the_store_refuse_are_dropped_and_named(
        client: TestClient, db_engine: Engine) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "SECRETNAME"}],
               "identifier": [{"system": MRN_SYSTEM, "value": "MRN-IMPORT-1"}]}
    obs = {"resourceType": "Observation", "status": "final", "subject": {"reference":
                                                                        "Patient/p1"},
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "effectiveDateTime": "2026-01-02T03:04:00Z", "valueQuantity": {"value": 88}}
    no_status = {k: v for k, v in obs.items() if k != "status"}
    nobody = obs | {"subject": {"reference": "Patient/nobody"}}
    no_identifier = {"resourceType": "Patient", "id": "p2", "gender": "male"}
    leap = obs | {"effectiveDateTime": "2017-02-29T12:52:00Z"}  # nulled by records, not stored
    body = _ndjson([patient, obs, no_status, nobody, no_identifier, leap])
    response = client.post("/fhir/$import", content=body, headers=NDJSON)
    assert response.status_code == 200, response.text
    info, *warnings = response.json()["issue"]
    assert info["diagnostics"] == ("ingested 2 resources for 1 patient(s): 2 created, "
                                   "0 updated, 0 unchanged; 4 line(s) dropped (see the warnings)")
    assert [(w["severity"], w["diagnostics"].split(":")[0], w["expression"]) for w in warnings
            ] == [
        ("warning", "line 3, Observation.status", ["Observation.status"]),
        ("warning", "line 6, Observation.effectiveDateTime", ["Observation.effectiveDateTime"]),
        ("warning", "line 5, Patient.identifier", ["Patient.identifier"]),
        ("warning", "line 4, Observation.subject.reference", ["Observation.subject.reference"]),
    ]
    assert "does not resolve to a Patient in this request or in the store" in (
        warnings[3]["diagnostics"])
    assert "SECRETNAME" not in response.text and "2017-02-29" not in response.text
    assert _count(db_engine, FhirResourceRow) == 2
    assert _count(db_engine, PatientRow) == 1


def test_ndjson_with_no_usable_line_stores_nothing(client: TestClient,
                                                   db_engine: Engine) -> None:
    response = client.post("/fhir/$import", content='{"SECRET": 1\n[]\n\n', headers=NDJSON)
    assert response.status_code == 400
    issues = response.json()["issue"]
    assert [(i["severity"], i["diagnostics"].split(":")[0]) for i in issues] == [
        ("error", "line 1"), ("error", "line 2")]
    assert "SECRET" not in response.text
    assert _count(db_engine, FhirResourceRow) == 0


def test_ndjson_needs_its_media_type(client: TestClient) -> None:
    response = client.post("/fhir/$import", content="{}\n", headers=FHIR)
    assert response.status_code == 415
    assert response.json()["issue"][0]["code"] == "not-supported"


# --------------------------------------------------------------------------- limits, types


def test_wrong_media_type_is_415(client: TestClient, db_engine: Engine,
                                 bundle: dict[str, Any]) -> None:
    response = client.post("/fhir", content=json.dumps(bundle),
                           headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert response.json()["resourceType"] == "OperationOutcome"
    assert _count(db_engine, FhirResourceRow) == 0


def test_oversized_body_is_413_and_nothing_is_stored(db_engine: Engine, tmp_path: Path,
                                                     bundle: dict[str, Any]) -> None:
    app = create_app(_settings(db_engine, tmp_path, max_upload_bytes=2048))
    with TestClient(app, headers=bearer(app, Role.integration)) as small:
        response = _post(small, bundle)
        assert response.status_code == 413
        assert response.json()["issue"][0]["code"] == "too-long"
        ndjson = small.post("/fhir/$import", content=_ndjson(_ndjson_lines(bundle)),
                            headers=NDJSON)
        assert ndjson.status_code == 413
    assert _count(db_engine, FhirResourceRow) == 0


# --------------------------------------------------------------------------- reads, roles


def test_patient_read_by_opaque_id_and_roles(app: FastAPI, client: TestClient,
                                             db_engine: Engine, bundle: dict[str, Any]) -> None:
    patient_id = _patient_id(_post(client, bundle))
    mrn = _of_type(bundle, "Patient")[0]["identifier"][0]["value"]
    for role in (Role.integration, Role.clinician, Role.admin):
        response = client.get(f"/fhir/Patient/{patient_id}", headers=bearer(app, role))
        assert response.status_code == 200
        resource = response.json()
        assert resource["resourceType"] == "Patient" and resource["id"] == patient_id
        assert resource["identifier"][0]["value"] == mrn
    assert client.get(f"/fhir/Patient/{patient_id}",
                      headers=bearer(app, Role.compliance)).status_code == 403
    missing = client.get("/fhir/Patient/0123456789abcdef0123456789abcdef")
    assert missing.status_code == 404
    assert missing.json()["issue"][0]["code"] == "not-found"
    assert _post(client, bundle, {**FHIR, **bearer(app, Role.clinician)}).status_code == 403
    assert client.post("/fhir/$import", content="{}", headers={
        **NDJSON, **bearer(app, Role.compliance)}).status_code == 403
    with session_scope(session_factory(db_engine)) as session:
        reads = session.scalars(select(AccessLogRow).where(
            AccessLogRow.resource == "GET /fhir/Patient/{id}", AccessLogRow.status == 200)).all()
        assert {r.patient_id for r in reads} == {patient_id}
        assert all(mrn not in r.resource for r in reads)


def test_metadata_is_public_and_lists_what_is_served(app: FastAPI, db_engine: Engine) -> None:
    paths = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    if ("GET", "/fhir/RiskAssessment") not in paths:
        # Stand in for the predictions router when it is not mounted in this build.
        app.add_api_route("/fhir/RiskAssessment", lambda: {}, methods=["GET"])
    with TestClient(app) as anonymous:
        response = anonymous.get("/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1" and statement["kind"] == "instance"
    rest = statement["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    assert "import" in {o["name"] for o in rest["operation"]}
    resources = {r["type"]: r for r in rest["resource"]}
    assert resources["Patient"]["interaction"] == [{"code": "read"}]
    assert resources["RiskAssessment"]["interaction"] == [{"code": "search-type"}]
    assert rest["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    # Everything listed is served: $predict appears exactly when its route is mounted.
    predict_mounted = any(p.startswith("/fhir/Patient/{") and p.endswith("/$predict")
                          for _, p in paths)
    listed = {o["name"] for o in resources["Patient"].get("operation", [])}
    assert ("predict" in listed) == predict_mounted


# --------------------------------------------------------------------------- shared data


def test_shared_synthea_bundles_round_trip(client: TestClient, db_engine: Engine) -> None:
    folder = shared_data_dir("fhir/synthea_r4_bundles")
    # Synthea's practitioner and hospital Bundles carry no patient data: stored, unlinked.
    shared = sorted(folder.glob("*Information*.json"))
    assert len(shared) == 2
    for path in shared:
        response = _post(client, path.read_bytes())
        assert response.status_code == 200, response.text[:300]
        assert _statuses(response) == ["201 Created"] * 102
    assert _count(db_engine, PatientRow) == 0
    path = min((p for p in folder.glob("*.json") if "Information" not in p.name),
               key=lambda p: p.stat().st_size)
    raw = path.read_bytes()
    bundle = json.loads(raw)
    direct = records_from_json(raw)[0]
    assert direct.key is not None
    first = _post(client, raw)
    assert first.status_code == 200, first.text[:500]
    # The patient's own resources are new; the Organization and Practitioner entries it
    # repeats from the Bundles above are already stored under their NPI/Synthea ids.
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    outcomes = _outcomes(first)
    assert {o for k, o in zip(kinds, outcomes, strict=True)
            if k not in ("Organization", "Practitioner")} == {"created"}
    repeated = sum(o != "created" for o in outcomes)
    assert repeated == sum(k in ("Organization", "Practitioner") for k in kinds) > 0
    patient_id = _patient_id(first)
    record = _record(db_engine, patient_id)
    assert record["key"] == {"system": direct.key.system, "value": direct.key.value}
    assert len(record["identifiers"]) == len(direct.identifiers)
    for part in ("observations", "conditions", "encounters", "medications"):
        assert len(record[part]) == len(getattr(direct, part)), part
    assert record["demographics"]["sex"] == direct.demographics.sex
    assert record["demographics"]["birth_date"] == str(direct.demographics.birth_date)
    rows = _count(db_engine, FhirResourceRow)
    assert rows == len(bundle["entry"]) - repeated + 204
    second = _post(client, raw)
    assert set(_outcomes(second)) == {"unchanged"}
    assert _count(db_engine, FhirResourceRow) == rows
