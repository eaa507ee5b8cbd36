"""Issue 19, findings 12f and 12g: server-side dashboard sessions and their cookie.

The session cookie used to be the bearer token itself: logout only asked the
browser to forget it, a copied cookie kept working (and worked against the API)
until the token expired, and it was Secure only when the base URL said https.
Now the cookie holds a random id, the database holds the session, logout revokes
it, and the cookie is Secure unless plain-http loopback is configured explicitly.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select, update

from services.core.config import Settings
from services.db import session_scope
from services.tables import DashboardSessionRow
from tests.security.sign_in_support import (
    add_users,
    cheap_argon2,  # noqa: F401  (a fixture)
    csrf,
    dashboard_login,
    settings_for,
    started,
)

#: Cheap argon2 parameters: these tests count hashes and sign-ins, not their cost.
pytestmark = pytest.mark.usefixtures("cheap_argon2")


def _session_cookie(answer: Any) -> str:
    cookies = answer.headers.get_list("set-cookie")
    found = [c for c in cookies if c.startswith("clinfuse_session=")]
    assert found, cookies
    return found[0]


def _rows(client: TestClient) -> list[DashboardSessionRow]:
    with session_scope(client.app.state.sessions) as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(DashboardSessionRow)))


def test_cookie_is_an_opaque_id_and_logout_revokes_it(tmp_path: Path) -> None:
    with started(settings_for(tmp_path)) as client:
        add_users(client.app)  # type: ignore[arg-type]
        assert dashboard_login(client, "kim", "compliance-pw").status_code == 303
        sid = client.cookies["clinfuse_session"]
        # Not a token: no JWT structure, and the API does not take it as a bearer token.
        assert sid.count(".") == 0 and len(sid) >= 32
        assert client.get("/audits", headers={"Authorization": f"Bearer {sid}"}
                          ).status_code == 401
        rows = _rows(client)
        assert len(rows) == 1 and rows[0].subject == "kim" and rows[0].role == "compliance"
        assert rows[0].id_hash == hashlib.sha256(sid.encode()).hexdigest()
        assert client.get("/dashboard/audits").status_code == 200
        logout = client.post("/dashboard/logout", data={"csrf": csrf(client)},
                             follow_redirects=False)
        assert logout.status_code == 303
        assert _rows(client)[0].revoked_at is not None
        # The old cookie, replayed (copied before logout), no longer opens anything.
        client.cookies.set("clinfuse_session", sid)
        replay = client.get("/dashboard/audits", follow_redirects=False)
        assert replay.status_code == 303
        assert replay.headers["location"].startswith("/dashboard/login")


def test_an_expired_or_unknown_session_needs_a_new_login(tmp_path: Path) -> None:
    with started(settings_for(tmp_path)) as client:
        add_users(client.app)  # type: ignore[arg-type]
        assert dashboard_login(client, "kim", "compliance-pw").status_code == 303
        assert client.get("/dashboard/audits").status_code == 200
        with session_scope(client.app.state.sessions) as session:  # type: ignore[attr-defined]
            session.execute(update(DashboardSessionRow).values(
                expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        expired = client.get("/dashboard/audits", follow_redirects=False)
        assert expired.status_code == 303
        client.cookies.clear()
        client.cookies.set("clinfuse_session", "x" * 43)
        forged = client.get("/dashboard/audits", follow_redirects=False)
        assert forged.status_code == 303


@pytest.mark.parametrize("public_base_url", [None, "http://clinfuse.hospital.example"])
def test_cookies_are_secure_httponly_samesite_by_default(tmp_path: Path,
                                                         public_base_url: str | None) -> None:
    settings = settings_for(tmp_path, public_base_url=public_base_url)
    with started(settings, base_url="http://testserver") as client:
        add_users(client.app)  # type: ignore[arg-type]
        page = client.get("/dashboard/login")
        csrf_cookie = page.headers["set-cookie"]
        assert csrf_cookie.startswith("clinfuse_csrf=") and "; secure" in csrf_cookie.lower()
        # Over plain http the client, like a browser, keeps a Secure cookie to itself; a
        # test hands the CSRF nonce back by hand to get as far as the session cookie.
        client.cookies.set("clinfuse_csrf", csrf_cookie.split(";")[0].split("=", 1)[1])
        answer = dashboard_login(client, "kim", "compliance-pw")
        assert answer.status_code == 303
        cookie = _session_cookie(answer).lower()
        assert "; secure" in cookie and "; httponly" in cookie and "samesite=strict" in cookie


def test_plain_http_loopback_demo_opts_out_explicitly(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, session_cookie_secure=False)
    with started(settings, base_url="http://127.0.0.1:8000") as client:
        add_users(client.app)  # type: ignore[arg-type]
        answer = dashboard_login(client, "kim", "compliance-pw")
        cookie = _session_cookie(answer).lower()
        assert "; secure" not in cookie and "; httponly" in cookie
        assert client.get("/dashboard/audits").status_code == 200
    with pytest.raises(ValidationError, match="session_cookie_secure"):
        Settings(environment="production", session_cookie_secure=False)


def test_the_demo_serves_plain_http_loopback_without_secure_cookies(tmp_path: Path) -> None:
    from services.demo import DemoService, _demo_settings, service_environment

    settings = _demo_settings(tmp_path)
    assert settings.session_cookie_secure is False and settings.host == "127.0.0.1"
    env = service_environment(DemoService(tmp_path, tmp_path, settings, {}))
    assert env["CLINFUSE_SESSION_COOKIE_SECURE"] == "false"
    assert Settings().session_cookie_secure is True
