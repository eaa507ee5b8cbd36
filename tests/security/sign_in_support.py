"""Helpers for the sign-in, session and one-time-id security tests.

Apps are built in-process on a throwaway SQLite database; the browser side is
TestClient, over ``https://testserver`` unless a test is about plain http (Secure
cookies are never sent back over http, as in a browser).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.app import create_app
from services.auth import smart_launch
from services.auth.backend_services import add_user
from services.auth.principal import Role
from services.core.config import Settings
from services.db import session_scope

HTTPS = "https://testserver"
USERS = {"dr.lee": ("clinician-pw", Role.clinician), "kim": ("compliance-pw", Role.compliance)}


@pytest.fixture
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """argon2id at test strength (1 pass over 1 MiB, not 3 over 64 MiB): these tests count
    hashes and sign-ins, not their cost, and a hash records its own parameters."""
    from services.auth import passwords, sign_in

    monkeypatch.setattr(passwords, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024,
                                                             parallelism=1))
    # The dummy hash (unknown users) is made once per process: not at test strength after.
    sign_in._dummy_hash.cache_clear()
    yield
    sign_in._dummy_hash.cache_clear()


def settings_for(root: Path, **extra: Any) -> Settings:
    """Settings on a SQLite file under ``root``; ``extra`` overrides (demo by default)."""
    values: dict[str, Any] = {"environment": "demo", "auth_builtin_issuer": True,
                              "database_url": f"sqlite:///{root / 'db.sqlite'}",
                              "data_dir": root / "data", **extra}
    return Settings(**values)


def add_users(app: FastAPI) -> None:
    """The two local users of :data:`USERS` (the app's lifespan must have started)."""
    with session_scope(app.state.sessions) as session:
        for name, (password, role) in USERS.items():
            add_user(session, name, password, role)


def started(settings: Settings, base_url: str = HTTPS) -> TestClient:
    """A TestClient whose app has started (enter it with ``with``)."""
    return TestClient(create_app(settings), base_url=base_url)


def csrf(client: TestClient) -> str:
    """A CSRF token for this client's browser (the login page sets the cookie)."""
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', client.get("/dashboard/login").text)
    assert found is not None
    return found.group(1)


def authorization_fields(base: str = HTTPS) -> dict[str, str]:
    """A valid standalone ``/auth/authorize`` request of the dashboard client (no launch)."""
    verifier = smart_launch.new_code_verifier()
    return {"response_type": "code", "client_id": smart_launch.DASHBOARD_CLIENT_ID,
            "redirect_uri": f"{base}/dashboard/callback", "state": "state-1",
            "scope": "openid fhirUser user/*.read",
            "code_challenge": smart_launch.code_challenge(verifier),
            "code_challenge_method": "S256", "aud": f"{base}/fhir"}


def authorize_url(base: str = HTTPS) -> str:
    return "/auth/authorize?" + urlencode(authorization_fields(base))


def password_grant(client: TestClient, username: str, password: str) -> Any:
    return client.post("/auth/token", data={"grant_type": "password", "username": username,
                                            "password": password})


def dashboard_login(client: TestClient, username: str, password: str) -> Any:
    return client.post("/dashboard/login", data={"username": username, "password": password,
                                                 "csrf": csrf(client)},
                       follow_redirects=False)


def authorize_sign_in(client: TestClient, username: str, password: str) -> Any:
    return client.post("/auth/authorize", data={
        **authorization_fields(), "csrf": csrf(client), "username": username,
        "password": password, "decision": "allow"}, follow_redirects=False)
