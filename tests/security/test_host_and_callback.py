"""Host checking and the dashboard's OAuth callback (issue 19, finding 3: SSRF).

The callback used to post the authorization code to ``http://<Host header>/auth/token``
and echo the reply's error text into the page: anyone could make the server call an
address of their choosing (cloud metadata, internal ports) and read a little of the
answer. Now unknown Host headers get 400, and the code goes only to a configured
endpoint or to the address the server itself listens on; errors are generic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from services.auth.principal import Role
from services.dashboard.routes import LAUNCH_COOKIE
from tests.security.http_edge_support import edge_settings, running

REMOTE_TEXT = "REMOTE-SECRET-7f3a"


class _Recorder:
    """Stands in for ``httpx.post``: records each call and answers ``reply``."""

    def __init__(self, reply: httpx.Response) -> None:
        self.calls: list[str] = []
        self.reply = reply

    def __call__(self, url: str, *args: Any, **kwargs: Any) -> httpx.Response:
        self.calls.append(str(url))
        return self.reply


def _callback(client: TestClient, host: str | None = None, **params: str) -> httpx.Response:
    headers = {"Cookie": f"{LAUNCH_COOKIE}=st4te.verifier"}
    if host is not None:
        headers["Host"] = host
    return client.get("/dashboard/callback", params={"state": "st4te", **params},
                      headers=headers, follow_redirects=False)


@pytest.fixture
def client(tmp_path: Path) -> Any:
    # evil.example is allowed here only so the callback itself can be tested: in a real
    # deployment TrustedHostMiddleware refuses it before the callback runs.
    settings = edge_settings(tmp_path, allowed_hosts=["testserver", "evil.example"])
    with running(settings) as test_client:
        yield test_client


@pytest.mark.parametrize("host", ["169.254.169.254", "evil.example.org", "10.0.0.7:8000",
                                  "attacker.test:443"])
def test_unknown_host_header_is_refused(tmp_path: Path, host: str) -> None:
    with running(edge_settings(tmp_path)) as client:
        assert client.get("/dashboard/login").status_code == 200
        for path in ("/dashboard/login", "/dashboard/callback",
                     "/.well-known/smart-configuration", "/fhir/metadata"):
            answer = client.get(path, headers={"Host": host}, follow_redirects=False)
            assert answer.status_code == 400, (path, host, answer.status_code)
        # Probes and scrapes come with the pod's address as Host: they still answer.
        assert client.get("/healthz", headers={"Host": host}).status_code == 200


def test_loopback_and_public_host_are_allowed(tmp_path: Path) -> None:
    settings = edge_settings(tmp_path, public_base_url="https://clinfuse.hospital.example",
                             allowed_hosts=["testserver"])
    with running(settings) as client:
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "clinfuse.hospital.example"):
            assert client.get("/dashboard/login", headers={"Host": host}).status_code == 200


def test_callback_never_posts_to_the_host_header(client: TestClient,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(httpx.Response(400, json={"error": "invalid_grant"}))
    monkeypatch.setattr(httpx, "post", recorder)
    answer = _callback(client, host="evil.example:9999", code="c0de")
    assert answer.status_code == 403
    assert len(recorder.calls) == 1
    assert "evil.example" not in recorder.calls[0]
    # The built-in issuer, reached on the address the server listens on.
    assert recorder.calls[0] == "http://testserver:80/auth/token"


def test_callback_uses_the_configured_token_endpoint(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(httpx.Response(400, json={"error": "invalid_grant"}))
    monkeypatch.setattr(httpx, "post", recorder)
    settings = edge_settings(tmp_path, auth_token_endpoint="https://idp.hospital.example/token",
                             allowed_hosts=["testserver", "evil.example"])
    with running(settings) as client:
        _callback(client, host="evil.example", code="c0de")
    assert recorder.calls == ["https://idp.hospital.example/token"]


@pytest.mark.parametrize("reply", [
    httpx.Response(400, json={"error": REMOTE_TEXT}),
    httpx.Response(500, text=f"<html>{REMOTE_TEXT}</html>"),
    httpx.Response(200, text=f"not json {REMOTE_TEXT}"),
], ids=["json-error", "html-500", "200-not-json"])
def test_remote_error_text_is_not_echoed(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                         reply: httpx.Response) -> None:
    monkeypatch.setattr(httpx, "post", _Recorder(reply))
    answer = _callback(client, code="c0de")
    assert answer.status_code in (403, 502)
    assert REMOTE_TEXT not in answer.text
    assert "Sign-in failed" in answer.text


def test_error_description_from_the_redirect_is_not_echoed(client: TestClient) -> None:
    answer = _callback(client, error="access_denied",
                       error_description=f"Call +1-555 now {REMOTE_TEXT}")
    assert answer.status_code == 403
    assert REMOTE_TEXT not in answer.text
    assert "access_denied" in answer.text


def test_patient_from_the_token_reply_cannot_inject_a_header(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    token = client.app.state.local_issuer.issue("test-clinician",  # type: ignore[attr-defined]
                                                Role.clinician)
    reply = httpx.Response(200, json={"access_token": token, "expires_in": 60,
                                      "patient": "x\r\nSet-Cookie: evil=1"})
    monkeypatch.setattr(httpx, "post", _Recorder(reply))
    answer = _callback(client, code="c0de")
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert "\r" not in location and "\n" not in location and "evil" not in location
    assert "evil" not in answer.headers.get("set-cookie", "")
