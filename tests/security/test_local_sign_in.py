"""Issue 19, finding 4: local sign-in only in the demo, and throttled on every path.

Local users sign in three ways: the password grant (``POST /auth/token``), the
SMART authorization form (``/auth/authorize`` -> code -> token) and the dashboard's
login form. Outside the demo all three refuse, even with the built-in issuer on
(deploy/compose.yaml runs production with it on, for Backend Services clients).
Failed sign-ins are counted in the database per user name and per client address;
past the limit a try gets 429 with Retry-After before any password is hashed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from tests.security.sign_in_support import (
    add_users,
    authorize_sign_in,
    authorize_url,
    cheap_argon2,  # noqa: F401  (a fixture)
    dashboard_login,
    password_grant,
    settings_for,
    started,
)

#: Cheap argon2 parameters: these tests count hashes and sign-ins, not their cost.
pytestmark = pytest.mark.usefixtures("cheap_argon2")


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts argon2 verifications (each costs 64 MiB and tens of milliseconds)."""
    calls: list[int] = []
    original = PasswordHasher.verify

    def counting(self: PasswordHasher, stored: Any, password: Any) -> Any:
        calls.append(1)
        return original(self, stored, password)

    monkeypatch.setattr(PasswordHasher, "verify", counting)
    return calls


@pytest.mark.parametrize("environment", ["production", "development"])
def test_no_local_sign_in_outside_the_demo(tmp_path: Path, environment: str) -> None:
    settings = settings_for(tmp_path, environment=environment)
    with started(settings) as client:
        add_users(client.app)  # type: ignore[arg-type]
        # The authorization page offers no sign-in form ...
        page = client.get(authorize_url())
        assert page.status_code == 400, page.text
        assert 'name="password"' not in page.text and "Local sign-in is off" in page.text
        # ... and a posted form gets no code, even with the right password.
        answer = authorize_sign_in(client, "dr.lee", "clinician-pw")
        assert "code=" not in answer.headers.get("location", ""), answer.headers
        assert answer.status_code == 400 and "Local sign-in is off" in answer.text
        grant = password_grant(client, "dr.lee", "clinician-pw")
        assert grant.status_code == 400 and grant.json()["error"] == "unsupported_grant_type"
        login = dashboard_login(client, "dr.lee", "clinician-pw")
        assert login.status_code == 400 and "clinfuse_session" not in login.headers.get(
            "set-cookie", "")


def test_demo_still_signs_in_on_every_path(tmp_path: Path) -> None:
    with started(settings_for(tmp_path)) as client:
        add_users(client.app)  # type: ignore[arg-type]
        assert password_grant(client, "dr.lee", "clinician-pw").status_code == 200
        assert dashboard_login(client, "dr.lee", "clinician-pw").status_code == 303
        answer = authorize_sign_in(client, "dr.lee", "clinician-pw")
        assert answer.status_code == 303 and "code=" in answer.headers["location"]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Any]:
    with started(settings_for(tmp_path)) as client:
        add_users(client.app)  # type: ignore[arg-type]
        yield client


def _throttled(answer: Any) -> None:
    assert answer.status_code == 429, answer.text
    retry = int(answer.headers["retry-after"])
    assert 0 < retry <= 900


def test_failures_on_any_path_lock_the_user_before_hashing(demo: Any,
                                                           hashes: list[int]) -> None:
    # Five failures spread over the three paths count together for the user name.
    assert password_grant(demo, "dr.lee", "wrong-1").status_code == 401
    assert password_grant(demo, "dr.lee", "wrong-2").status_code == 401
    assert dashboard_login(demo, "dr.lee", "wrong-3").status_code == 401
    assert dashboard_login(demo, "dr.lee", "wrong-4").status_code == 401
    assert authorize_sign_in(demo, "dr.lee", "wrong-5").status_code == 401
    assert len(hashes) == 5
    # Now even the right password is refused on every path, and nothing is hashed.
    grant = password_grant(demo, "dr.lee", "clinician-pw")
    _throttled(grant)
    assert grant.json()["error"] == "too_many_attempts"
    _throttled(dashboard_login(demo, "dr.lee", "clinician-pw"))
    answer = authorize_sign_in(demo, "dr.lee", "clinician-pw")
    _throttled(answer)
    assert "code=" not in answer.headers.get("location", "")
    assert len(hashes) == 5
    # Another user from the same address is not locked by dr.lee's failures.
    assert password_grant(demo, "kim", "compliance-pw").status_code == 200


def test_a_success_clears_the_users_failures(demo: Any) -> None:
    for k in range(4):
        assert password_grant(demo, "dr.lee", f"wrong-{k}").status_code == 401
    assert password_grant(demo, "dr.lee", "clinician-pw").status_code == 200
    assert password_grant(demo, "dr.lee", "wrong-again").status_code == 401
    assert password_grant(demo, "dr.lee", "clinician-pw").status_code == 200


def test_many_user_names_from_one_address_are_throttled(tmp_path: Path,
                                                        hashes: list[int]) -> None:
    settings = settings_for(tmp_path, sign_in_max_failures_per_address=3)
    with started(settings) as client:
        add_users(client.app)  # type: ignore[arg-type]
        for name in ("alice", "bob", "carol"):
            assert password_grant(client, name, "guess-123").status_code == 401
        _throttled(password_grant(client, "dave", "guess-123"))
        _throttled(password_grant(client, "dr.lee", "clinician-pw"))
        assert len(hashes) == 3


def test_counters_are_shared_by_replicas_and_survive_restarts(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    with started(settings) as first, started(settings) as second:
        add_users(first.app)  # type: ignore[arg-type]
        for k in range(3):
            assert password_grant(first, "dr.lee", f"wrong-{k}").status_code == 401
        for k in range(2):
            assert password_grant(second, "dr.lee", f"wrong-{k}").status_code == 401
        _throttled(password_grant(first, "dr.lee", "clinician-pw"))
    with started(settings) as restarted:
        _throttled(password_grant(restarted, "dr.lee", "clinician-pw"))
