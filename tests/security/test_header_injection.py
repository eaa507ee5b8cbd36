"""Request header values never reach response headers or logs raw (issue 19: header injection).

The values the service echoes or keeps: ``X-Request-ID`` (echoed in the response and
put in every log line), ``X-Purpose-Of-Use`` (kept in the access log) and the values
that end up in ``Location`` redirects. A CR/LF in any of them could split a header or
forge a log line; an oversized one could bloat both.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from services.auth.principal import Role
from services.observability import JsonFormatter
from services.tables import AccessLogRow
from tests.security.http_edge_support import edge_settings, running
from tests.services.service_support import bearer

INJECTED = "X-Evil: 1"


class _Lines(logging.Handler):
    """The request log as it is written (JSON, with the request id of the context)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with running(edge_settings(tmp_path_factory.mktemp("headers"))) as test_client:
        yield test_client


@pytest.mark.parametrize("value", [
    "abc\n", f"abc\r\n{INJECTED}", "abc\x1b[31m", "a" * 65, "two words", ""])
def test_unsafe_request_id_is_replaced(client: TestClient, value: str) -> None:
    lines, logger = _Lines(), logging.getLogger("clinfuse.http")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        answer = client.get("/healthz", headers={"X-Request-ID": value})
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    echoed = answer.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", echoed), repr(echoed)
    assert all(INJECTED not in line and "\n" not in line for line in lines.lines)
    assert any(f'"request_id": "{echoed}"' in line for line in lines.lines)


def test_safe_request_id_is_echoed(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "lb-7.a_b"}).headers[
        "x-request-id"] == "lb-7.a_b"


@pytest.mark.parametrize("value", [f"TREAT\r\n{INJECTED}", "TREAT\n", "\x1b[2JTREAT",
                                   "T" * 500])
def test_purpose_of_use_is_stored_without_control_characters(client: TestClient,
                                                             value: str) -> None:
    headers = {**bearer(client.app, Role.clinician),  # type: ignore[arg-type]
               "X-Purpose-Of-Use": value}
    assert client.get("/dicomweb/studies", headers=headers).status_code == 200
    with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        purpose = session.scalars(select(AccessLogRow.purpose)
                                  .order_by(AccessLogRow.seq.desc()).limit(1)).one()
    assert purpose is not None and purpose.startswith(("TREAT", "?[2JTREAT", "T"))
    assert re.fullmatch(r"[\x20-\x7e]{1,128}", purpose), repr(purpose)


def test_redirect_locations_carry_no_raw_line_breaks(client: TestClient) -> None:
    iss = quote("http://testserver/fhir", safe="")
    launch = quote(f"abc\r\nSet-Cookie: evil=1\r\n{INJECTED}", safe="")
    answer = client.get(f"/dashboard/launch?iss={iss}&launch={launch}",
                        follow_redirects=False)
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert "\r" not in location and "\n" not in location
    assert "evil" not in answer.headers.get("set-cookie", "")
    assert INJECTED.lower() not in {k.lower() for k in answer.headers}


def test_oversized_headers_are_not_echoed(client: TestClient, tmp_path: Path) -> None:
    big = "b" * 8000
    answer = client.get("/healthz", headers={"X-Request-ID": big, "X-Purpose-Of-Use": big})
    assert big not in "".join(answer.headers.values())
