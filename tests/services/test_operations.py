"""Health, readiness, metrics and structured request logs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.core.config import Settings
from services.observability import JsonFormatter


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=tmp_path / "data")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = {c["check"]: c for c in ready.json()["checks"]}
    assert checks["database"] == {"check": "database", "ok": True, "detail": "sqlite"}
    assert checks["storage"]["ok"] is True


def test_readyz_reports_unwritable_storage(client: TestClient) -> None:
    storage = client.app.state.settings.dicom_storage_dir  # type: ignore[attr-defined]
    storage.rename(storage.with_name("moved"))
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert {c["check"]: c["ok"] for c in ready.json()["checks"]}["storage"] is False


def test_metrics_expose_latency_by_route_template(client: TestClient) -> None:
    client.get("/healthz")
    client.get("/dicomweb/studies/1.2.3/series")  # 401: no token, still timed
    text = client.get("/metrics").text
    assert 'clinfuse_http_request_duration_seconds_count{method="GET",route="/healthz",' \
           'status="200"} 1.0' in text
    assert 'route="/dicomweb/studies/{study}/series",status="401"' in text
    assert "1.2.3" not in text
    assert "# TYPE clinfuse_jobs gauge" in text


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers[
        "x-request-id"] == "abc-123"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id\nwith newline"})
    assert len(made.headers["x-request-id"]) == 32


def test_request_log_is_json_with_template_not_path(client: TestClient,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="clinfuse.http"):
        client.get("/dicomweb/studies/9.8.7.6", headers={"X-Request-ID": "rid-1"})
    records = [r for r in caplog.records if r.name == "clinfuse.http"]
    assert records
    # The formatter runs after the request context is gone; the id was captured in extras.
    entry = json.loads(JsonFormatter().format(records[-1]))
    assert entry["route"] == "/dicomweb/studies/{study}"
    assert entry["status"] == 401
    assert "9.8.7.6" not in json.dumps(entry)
