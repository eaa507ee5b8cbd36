"""Host checking and the dashboard's OAuth callback (issue 19, finding 3: SSRF).

The callback used to post the authorization code to ``http://<Host header>/auth/token``
and echo the reply's error text into the page: anyone could make the server call an
address of their choosing (cloud metadata, internal ports) and read a little of the
answer. Now unknown Host headers get 400, and the code goes only to a configured
endpoint or to the address the server itself listens on; errors are generic.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from services.auth.principal import Role
from services.dashboard.routes import LAUNCH_COOKIE
from tests.security.http_edge_support import edge_settings, running

REMOTE_TEXT = "REMOTE-SECRET-7f3a"


class TokenServer:
    """A loopback HTTP server standing in for a token endpoint: records, then ``reply``."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.reply: tuple[int, str, bytes] = (400, "application/json", b"{}")
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.calls.append(self.path)
                status, media, body = owner.reply
                self.send_response(status)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()

    def answer(self, status: int, body: Any, media: str = "application/json") -> None:
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.reply = (status, media, raw)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def shared_token_server() -> Iterator[TokenServer]:
    server = TokenServer()
    yield server
    server.close()


@pytest.fixture
def token_server(shared_token_server: TokenServer) -> TokenServer:
    shared_token_server.calls.clear()
    return shared_token_server


def _callback(client: TestClient, host: str | None = None, **params: str) -> httpx.Response:
    headers = {"Cookie": f"{LAUNCH_COOKIE}=st4te.verifier"}
    if host is not None:
        headers["Host"] = host
    return client.get("/dashboard/callback", params={"state": "st4te", **params},
                      headers=headers, follow_redirects=False)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory,
           shared_token_server: TokenServer) -> Iterator[TestClient]:
    """The token endpoint configured to be the loopback stand-in (reachable under the
    outbound policy: a listed loopback origin)."""
    origin = shared_token_server.origin
    settings = edge_settings(tmp_path_factory.mktemp("callback"),
                             auth_token_endpoint=f"{origin}/token",
                             outbound_allowed_origins=[origin])
    with running(settings) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The default host list (and the test client's own name)."""
    with running(edge_settings(tmp_path_factory.mktemp("hosts"))) as test_client:
        yield test_client


@pytest.mark.parametrize("host", ["169.254.169.254", "evil.example.org", "10.0.0.7:8000",
                                  "attacker.test:443"])
def test_unknown_host_header_is_refused(plain: TestClient, host: str) -> None:
    assert plain.get("/dashboard/login").status_code == 200
    for path in ("/dashboard/login", "/dashboard/callback",
                 "/.well-known/smart-configuration", "/fhir/metadata"):
        answer = plain.get(path, headers={"Host": host}, follow_redirects=False)
        assert answer.status_code == 400, (path, host, answer.status_code)
    # Probes and scrapes come with the pod's address as Host: they still answer.
    assert plain.get("/healthz", headers={"Host": host}).status_code == 200


def test_loopback_and_public_host_are_allowed(tmp_path: Path) -> None:
    settings = edge_settings(tmp_path, public_base_url="https://clinfuse.hospital.example",
                             allowed_hosts=["testserver"])
    with running(settings) as client:
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "clinfuse.hospital.example"):
            assert client.get("/dashboard/login", headers={"Host": host}).status_code == 200


def test_callback_never_posts_to_the_host_header(plain: TestClient,
                                                 token_server: TokenServer) -> None:
    # The Host header names a loopback port (loopback names pass the host check): the old
    # callback posted the code there. Now the built-in endpoint is the socket's address
    # (the test client's "testserver", which does not resolve): nothing reaches the port.
    answer = _callback(plain, host=f"127.0.0.1:{token_server.port}", code="c0de")
    assert token_server.calls == []
    assert answer.status_code in (403, 502)


def test_callback_uses_the_configured_token_endpoint(client: TestClient,
                                                     token_server: TokenServer) -> None:
    token_server.answer(400, {"error": "invalid_grant"})
    answer = _callback(client, host="localhost:1", code="c0de")
    assert token_server.calls == ["/token"]
    assert answer.status_code == 403


@pytest.mark.parametrize(("status", "body", "media"), [
    (400, {"error": REMOTE_TEXT}, "application/json"),
    (500, f"<html>{REMOTE_TEXT}</html>", "text/html"),
    (200, f"not json {REMOTE_TEXT}", "text/plain"),
], ids=["json-error", "html-500", "200-not-json"])
def test_remote_error_text_is_not_echoed(client: TestClient, token_server: TokenServer,
                                         status: int, body: Any, media: str) -> None:
    token_server.answer(status, body, media)
    answer = _callback(client, code="c0de")
    assert token_server.calls == ["/token"]
    assert answer.status_code == 403
    assert REMOTE_TEXT not in answer.text
    assert "Sign-in failed" in answer.text


def test_error_description_from_the_redirect_is_not_echoed(client: TestClient) -> None:
    answer = _callback(client, error="access_denied",
                       error_description=f"Call +1-555 now {REMOTE_TEXT}")
    assert answer.status_code == 403
    assert REMOTE_TEXT not in answer.text
    assert "access_denied" in answer.text


def test_patient_from_the_token_reply_cannot_inject_a_header(
        client: TestClient, token_server: TokenServer) -> None:
    token = client.app.state.local_issuer.issue("test-clinician",  # type: ignore[attr-defined]
                                                Role.clinician)
    token_server.answer(200, {"access_token": token, "expires_in": 60,
                              "patient": "x\r\nSet-Cookie: evil=1"})
    answer = _callback(client, code="c0de")
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert "\r" not in location and "\n" not in location and "evil" not in location
    assert "evil" not in answer.headers.get("set-cookie", "")
