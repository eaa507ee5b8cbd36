"""Request body limits before routing and auth (issue 19, finding 1: memory exhaustion).

Bodies used to be read and parsed before the token check, with no cap: a 200 MiB JSON
body sent without a token grew the process by over 1 GiB before the 401. Now every
body is capped as it streams in (1 MiB; the upload routes ``max_upload_bytes``) and
must arrive within a deadline.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from tests.security.http_edge_support import drive, edge_settings, running, stream
from tests.services.service_support import bearer, iter_routes

MiB = 1024 * 1024
#: The routes the issue names as upload routes; every other route gets 1 MiB.
UPLOADS = {("POST", "/fhir"), ("POST", "/fhir/$import"), ("POST", "/fhir/$predict"),
           ("POST", "/hl7v2")}
#: The routes that parse a body before they check the token.
UNAUTHENTICATED_TARGETS = ["/admin/models/activate", "/admin/models/rollback", "/audits"]
UPLOAD_LIMIT = 2 * MiB  # small, so the oversized upload bodies stay cheap to build


def _is_upload(method: str, path: str) -> bool:
    return (method, path) in UPLOADS or (method == "POST" and path.startswith("/dicomweb/"))


def _body_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the app that takes a body, read at collection time."""
    with tempfile.TemporaryDirectory() as root:
        app = create_app(Settings(data_dir=Path(root) / "data",
                                  database_url=f"sqlite:///{root}/db.sqlite"))
        return sorted({(m, p) for m, p, _ in iter_routes(app) if m in ("POST", "PUT", "PATCH")})


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = edge_settings(tmp_path_factory.mktemp("body-limit"),
                             max_upload_bytes=UPLOAD_LIMIT)
    with running(settings) as test_client:
        yield test_client


def test_default_limits() -> None:
    settings = Settings()
    assert settings.max_request_bytes == 1 * MiB
    assert settings.max_upload_bytes == 256 * MiB
    assert settings.request_body_timeout_s == 30


@pytest.mark.parametrize("path", UNAUTHENTICATED_TARGETS)
def test_oversized_body_without_token_gets_413_not_401(client: TestClient, path: str) -> None:
    answer = client.post(path, content=b"[" * (MiB + 1),
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 413, answer.text
    detail = answer.json()["detail"]
    assert "1048576 bytes" in detail and "CLINFUSE_MAX_REQUEST_BYTES" in detail
    assert answer.headers["x-request-id"]  # answered inside the request-context middleware


@pytest.mark.parametrize("path", UNAUTHENTICATED_TARGETS)
def test_streamed_oversized_body_is_not_buffered(client: TestClient, path: str) -> None:
    # No Content-Length: the app learns the size only by reading. 64 MiB are on offer;
    # the app must stop pulling just past 1 MiB (17 chunks of 64 KiB), not read on.
    answer = drive(client.app, "POST", path, stream(64 * MiB, 64 * 1024),  # type: ignore[arg-type]
                   headers={"content-type": "application/json"})
    assert answer.status == 413, (answer.status, answer.body[:200])
    assert answer.chunks_pulled <= 17, answer.chunks_pulled
    assert b"exceeds the limit of 1048576 bytes" in answer.body


def test_trickling_body_gets_408(tmp_path: Path) -> None:
    settings = edge_settings(tmp_path, request_body_timeout_s=0.3)
    with running(settings) as client:
        trickle = iter(lambda: b"[", None)  # never ends
        answer = drive(client.app, "POST", "/admin/models/activate",  # type: ignore[arg-type]
                       trickle, headers={"content-type": "application/json"},
                       pause_s=0.05, give_up_s=5)
    assert answer.status == 408, answer.status
    assert answer.seconds < 2
    assert b"did not arrive within 0.3 seconds" in answer.body
    assert answer.header("connection") == "close"


def test_upload_route_takes_a_body_above_1_mib(client: TestClient) -> None:
    patient = {"resourceType": "Patient",
               "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1",
                               "value": "MRN-LIMIT"}], "birthDate": "1950-04-02"}
    bundle = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:5bd5a1a4-05b2-4f0c-a7a6-8f1d7f0d2b11", "resource": patient,
         "request": {"method": "POST", "url": "Patient"}}]})
    body = bundle.encode() + b" " * (int(1.5 * MiB))  # JSON allows trailing whitespace
    headers = {**bearer(client.app, Role.integration),  # type: ignore[arg-type]
               "Content-Type": "application/fhir+json"}
    answer = client.post("/fhir", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    # Streamed without a Content-Length, too.
    streamed = drive(client.app, "POST", "/fhir",  # type: ignore[arg-type]
                     iter([bundle.encode(), b" " * int(1.5 * MiB)]),
                     headers={**headers})
    assert streamed.status == 200, streamed.body[:300]


def test_streamed_oversized_upload_gets_413(client: TestClient) -> None:
    headers = {**bearer(client.app, Role.integration),  # type: ignore[arg-type]
               "content-type": "application/fhir+json"}
    answer = drive(client.app, "POST", "/fhir", stream(64 * MiB, 64 * 1024),  # type: ignore[arg-type]
                   headers=headers)
    assert answer.status == 413
    assert answer.chunks_pulled <= UPLOAD_LIMIT // (64 * 1024) + 1
    outcome = json.loads(answer.body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert "CLINFUSE_MAX_UPLOAD_BYTES" in outcome["issue"][0]["diagnostics"]


def test_trickling_upload_gets_408(tmp_path: Path) -> None:
    settings = edge_settings(tmp_path, upload_body_timeout_s=0.3)
    with running(settings) as client:
        headers = {**bearer(client.app, Role.integration),  # type: ignore[arg-type]
                   "content-type": "application/fhir+json"}
        answer = drive(client.app, "POST", "/fhir", iter(lambda: b" ", None),  # type: ignore[arg-type]
                       headers=headers, pause_s=0.05, give_up_s=5)
    assert answer.status == 408


@pytest.mark.parametrize(("method", "path"), _body_routes())
def test_every_route_refuses_an_oversized_body_without_a_token(
        client: TestClient, method: str, path: str) -> None:
    limit = UPLOAD_LIMIT if _is_upload(method, path) else MiB
    url = re.sub(r"\{[^}]+\}", "x", path)
    answer = client.request(method, url, content=b"{" * (limit + 1),
                            headers={"Content-Type": "application/json"},
                            follow_redirects=False)
    assert answer.status_code == 413, (method, path, answer.status_code)


def test_the_upload_routes_exist(client: TestClient) -> None:
    """A renamed upload route would silently fall back to the 1 MiB limit."""
    served = {(m, p) for m, p, _ in iter_routes(client.app)}  # type: ignore[arg-type]
    assert served >= UPLOADS
    assert any(m == "POST" and p.startswith("/dicomweb/") for m, p in served)
