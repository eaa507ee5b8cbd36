"""HL7 v2 over HTTP and MLLP on SQLite and PostgreSQL: ACK/NAK, merges, cancellations."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from pipelines.synth import generate_cohort
from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from services.db import session_factory, session_scope
from services.mllp import CR, FS, VT, frame
from services.tables import (
    FhirResourceRow,
    JobRow,
    PatientIdentifierRow,
    PatientRow,
    PredictionRow,
)
from tests.services.service_support import bearer
from tests.shared_data import shared_data_dir

ER7 = {"Content-Type": "x-application/hl7-v2+er7"}
SAMPLES = "hl7v2/ms_fhir_converter_samples"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hl7_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic patient's HL7 v2 feed (ADT^A01, ORU^R01s, MDM^T02)."""
    out = tmp_path_factory.mktemp("synth")
    generate_cohort(12, out, seed=3, n_slices=4, size=16, workers=1)
    return sorted((out / "hl7").glob("*.hl7"))[0]


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


def _segments(text: str) -> list[str]:
    return [s for s in text.replace("\n", "\r").split("\r") if s]


def _acks(response: Any) -> list[list[str]]:
    """The ACK messages of a response, each as its segments."""
    acks: list[list[str]] = []
    for segment in _segments(response.text):
        if segment.startswith("MSH|"):
            acks.append([])
        acks[-1].append(segment)
    return acks


def _msa(ack: list[str]) -> list[str]:
    return next(s for s in ack if s.startswith("MSA|")).split("|")


def _post(client: TestClient, text: str | bytes, **headers: str) -> Any:
    return client.post("/hl7v2", content=text, headers={**ER7, **headers})


def _count(engine: Engine, table: Any) -> int:
    with session_scope(session_factory(engine)) as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def _patient(engine: Engine, system: str, value: str) -> PatientRow | None:
    with session_scope(session_factory(engine)) as session:
        patient_id = session.scalar(select(PatientIdentifierRow.patient_id).where(
            PatientIdentifierRow.system == system, PatientIdentifierRow.value == value))
        return None if patient_id is None else session.get(PatientRow, patient_id)


def _message(control: str, event: str, pid3: str, *body: str, version: str = "2.5.1") -> str:
    structure = {"A01": "ADT_A01", "A03": "ADT_A03", "A11": "ADT_A09", "A13": "ADT_A01",
                 "A40": "ADT_A39", "R01": "ORU_R01"}[event]
    kind = "ORU" if event == "R01" else "ADT"
    return "\r".join([
        f"MSH|^~\\&|LAB|HOSP|CLINFUSE|CLINFUSE|20250102030400+0000||{kind}^{event}^{structure}|"
        f"{control}|P|{version}",
        f"PID|1||{pid3}||Doe^Jane||19500203|F",
        *body]) + "\r"


# --------------------------------------------------------------------------- HTTP


def test_synthetic_feed_over_http_is_acked_and_idempotent(client: TestClient, db_engine: Engine,
                                                         hl7_file: Path) -> None:
    text = hl7_file.read_text()
    segments = _segments(text)
    controls = [s.split("|")[9] for s in segments if s.startswith("MSH|")]
    numeric = [s for s in segments if s.startswith("OBX|") and s.split("|")[2] == "NM"]
    mrn = next(s for s in segments if s.startswith("PID|")).split("|")[3].split("^")[0]
    response = _post(client, text)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("x-application/hl7-v2+er7")
    acks = _acks(response)
    assert [_msa(a)[1:3] for a in acks] == [["AA", c] for c in controls]
    assert response.headers["x-hl7-ack-codes"] == ",".join(["AA"] * len(controls))
    patient = _patient(db_engine, "urn:oid:2.16.840.1.113883.3.9999.1", mrn)
    assert patient is not None and mrn not in patient.id
    assert len(patient.record["observations"]) == len(numeric)
    assert [e["status"] for e in patient.record["encounters"]] == ["in-progress"]
    assert len(patient.record["notes"]) >= 1
    rows = _count(db_engine, FhirResourceRow)
    again = _post(client, text)
    assert {_msa(a)[1] for a in _acks(again)} == {"AA"}
    assert _count(db_engine, FhirResourceRow) == rows
    after = _patient(db_engine, "urn:oid:2.16.840.1.113883.3.9999.1", mrn)
    assert after is not None and after.record == patient.record
    with session_scope(session_factory(db_engine)) as session:
        keys = session.scalars(select(JobRow.dedupe_key).where(
            JobRow.kind == "patient-updated")).all()
        assert set(keys) == {f"patient-updated:{patient.id}"}


def test_nak_locates_the_field_and_never_echoes_values(client: TestClient,
                                                        db_engine: Engine) -> None:
    # A bad date is nulled (AA with a warning, tests/services/test_hl7_tolerance.py); a
    # version this receiver cannot read still refuses the whole message.
    bad = _message("BAD-1", "A01", "MRN-N-1^^^HOSP^MR", version="3.0")
    response = _post(client, bad)
    assert response.status_code == 200
    ack = _acks(response)[0]
    assert _msa(ack)[1:3] == ["AR", "BAD-1"]
    err = next(s for s in ack if s.startswith("ERR|")).split("|")
    assert err[2] == "MSH^1^12" and err[3].startswith("203^") and err[4] == "E"
    assert "MRN-N-1" not in response.text
    assert _count(db_engine, PatientRow) == 0

    junk = _post(client, "hello, this is not HL7")
    assert _msa(_acks(junk)[0])[1:3] == ["AR", ""]
    assert junk.headers["x-hl7-ack-codes"] == "AR"

    # Each message of a batch stands alone: the good one is stored, the bad one is not.
    good = _message("GOOD-1", "A01", "MRN-N-2^^^HOSP^MR")
    both = _post(client, good + bad)
    assert [_msa(a)[1:3] for a in _acks(both)] == [["AA", "GOOD-1"], ["AR", "BAD-1"]]
    assert _count(db_engine, PatientRow) == 1
    assert _patient(db_engine, "HOSP", "MRN-N-2") is not None


def test_impossible_obx14_is_acked_aa_with_a_warning_and_every_result_stored(
        client: TestClient, db_engine: Engine) -> None:
    obr = "OBR|1||S1|57128-1^Newborn screening panel^LN|||20170301083000-0500"
    results = [f"OBX|{n}|NM|{46000 + n}-1^Analyte {n}^LN||{n}.5|umol/L^^UCUM|||||F|||{when}"
               for n, when in ((1, "20170228125200-0500"), (2, "201702291252-0500"), (3, ""))]
    text = _message("NBS-1", "R01", "NB-1^^^PHL^MR", obr, *results)
    response = _post(client, text)
    [ack] = _acks(response)
    assert _msa(ack)[1:3] == ["AA", "NBS-1"]
    assert response.headers["x-hl7-ack-codes"] == "AA"
    [err] = [s.split("|") for s in ack if s.startswith("ERR|")]
    assert err[2:5] == ["OBX^2^14", "102^Data type error^HL70357", "W"]
    assert "OBX-14" in err[8] and "20170229" not in response.text
    patient = _patient(db_engine, "PHL", "NB-1")
    assert patient is not None
    times = {o["code"]: o["effective"] for o in patient.record["observations"]}
    assert times == {"46001-1": "2017-02-28T17:52:00+00:00",
                     "46002-1": "2017-03-01T13:30:00+00:00",  # OBR-7's time
                     "46003-1": "2017-03-01T13:30:00+00:00"}


def test_lf_file_with_a_wrapped_field_is_stored_and_warned(client: TestClient,
                                                          db_engine: Engine) -> None:
    text = _message("WRAP-1", "R01", "WR-1^^^PHL^MR",
                    "OBR|1||S2|57128-1^Newborn screening\npanel^LN|||20170301083000-0500",
                    "OBX|1|TX|48767-8^Comment^LN||Repeat at\n48 hours||||||F",
                    "OBX|2|XTN|18706-8^Contact^LN||^WPN^PH^^1^555^5550100||||||F")
    response = _post(client, text.replace("\r", "\n"))
    [ack] = _acks(response)
    assert _msa(ack)[1:3] == ["AA", "WRAP-1"]
    errs = [s.split("|") for s in ack if s.startswith("ERR|")]
    assert [(e[2], e[4]) for e in errs] == [("OBR^1^4", "W"), ("OBX^1^5", "W"),
                                            ("OBX^2^2", "W")]
    # The whole number: the ACK's random control id can hold any three digits.
    assert "5550100" not in response.text
    patient = _patient(db_engine, "PHL", "WR-1")
    assert patient is not None
    assert [n["text"] for n in patient.record["notes"]] == ["Repeat at 48 hours"]


def test_media_type_size_and_role(app: FastAPI, client: TestClient, db_engine: Engine,
                                  tmp_path: Path) -> None:
    message = _message("M-1", "A01", "MRN-T-1^^^HOSP^MR")
    assert _post(client, message, **{"Content-Type": "text/plain"}).status_code == 415
    assert _post(client, message, **bearer(app, Role.clinician)).status_code == 403
    assert _post(client, message, **bearer(app, Role.compliance)).status_code == 403
    small = create_app(_settings(db_engine, tmp_path / "small", max_upload_bytes=64))
    with TestClient(small, headers=bearer(small, Role.integration)) as limited:
        assert _post(limited, message).status_code == 413
    assert _count(db_engine, PatientRow) == 0


# --------------------------------------------------------------------------- MLLP


def _read_frames(sock: socket.socket, n: int) -> list[str]:
    data = b""
    while data.count(FS + CR) < n:
        chunk = sock.recv(65536)
        assert chunk, "the listener closed the connection"
        data += chunk
    frames = [f for f in data.split(FS + CR) if f]
    assert all(f.startswith(VT) for f in frames)
    return [f[1:].decode() for f in frames]


def _code(ack: str) -> str:
    return next(s for s in ack.split("\r") if s.startswith("MSA|")).split("|")[1]


def test_mllp_listener_acks_each_message_and_survives_bad_frames(
        db_engine: Engine, tmp_path: Path) -> None:
    app = create_app(_settings(db_engine, tmp_path, mllp_enabled=True, mllp_port=0))
    first = _message("L-1", "A01", "MRN-L-1^^^HOSP^MR")
    second = _message("L-2", "A01", "MRN-L-2^^^HOSP^MR")
    with TestClient(app), socket.create_connection(
            ("127.0.0.1", app.state.mllp.port), timeout=30) as sock:
        # Two frames and junk between them, in one write.
        sock.sendall(frame(first) + b"junk between frames" + frame(second))
        acks = _read_frames(sock, 3)
        assert [_code(a) for a in acks] == ["AA", "AR", "AA"]
        assert "MSA|AA|L-1" in acks[0] and "MSA|AA|L-2" in acks[2]
        # A frame cut short by the next one, then FS without CR, then not HL7 at all.
        sock.sendall(VT + b"MSH|^~\\&|LAB|HOSP" + frame(_message("L-3", "A01",
                                                                 "MRN-L-3^^^HOSP^MR")))
        sock.sendall(VT + first.encode() + FS + frame("hello"))
        acks = _read_frames(sock, 4)
        assert [_code(a) for a in acks] == ["AR", "AA", "AR", "AR"]
        # Still serving, and a bad value is nulled: AA with a warning naming the field only.
        bad = _message("L-4", "A01", "MRN-L-4^^^HOSP^MR").replace("19500203", "19XX0203")
        sock.sendall(frame(bad) + frame(first))
        acks = _read_frames(sock, 2)
        assert [_code(a) for a in acks] == ["AA", "AA"]
        [err] = [s.split("|") for s in acks[0].split("\r") if s.startswith("ERR|")]
        assert err[2:5] == ["PID^1^7", "102^Data type error^HL70357", "W"]
        assert "19XX" not in acks[0] and "ERR|" not in acks[1]
        assert app.state.mllp.port > 0
    assert _count(db_engine, PatientRow) == 4
    kept = _patient(db_engine, "HOSP", "MRN-L-4")
    assert kept is not None and kept.record["demographics"]["birth_date"] is None


def test_mllp_multi_message_frame_gets_one_ack_per_message(db_engine: Engine,
                                                           tmp_path: Path) -> None:
    app = create_app(_settings(db_engine, tmp_path, mllp_enabled=True, mllp_port=0))
    batch = (_message("B-1", "A01", "MRN-M-1^^^HOSP^MR")
             + _message("B-2", "A01", "MRN-M-2^^^HOSP^MR"))
    with TestClient(app), socket.create_connection(
            ("127.0.0.1", app.state.mllp.port), timeout=30) as sock:
        sock.sendall(frame(batch))
        acks = _read_frames(sock, 2)
    assert ["MSA|AA|B-1" in acks[0], "MSA|AA|B-2" in acks[1]] == [True, True]
    assert _count(db_engine, PatientRow) == 2


# --------------------------------------------------------------------------- ADT semantics


def test_a40_merges_the_prior_patient_into_the_survivor(app: FastAPI, client: TestClient,
                                                        db_engine: Engine) -> None:
    lactate = ("OBR|1||F-1|24323-8^Comprehensive metabolic panel^LN|||20250101080000+0000",
               "OBX|1|NM|2524-7^Lactate^LN||3.3|mmol/L^mmol/L^UCUM|0.5-2.2||||F|||"
               "20250101080000+0000")
    prior = _message("P-1", "R01", "56789^^^BCBS^MR", *lactate)
    survivor = _message("S-1", "A01", "12345^^^BCBS^MR",
                        "PV1|1|I|MED^101^A||||||||||||||||V-1|||||||||||||||||||||||||"
                        "20250101070000+0000")
    assert [_msa(a)[1] for a in _acks(_post(client, prior + survivor))] == ["AA", "AA"]
    old = _patient(db_engine, "BCBS", "56789")
    new = _patient(db_engine, "BCBS", "12345")
    assert old is not None and new is not None and old.id != new.id
    with session_scope(session_factory(db_engine)) as session:
        session.add(PredictionRow(patient_id=old.id, index_time=datetime(2025, 1, 1, tzinfo=UTC),
                                  model_name="m", model_version="1", probability=0.2,
                                  modalities="ehr", source="job",
                                  risk_assessment={"resourceType": "RiskAssessment",
                                                   "subject": {"reference":
                                                               f"Patient/{old.id}"}}))

    merge = (shared_data_dir(SAMPLES) / "ADT-A40-01.hl7").read_bytes()
    response = _post(client, merge)
    assert [_msa(a)[1:3] for a in _acks(response)] == [["AA", "8919-40"]]
    with session_scope(session_factory(db_engine)) as session:
        assert session.get(PatientRow, old.id) is None
        owners = dict(session.execute(select(PatientIdentifierRow.value,
                                             PatientIdentifierRow.patient_id)).all())
        assert owners == {"56789": new.id, "12345": new.id}
        observation = session.scalars(select(FhirResourceRow).where(
            FhirResourceRow.resource_type == "Observation")).one()
        assert observation.patient_id == new.id
        assert observation.resource["subject"] == {"reference": f"Patient/{new.id}"}
        statuses = dict(session.execute(select(FhirResourceRow.identity, FhirResourceRow.status)
                                        .where(FhirResourceRow.resource_type == "Patient")).all())
        assert statuses == {"BCBS|56789": "merged", "BCBS|12345": "active"}
        prediction = session.scalars(select(PredictionRow)).one()
        assert prediction.patient_id == new.id
        assert prediction.risk_assessment is not None
        assert prediction.risk_assessment["subject"]["reference"] == f"Patient/{new.id}"
        record = session.get(PatientRow, new.id)
        assert record is not None
        assert [(o["code"], o["value"]) for o in record.record["observations"]] == [
            ("2524-7", 3.3)]
        assert {i["value"] for i in record.record["identifiers"]} == {"12345", "56789"}
        # The survivor's own demographics stand (the A40 PID), not the prior's.
        assert record.record["demographics"]["birth_date"] == "2018-02-05"
    read = client.get(f"/fhir/Patient/{new.id}")
    assert read.status_code == 200
    assert read.json()["link"][0]["other"]["identifier"]["value"] == "56789"
    # A later message under the prior MRN files to the survivor.
    late = _message("P-2", "R01", "56789^^^BCBS^MR", *lactate)
    assert _msa(_acks(_post(client, late))[0])[1] == "AA"
    assert _count(db_engine, PatientRow) == 1


def test_a11_cancels_the_admission_and_a13_the_discharge(client: TestClient,
                                                         db_engine: Engine) -> None:
    samples = shared_data_dir(SAMPLES)

    def encounters() -> list[tuple[str, str | None, str | None]]:
        patient = _patient(db_engine, "test1", "PATID1234")
        assert patient is not None
        return [(e["status"], e["start"], e["end"]) for e in patient.record["encounters"]]

    start, end = "2015-02-08T10:24:19+00:00", "2015-02-09T10:24:19+00:00"
    for name, expected in (("ADT-A01-01.hl7", [("planned", start, None)]),
                           ("ADT-A11-01.hl7", []),
                           ("ADT-A03-01.hl7", [("finished", start, end)]),
                           ("ADT-A13-01.hl7", [("in-progress", start, None)])):
        response = _post(client, (samples / name).read_bytes())
        assert _msa(_acks(response)[0])[1] == "AA", name
        assert encounters() == expected, name
    with session_scope(session_factory(db_engine)) as session:
        rows = session.scalars(select(FhirResourceRow).where(
            FhirResourceRow.resource_type == "Encounter")).all()
        assert [(r.status, r.resource["status"]) for r in rows] == [("active", "in-progress")]


def test_a11_and_a13_by_visit_number(client: TestClient, db_engine: Engine) -> None:
    pid3 = "MRN-V-1^^^HOSP^MR"
    pv1 = ("PV1|1|I|MED^101^A||||||||||||||||V-77^^^HOSP|||||||||||||||||||||||||"
           "20250101070000+0000")
    discharged = pv1 + "|20250105070000+0000"
    steps = [("A01", pv1, [("in-progress", None)]),
             ("A03", discharged, [("finished", "2025-01-05T07:00:00+00:00")]),
             # A13 as some senders write it: the old discharge time still in PV1-45.
             ("A13", discharged, [("in-progress", None)]),
             ("A11", pv1, [])]
    for n, (event, segment, expected) in enumerate(steps):
        response = _post(client, _message(f"V-{n}", event, pid3, segment))
        assert _msa(_acks(response)[0])[1] == "AA", event
        patient = _patient(db_engine, "HOSP", "MRN-V-1")
        assert patient is not None
        assert [(e["status"], e["end"]) for e in patient.record["encounters"]] == expected, event
    assert _count(db_engine, FhirResourceRow) == 2  # one Patient, one visit


def test_a11_without_visit_number_cancels_the_latest_open_visit_once(
        client: TestClient, db_engine: Engine) -> None:
    pid3 = "MRN-X-1^^^HOSP^MR"

    def pv1(start: str = "") -> str:
        return "PV1|1|I|MED^101^A" + "|" * 41 + start

    for control, segment in (("X-1", pv1("20250101070000+0000")),
                             ("X-2", pv1("20250201070000+0000"))):
        assert _msa(_acks(_post(client, _message(control, "A01", pid3, segment)))[0])[1] == "AA"
    cancel = _message("X-3", "A11", pid3, pv1())
    for _ in range(2):  # the resend must not cancel the earlier visit too
        assert _msa(_acks(_post(client, cancel))[0])[1] == "AA"
        patient = _patient(db_engine, "HOSP", "MRN-X-1")
        assert patient is not None
        assert [(e["status"], e["start"]) for e in patient.record["encounters"]] == [
            ("in-progress", "2025-01-01T07:00:00+00:00")]
    with session_scope(session_factory(db_engine)) as session:
        statuses = sorted(session.scalars(select(FhirResourceRow.status).where(
            FhirResourceRow.resource_type == "Encounter")))
        assert statuses == ["active", "applied", "cancelled"]


def test_corrected_results_w_and_d_drop_out_of_the_record(client: TestClient, db_engine: Engine,
                                                          hl7_file: Path) -> None:
    text = hl7_file.read_text()
    assert {_msa(a)[1] for a in _acks(_post(client, text))} == {"AA"}
    segments = _segments(text)
    pid = next(s for s in segments if s.startswith("PID|"))
    mrn = pid.split("|")[3].split("^")[0]
    patient = _patient(db_engine, "urn:oid:2.16.840.1.113883.3.9999.1", mrn)
    assert patient is not None
    before = [(o["code"], o["value"]) for o in patient.record["observations"]]
    # Resend the first ORU's OBR with its first two results withdrawn (W) and deleted (D).
    obr_at = next(i for i, s in enumerate(segments) if s.startswith("OBR|"))
    obr, first, second = segments[obr_at], segments[obr_at + 1], segments[obr_at + 2]

    def status(obx: str, code: str) -> str:
        fields = obx.split("|")
        fields[11] = code
        return "|".join(fields)

    correction = "\r".join([
        "MSH|^~\\&|LAB|HOSP|CLINFUSE|CLINFUSE|20250102030400+0000||ORU^R01^ORU_R01|FIX-1|P|2.5.1",
        pid, obr, status(first, "W"), status(second, "D")]) + "\r"
    assert _msa(_acks(_post(client, correction))[0])[1:3] == ["AA", "FIX-1"]
    after_row = _patient(db_engine, "urn:oid:2.16.840.1.113883.3.9999.1", mrn)
    assert after_row is not None
    after = [(o["code"], o["value"]) for o in after_row.record["observations"]]
    assert len(after) == len(before) - 2
    for obx in (first, second):
        fields = obx.split("|")
        withdrawn = (fields[3].split("^")[0], float(fields[5]))
        assert after.count(withdrawn) == before.count(withdrawn) - 1
    with session_scope(session_factory(db_engine)) as session:
        statuses = session.scalars(select(FhirResourceRow.status).where(
            FhirResourceRow.resource_type == "Observation",
            FhirResourceRow.status != "active")).all()
        assert statuses == ["entered-in-error", "entered-in-error"]
