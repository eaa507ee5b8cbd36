"""/audits: run over stored predictions, list, get (JSON, HTML, PDF), compare; on both
backends. Labels come from the stored records under the outcome definition."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from fhir_adapters.record import (
    Demographics,
    Encounter,
    Outcome,
    PatientIdentifier,
    PatientRecord,
)
from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from services.db import session_scope
from services.tables import PatientRow, PredictionRow
from tests.services.service_support import bearer

T0 = datetime(2025, 3, 1, tzinfo=UTC)
N = 240


@pytest.fixture
def client(db_engine: Engine, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=db_engine.url.render_as_string(hide_password=False),
                        data_dir=tmp_path / "data")
    app = create_app(settings)
    with TestClient(app, headers=bearer(app, Role.compliance, "officer-1")) as test_client:
        yield test_client


def _seed(client: TestClient, *, start: datetime = T0, version: str = "1.0.0",
          seed: int = 0, n: int = N, events: bool = True) -> None:
    """``n`` patients admitted over 30 days, each predicted once at admission + 72 h;
    about a quarter deteriorate (ICU or death) within 30 days, more often at high scores."""
    rng = np.random.default_rng(seed)
    with session_scope(client.app.state.sessions) as session:  # type: ignore[attr-defined]
        for i in range(n):
            admitted = start + timedelta(hours=3 * i)
            index = admitted + timedelta(hours=72)
            score = float(rng.uniform(0.02, 0.98))
            event = bool(rng.random() < score * 0.5) and events
            sex = "female" if i % 2 else "male"
            race = ("White", "Black or African American", "Asian")[i % 3]
            encounters = [Encounter("IMP", "in-progress", admitted, type="32485007")]
            outcome = Outcome()
            if event and i % 3:
                encounters.append(Encounter("ACUTE", "in-progress",
                                            index + timedelta(days=float(rng.uniform(0.1, 29))),
                                            type="305351004"))
            elif event:
                outcome = Outcome(True, index + timedelta(days=float(rng.uniform(0.1, 29))))
            record = PatientRecord(
                key=PatientIdentifier("urn:test:mrn", f"{version}-{seed}-{i}"),
                demographics=Demographics(sex=sex, birth_date=datetime(1950, 1, 1).date()),
                encounters=encounters, outcome=outcome)
            patient = PatientRow(identifier_system="urn:test:mrn",
                                 identifier_value=f"{version}-{seed}-{i}",
                                 record=record.to_json())
            session.add(patient)
            session.flush()
            refused = i % 40 == 0
            session.add(PredictionRow(
                patient_id=patient.id, index_time=index, created_at=index,
                model_name="clinfuse-fusion", model_version=version,
                probability=None if refused else score,
                refusal="out of population" if refused else None,
                decisions={"high_risk": {"threshold": 0.5, "flag": score >= 0.5}},
                modalities="image+ehr+note" if i % 4 else "ehr",
                attributes={"sex": sex, "race": race, "age_band": "65-79"}, source="job"))


def _run(client: TestClient, **body: object):  # type: ignore[no-untyped-def]
    payload = {"window_start": T0.isoformat(), "window_end": (T0 + timedelta(days=60)).isoformat(),
               "outcome": "deterioration", "n_boot": 100, "sensitive": ["sex", "race"],
               **body}
    payload = {k: v for k, v in payload.items() if v is not None}
    return client.post("/audits", json=payload)


def test_run_list_get_and_compare(client: TestClient) -> None:
    _seed(client)
    first = _run(client)
    assert first.status_code == 201, first.text
    summary = first.json()
    assert summary["run_by"] == "officer-1"
    assert summary["model_version"] == "1.0.0"
    assert summary["n_rows"] == N - N // 40  # refused predictions are counted, not scored
    assert len(summary["data_fingerprint"]) == 64
    assert any("censored" in line for line in summary["summary"])  # the rule is stated

    report = client.get(f"/audits/{summary['id']}")
    assert report.status_code == 200
    assert report.headers["content-type"].startswith("application/json")
    body = report.json()
    assert body["schema"] == "clinfuse.audit/1" and body["audit_id"] == summary["id"]
    assert body["selection"]["audited"] == N
    assert body["selection"]["window"]["on"] == "index_time"
    assert "horizon_days" in body["selection"]["outcome"]
    assert "urn:test:mrn" not in report.text  # aggregates only: no patient identifiers
    html = client.get(f"/audits/{summary['id']}", params={"format": "html"})
    assert html.headers["content-type"].startswith("text/html")
    assert "Fairness audit" in html.text and "censored" in html.text
    pdf = client.get(f"/audits/{summary['id']}", params={"format": "pdf"})
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")

    # A second audit over another window: list and compare.
    _seed(client, start=T0 + timedelta(days=90), seed=1)
    second = _run(client, window_start=(T0 + timedelta(days=90)).isoformat(),
                  window_end=(T0 + timedelta(days=150)).isoformat())
    assert second.status_code == 201, second.text
    listed = client.get("/audits").json()
    assert [a["id"] for a in listed] == [second.json()["id"], summary["id"]]
    diff = client.get("/audits/compare", params={"a": summary["id"], "b": second.json()["id"]})
    assert diff.status_code == 200
    changes = diff.json()
    assert changes["before"] == summary["id"] and changes["after"] == second.json()["id"]
    assert "data_window" in changes["provenance"] and "data_sha256" in changes["provenance"]
    assert client.get("/audits/compare", params={"a": summary["id"],
                                                 "b": "nope"}).status_code == 404
    assert client.get("/audits/nope").status_code == 404


def test_small_groups_stay_suppressed(client: TestClient) -> None:
    _seed(client, n=60)
    response = _run(client, min_group_size=30)
    assert response.status_code == 201, response.text
    report = client.get(f"/audits/{response.json()['id']}").json()
    small = [g for g in report["results"]["groups"] if g["status"] != "ok"]
    assert small and all("metrics" not in g for g in small)


def test_empty_window_is_a_clear_422(client: TestClient) -> None:
    response = _run(client, window_start="2001-01-01T00:00:00Z",
                    window_end="2001-02-01T00:00:00Z")
    assert response.status_code == 422
    assert "no stored predictions" in response.json()["detail"]
    assert "nothing to audit" in response.json()["detail"]


def test_unknown_outcomes_are_censored_409(client: TestClient) -> None:
    _seed(client, n=10, events=False)
    # Follow-up ends days after the predictions: nobody's 30 days are complete, and with
    # no event recorded nobody's label is known.
    response = _run(client, follow_up_until=(T0 + timedelta(days=5)).isoformat())
    assert response.status_code == 409
    assert "censored" in response.json()["detail"]


def test_request_errors(client: TestClient) -> None:
    _seed(client, n=20)
    _seed(client, n=20, version="2.0.0", seed=3)
    mixed = _run(client)
    assert mixed.status_code == 422 and "model versions" in mixed.json()["detail"]
    assert _run(client, model_version="2.0.0", sensitive=["payer"]).status_code == 422
    assert _run(client, outcome="nonsense", model_version="2.0.0").status_code == 422
    backwards = _run(client, window_start="2026-01-01T00:00:00Z",
                     window_end="2025-01-01T00:00:00Z")
    assert backwards.status_code == 422


@pytest.mark.parametrize("role", [Role.clinician, Role.integration])
def test_other_roles_are_refused(client: TestClient, role: Role) -> None:
    headers = bearer(client.app, role)  # type: ignore[arg-type]
    assert client.get("/audits", headers=headers).status_code == 403
    assert client.post("/audits", json={}, headers=headers).status_code == 403
    assert client.get("/audits", headers={"Authorization": ""}).status_code == 401


def test_admin_may_audit(client: TestClient) -> None:
    headers = bearer(client.app, Role.admin)  # type: ignore[arg-type]
    assert client.get("/audits", headers=headers).status_code == 200


def test_outcome_defaults_to_the_served_models(client: TestClient) -> None:
    from types import SimpleNamespace

    _seed(client, n=60)
    state = client.app.state  # type: ignore[attr-defined]
    saved = getattr(state, "predictions", None)
    try:
        state.predictions = None
        missing = _run(client, outcome=None)
        assert missing.status_code == 422 and "no outcome definition" in missing.json()["detail"]
        # A served model states its outcome (name, definition, horizon; coding by name).
        state.predictions = SimpleNamespace(outcome={
            "name": "deterioration", "definition": "death or ICU transfer within 30 days",
            "horizon_days": 30})
        response = _run(client, outcome=None)
        assert response.status_code == 201, response.text
    finally:
        state.predictions = saved
    report = client.get(f"/audits/{response.json()['id']}").json()
    assert report["selection"]["outcome"]["name"] == "deterioration"
    assert client.get(f"/audits/{response.json()['id']}",
                      params={"format": "xml"}).status_code == 422
