"""Deeply nested JSON is a 400, not a 500 (issue 19, finding 12a).

Python's JSON parser recurses once per level; a body of 100,000 ``[`` (200 KB, far
under every size limit) raised RecursionError, which every route answered with a 500
and a traceback in the log. It is the client's input that is wrong: 400, saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.auth.principal import Role
from services.cds_hooks import SERVICE_ID
from tests.security.http_edge_support import edge_settings, running
from tests.services.service_support import bearer

DEPTH = 100_000
DEEP = b"[" * DEPTH + b"]" * DEPTH
DEEP_OBJECT = b'{"a":' * DEPTH + b"1" + b"}" * DEPTH


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with running(edge_settings(tmp_path_factory.mktemp("nested-json")),
                 raise_server_exceptions=False) as test_client:
        # $predict parses its body before it uses the model: any stand-in will do, so no
        # model has to be trained for this test.
        test_client.app.state.predictions = object()  # type: ignore[attr-defined]
        yield test_client


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT], ids=["array", "object"])
@pytest.mark.parametrize(("path", "role", "media"), [
    ("/fhir", Role.integration, "application/fhir+json"),
    ("/fhir/$predict", Role.integration, "application/fhir+json"),
    (f"/cds-services/{SERVICE_ID}/feedback", Role.clinician, "application/json"),
    ("/fhir/Patient/0123456789abcdef0123456789abcdef/$predict", Role.clinician,
     "application/fhir+json"),
    ("/admin/models/activate", Role.admin, "application/json"),
])
def test_deeply_nested_json_is_400(client: TestClient, caplog: pytest.LogCaptureFixture,
                                   path: str, role: Role, media: str, body: bytes) -> None:
    headers = {**bearer(client.app, role), "Content-Type": media}  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        answer = client.post(path, content=body, headers=headers)
    assert answer.status_code == 400, (answer.status_code, answer.text[:300])
    assert "nested too deeply" in answer.text or path == "/admin/models/activate"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    if path.startswith(("/fhir", "/cds-services")):
        assert answer.json()["resourceType"] == "OperationOutcome"


def test_recursion_error_outside_a_body_is_still_a_500(tmp_path: Path) -> None:
    """A RecursionError on a GET is the server's own bug, not the client's input."""
    with running(edge_settings(tmp_path), raise_server_exceptions=False) as client:
        def loop() -> None:
            loop()

        client.app.get("/test-recursion")(loop)  # type: ignore[attr-defined]
        assert client.get("/test-recursion").status_code == 500
