"""Issue 19, finding 12e: the client assertion's audience comes from configuration only.

Built from the request's Host header, the expected ``aud`` followed whatever host a
caller claimed, so an assertion minted for another server (or for a host name the
attacker chose) was accepted. Now it is the configured token endpoint, the public
base URL's, or the loopback address the service is configured on; otherwise the
grant refuses with a configuration error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from services.auth.backend_services import JWT_BEARER, register_client
from services.auth.principal import Role
from services.db import session_scope
from tests.security.sign_in_support import settings_for, started


@pytest.fixture
def client_key() -> tuple[Any, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP384R1())
    return key, {**jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True),
                 "kid": "k1"}


@contextmanager
def _app(tmp_path: Path, jwk: dict[str, Any], **extra: Any) -> Iterator[TestClient]:
    # The Host check answers attacker.example too: a Host the server accepts must still
    # not choose the audience.
    settings = settings_for(tmp_path, environment="production",
                            allowed_hosts=["testserver", "attacker.example"], **extra)
    with started(settings, base_url="http://testserver") as client:
        with session_scope(client.app.state.sessions) as session:  # type: ignore[attr-defined]
            register_client(session, "lab", {"keys": [jwk]}, Role.integration)
        yield client


def _grant(client: TestClient, key: Any, aud: str, host: str | None = None) -> Any:
    now = int(time.time())
    assertion = jwt.encode({"iss": "lab", "sub": "lab", "aud": aud, "exp": now + 120,
                            "jti": uuid.uuid4().hex}, key, algorithm="ES384",
                           headers={"kid": "k1"})
    return client.post("/auth/token", data={
        "grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion}, headers={"host": host} if host else None)


def test_the_host_header_does_not_choose_the_audience(
        tmp_path: Path, client_key: tuple[Any, dict[str, Any]]) -> None:
    key, jwk = client_key
    with _app(tmp_path, jwk) as client:
        # No public URL: the configured loopback address (host 127.0.0.1, port 8000).
        refused = _grant(client, key, "http://testserver/auth/token")
        assert refused.status_code == 401, refused.text
        assert "http://127.0.0.1:8000/auth/token" in refused.json()["error_description"]
        assert _grant(client, key, "http://attacker.example/auth/token",
                      host="attacker.example").status_code == 401
        assert _grant(client, key, "http://127.0.0.1:8000/auth/token").status_code == 200
        config = client.get("/.well-known/smart-configuration",
                            headers={"host": "attacker.example"}).json()
        assert config["token_endpoint"] == "http://127.0.0.1:8000/auth/token"


def test_public_base_url_and_configured_endpoint(
        tmp_path: Path, client_key: tuple[Any, dict[str, Any]]) -> None:
    key, jwk = client_key
    public = "https://clinfuse.hospital.example"
    with _app(tmp_path / "a", jwk, public_base_url=public) as client:
        assert _grant(client, key, f"{public}/auth/token",
                      host="attacker.example").status_code == 200
        assert _grant(client, key, "http://attacker.example/auth/token",
                      host="attacker.example").status_code == 401
    endpoint = "https://gateway.hospital.example/clinfuse/auth/token"
    with _app(tmp_path / "b", jwk, public_base_url=public,
              auth_token_endpoint=endpoint) as client:
        assert _grant(client, key, endpoint).status_code == 200
        assert _grant(client, key, f"{public}/auth/token").status_code == 401


def test_no_configured_address_is_a_configuration_error(
        tmp_path: Path, client_key: tuple[Any, dict[str, Any]]) -> None:
    key, jwk = client_key
    # Listening on every interface: no address says what clients call the service.
    with _app(tmp_path, jwk, host="0.0.0.0") as client:
        answer = _grant(client, key, "http://testserver/auth/token")
        assert answer.status_code == 500, answer.text
        assert answer.json()["error"] == "server_error"
        assert "CLINFUSE_PUBLIC_BASE_URL" in answer.json()["error_description"]
