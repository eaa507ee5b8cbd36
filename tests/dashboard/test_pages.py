"""Dashboard pages without a browser: session cookie, CSRF, roles, access log, headers.

A small stored patient with a hand-made prediction (no model), served in-process by
TestClient on SQLite; the browser flows (test_browser_flows.py) cover the rest.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fhir_adapters.record import Demographics, Encounter, Note, PatientIdentifier, PatientRecord
from services.app import create_app
from services.auth.backend_services import add_user
from services.auth.principal import Role
from services.core.config import Settings
from services.db import session_scope
from services.tables import AccessLogRow, FeedbackRow, PatientRow, PredictionRow

PID = "0123456789abcdef0123456789abcdef"
INDEX = datetime(2024, 3, 1, 12, tzinfo=UTC)
BASE = "http://127.0.0.1:8000"


def _explanation() -> dict[str, Any]:
    return {
        "validation_label": "Not validated for clinical use",
        "risk": {"probability": 0.42, "baseline_probability": 0.1},
        "modalities": [{"modality": "ehr", "points": 25.0},
                       {"modality": "note", "points": 7.0}],
        "ehr": {"top_features": [{"display": "Lactate (last, 24 h)", "raw_value": 4.1,
                                  "unit": "mmol/L", "reference_low": 0.5,
                                  "reference_high": 2.2, "flag": "high", "points": 12.5}]},
        "notes": {"highlights": [{"sentence": "Lactate rising.", "points": 3.2,
                                  "negated": False}]},
        "rationale": "Predicted risk of deterioration within 30 days: 42% (baseline 10%).",
        "image": None,
    }


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    # Plain http on loopback, as the demo: cookies without Secure (TestClient, like a
    # browser, sends Secure cookies only over https).
    settings = Settings(environment="demo", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=tmp_path / "data", auth_builtin_issuer=True,
                        session_cookie_secure=False)
    app = create_app(settings)
    with TestClient(app, base_url=BASE) as test_client:
        record = PatientRecord(
            key=PatientIdentifier("urn:mrn", "MRN0001"),
            demographics=Demographics(sex="female", birth_date=date(1950, 5, 1)),
            notes=[Note("Progress note. Denies chest pain. Lactate rising.", "11506-3",
                        INDEX - timedelta(hours=5))],
            encounters=[Encounter("IMP", "in-progress", INDEX - timedelta(days=3),
                                  type="32485007")])
        with session_scope(app.state.sessions) as session:
            add_user(session, "dr.lee", "clinician-pw", Role.clinician)
            add_user(session, "kim", "compliance-pw", Role.compliance)
            session.add(PatientRow(id=PID, identifier_system="urn:mrn",
                                   identifier_value="MRN0001", record=record.to_json()))
            session.flush()
            for k, p in enumerate((0.2, 0.42)):
                session.add(PredictionRow(
                    patient_id=PID, index_time=INDEX - timedelta(days=1 - k),
                    created_at=INDEX - timedelta(days=1 - k), model_name="m",
                    model_version="1", probability=p, modalities="ehr+note",
                    decisions={"high_risk": {"threshold": 0.3, "flag": p >= 0.3},
                               "moderate_risk": {"threshold": 0.1, "flag": True}},
                    explanation=_explanation(), attributes={}, source="test"))
        yield test_client


def _csrf(client: TestClient, path: str = "/dashboard/login") -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', client.get(path).text)
    assert found is not None
    return found.group(1)


def _login(client: TestClient, user: str, password: str) -> None:
    answer = client.post("/dashboard/login", data={"username": user, "password": password,
                                                   "csrf": _csrf(client)},
                         follow_redirects=False)
    assert answer.status_code == 303, answer.text


def test_session_cookie_and_redirects(client: TestClient) -> None:
    answer = client.get("/dashboard/worklist", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fworklist"
    csrf = _csrf(client)
    answer = client.post("/dashboard/login", data={
        "username": "dr.lee", "password": "clinician-pw", "csrf": csrf,
        "next": "https://evil.example/dashboard/x"}, follow_redirects=False)
    # An off-site "next" is ignored: the login never redirects elsewhere.
    assert answer.headers["location"] == "/dashboard/worklist"
    cookie = answer.headers["set-cookie"]
    assert "clinfuse_session=" in cookie and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    page = client.get("/dashboard/worklist")
    assert page.status_code == 200 and "MRN0001" in page.text and "42%" in page.text
    assert "Inpatient ward" in page.text and "High" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"


def test_wrong_password_and_missing_csrf(client: TestClient) -> None:
    answer = client.post("/dashboard/login", data={"username": "dr.lee", "password": "nope",
                                                   "csrf": _csrf(client)})
    assert answer.status_code == 401 and "wrong password" in answer.text
    answer = client.post("/dashboard/login", data={"username": "dr.lee",
                                                   "password": "clinician-pw"})
    assert answer.status_code == 403 and "Form expired" in answer.text
    answer = client.post("/dashboard/login", data={"username": "dr.lee", "password":
                                                   "clinician-pw", "csrf": "0" * 64})
    assert answer.status_code == 403


def test_patient_page_and_feedback(client: TestClient) -> None:
    _login(client, "dr.lee", "clinician-pw")
    page = client.get(f"/dashboard/patients/{PID}")
    assert page.status_code == 200
    text = page.text
    assert "42%" in text and "Not validated for clinical use" in text
    assert "4.1 mmol/L" in text and "0.5–2.2 mmol/L" in text
    assert '<mark class="up"' in text and "Lactate rising." in text
    assert text.count('class="dot"') == 2  # the trend has both predictions
    csrf = _csrf(client, f"/dashboard/patients/{PID}")
    prediction = re.search(r'name="prediction_id" value="([0-9a-f]+)"', text)
    assert prediction is not None
    # Disagreeing needs a reason.
    answer = client.post(f"/dashboard/patients/{PID}/feedback", data={
        "csrf": csrf, "prediction_id": prediction.group(1), "verdict": "disagree"})
    assert answer.status_code == 400
    answer = client.post(f"/dashboard/patients/{PID}/feedback", data={
        "csrf": csrf, "prediction_id": prediction.group(1), "verdict": "disagree",
        "reason": "context-missing", "comment": "on comfort care"}, follow_redirects=False)
    assert answer.status_code == 303
    app = client.app
    with app.state.sessions() as session:  # type: ignore[attr-defined]
        row = session.scalars(select(FeedbackRow)).one()
        logged = session.scalars(select(AccessLogRow).where(
            AccessLogRow.resource == "GET /dashboard/patients/{patient_id}")).all()
    assert (row.outcome, row.channel, row.override_reason["code"]) == (
        "overridden", "dashboard", "context-missing")
    assert logged and all(r.patient_id == PID and r.subject == "dr.lee" for r in logged)
    assert "on comfort care" in client.get(f"/dashboard/patients/{PID}").text


def test_compliance_sees_no_patient(client: TestClient) -> None:
    _login(client, "kim", "compliance-pw")
    for path in (f"/dashboard/patients/{PID}", "/dashboard/worklist"):
        answer = client.get(path)
        assert answer.status_code == 403 and "MRN0001" not in answer.text
    log = client.get("/dashboard/access-log")
    assert log.status_code == 200 and "Intact" in log.text
    assert PID not in log.text and re.search(r"P-[0-9a-f]{16}", log.text)


def test_clinician_cannot_open_audits(client: TestClient) -> None:
    _login(client, "dr.lee", "clinician-pw")
    for path in ("/dashboard/audits", "/dashboard/access-log"):
        assert client.get(path).status_code == 403


def test_launch_checks_the_fhir_server(client: TestClient) -> None:
    answer = client.get("/dashboard/launch", params={"iss": "https://evil.example/fhir",
                                                     "launch": "x"})
    assert answer.status_code == 400 and "does not trust" in answer.text
    answer = client.get("/dashboard/launch", params={"iss": f"{BASE}/fhir", "launch": "x"},
                        follow_redirects=False)
    assert answer.status_code == 302
    target = answer.headers["location"]
    assert target.startswith(f"{BASE}/auth/authorize?") and "code_challenge_method=S256" in \
        target
    # A callback whose state did not start here is refused.
    assert client.get("/dashboard/callback", params={"code": "c", "state": "forged"}
                      ).status_code == 400
    # The launch context "x" is not a valid one: authorize redirects back with an error.
    back = client.get(target.removeprefix(BASE), follow_redirects=False)
    assert back.status_code == 302 and "error=invalid_request" in back.headers["location"]
