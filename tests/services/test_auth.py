"""Access control end to end: the demo's password grant, SMART Backend Services
client credentials (ES384 and RS384 assertions), tokens from a hospital IdP (RS256
via a JWKS file), rejected tokens (401), wrong roles (403) and the SMART
configuration; on both backends."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.app import create_app
from services.auth.backend_services import JWT_BEARER
from services.cli import main
from services.core.config import Settings

TOKEN_URL = "http://testserver/auth/token"
HOSPITAL = "https://idp.hospital.example/realms/clinical"


def _settings(engine: Engine, tmp_path: Path, **extra: Any) -> Settings:
    # The public URL decides the token endpoint a client assertion's aud must name.
    return Settings(database_url=engine.url.render_as_string(hide_password=False),
                    data_dir=tmp_path / "data", public_base_url="http://testserver", **extra)


@pytest.fixture
def client(db_engine: Engine, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(db_engine, tmp_path))) as test_client:
        yield test_client


def _cli(*argv: str, stdin: str | None = None,
         monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    if stdin is not None and monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return int(exit_info.value.code or 0)


def _url(client: TestClient) -> str:
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    return settings.database_url


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the demo's local users ------------------------------------------------------------


def test_password_grant_for_a_demo_user(client: TestClient,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert _cli("users", "add", "officer", "--role", "compliance", "--password-stdin",
                "--database-url", _url(client), stdin="correct horse battery\n",
                monkeypatch=monkeypatch) == 0
    response = client.post("/auth/token", data={"grant_type": "password", "username": "officer",
                                                "password": "correct horse battery"})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    token = response.json()["access_token"]
    assert response.json()["token_type"] == "Bearer"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "officer" and claims["clinfuse_role"] == "compliance"
    assert client.get("/audits", headers=_bearer(token)).status_code == 200
    assert client.get("/dicomweb/studies", headers=_bearer(token)).status_code == 403
    wrong = client.post("/auth/token", data={"grant_type": "password", "username": "officer",
                                             "password": "wrong password"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_grant"
    nobody = client.post("/auth/token", data={"grant_type": "password", "username": "nobody",
                                              "password": "whatever1"})
    assert nobody.status_code == 401
    assert "whatever1" not in nobody.text


def test_users_add_refuses_a_short_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("users", "add", "x", "--role", "admin", "--password-stdin", "--database-url",
                f"sqlite:///{tmp_path / 'u.db'}", stdin="short\n",
                monkeypatch=monkeypatch) == 2
    assert "at least 8 characters" in capsys.readouterr().err


# -- SMART Backend Services --------------------------------------------------------------


def _ec_key() -> tuple[Any, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return key, {**jwk, "kid": "ec-1", "alg": "ES384", "use": "sig"}


def _rsa_key(kid: str = "rsa-1", alg: str = "RS384") -> tuple[Any, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return key, {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def _assertion(key: Any, alg: str, kid: str, client_id: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": now + 240,
              "jti": uuid.uuid4().hex, **overrides}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def _token(client: TestClient, assertion: str, scope: str = "system/*.read"
           ) -> Any:
    return client.post("/auth/token", data={
        "grant_type": "client_credentials", "scope": scope,
        "client_assertion_type": JWT_BEARER, "client_assertion": assertion})


@pytest.fixture
def backend_clients(client: TestClient, tmp_path: Path) -> dict[str, tuple[Any, str, str]]:
    """Two registered clients (one ES384, one RS384), registered with `clinfuse clients add`."""
    out: dict[str, tuple[Any, str, str]] = {}
    for client_id, (key, jwk) in (("lab-system", _ec_key()), ("ehr-bridge", _rsa_key())):
        jwks = tmp_path / f"{client_id}.jwks.json"
        jwks.write_text(json.dumps({"keys": [jwk]}))
        assert _cli("clients", "add", client_id, "--jwks", str(jwks), "--role", "integration",
                    "--scope", "system/*.read system/*.write", "--database-url",
                    _url(client)) == 0
        out[client_id] = (key, jwk["alg"], jwk["kid"])
    return out


@pytest.mark.parametrize("client_id", ["lab-system", "ehr-bridge"])
def test_client_credentials_success(client: TestClient, client_id: str,
                                    backend_clients: dict[str, tuple[Any, str, str]]) -> None:
    key, alg, kid = backend_clients[client_id]
    response = _token(client, _assertion(key, alg, kid, client_id))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "system/*.read" and body["expires_in"] <= 3600
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == client_id and claims["client_id"] == client_id
    assert claims["clinfuse_role"] == "integration"
    # The integration role may store images but not read audits.
    assert client.get("/dicomweb/studies", headers=_bearer(body["access_token"])
                      ).status_code == 200
    assert client.get("/audits", headers=_bearer(body["access_token"])).status_code == 403


@pytest.mark.parametrize("client_id", ["lab-system", "ehr-bridge"])
def test_client_credentials_failures(client: TestClient, client_id: str,
                                     backend_clients: dict[str, tuple[Any, str, str]]) -> None:
    key, alg, kid = backend_clients[client_id]

    def refused(assertion: str, why: str) -> None:
        response = _token(client, assertion)
        assert response.status_code == 401, (why, response.text)
        assert response.json()["error"] == "invalid_client", why
        assert why in response.json()["error_description"]

    refused(_assertion(key, alg, kid, client_id, aud="https://elsewhere/token"),
            "aud must be this token endpoint")
    refused(_assertion(key, alg, kid, client_id, exp=int(time.time()) - 60), "expired")
    reused = _assertion(key, alg, kid, client_id)
    assert _token(client, reused).status_code == 200
    refused(reused, "jti was already used")
    refused(_assertion(key, alg, kid, "unknown-client"), "unknown client")
    other, _ = _ec_key() if alg == "ES384" else _rsa_key()
    refused(_assertion(other, alg, kid, client_id), "signature did not verify")
    refused(_assertion(key, alg, kid, client_id, exp=int(time.time()) + 3600),
            "more than five minutes")
    hs = jwt.encode({"iss": client_id, "sub": client_id, "aud": TOKEN_URL,
                     "exp": int(time.time()) + 60, "jti": uuid.uuid4().hex},
                    "a-shared-secret-of-32-bytes-or-more!", algorithm="HS256")
    refused(hs, "RS384 or ES384")


def test_client_credentials_scope_and_request_errors(
        client: TestClient, backend_clients: dict[str, tuple[Any, str, str]]) -> None:
    key, alg, kid = backend_clients["lab-system"]
    response = _token(client, _assertion(key, alg, kid, "lab-system"), scope="user/*.write")
    assert response.status_code == 400 and response.json()["error"] == "invalid_scope"
    bad_type = client.post("/auth/token", data={"grant_type": "client_credentials",
                                                "client_assertion": "x"})
    assert bad_type.status_code == 400 and bad_type.json()["error"] == "invalid_request"
    other = client.post("/auth/token", data={"grant_type": "implicit"})
    assert other.status_code == 400 and other.json()["error"] == "unsupported_grant_type"


# -- tokens from the hospital's identity provider -----------------------------------------


@pytest.fixture
def hospital(db_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[tuple[TestClient, Any]]:
    """The service configured through the environment to trust a hospital IdP's JWKS file."""
    key, jwk = _rsa_key(kid="idp-2026", alg="RS256")
    jwks = tmp_path / "idp-jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    monkeypatch.setenv("CLINFUSE_AUTH_ISSUER", HOSPITAL)
    monkeypatch.setenv("CLINFUSE_AUTH_JWKS_FILE", str(jwks))
    monkeypatch.setenv("CLINFUSE_AUTH_AUDIENCE", "clinfuse-prod")
    monkeypatch.setenv("CLINFUSE_AUTH_BUILTIN_ISSUER", "false")
    settings = _settings(db_engine, tmp_path)
    assert settings.auth_issuer == HOSPITAL and not settings.builtin_issuer_enabled
    with TestClient(create_app(settings)) as test_client:
        yield test_client, key


def _idp_token(key: Any, *, alg: str = "RS256", kid: str = "idp-2026",
               **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": HOSPITAL, "aud": "clinfuse-prod", "sub": "u-1234", "iat": now,
              "exp": now + 300, "clinfuse_role": ["compliance"],
              "scope": "clinfuse/audit clinfuse/access-log", **overrides}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def test_hospital_rs256_token_is_accepted(hospital: tuple[TestClient, Any]) -> None:
    client, key = hospital
    response = client.get("/audits", headers=_bearer(_idp_token(key)))
    assert response.status_code == 200, response.text
    entries = client.get("/access-log", headers=_bearer(_idp_token(key))).json()
    assert entries and entries[0]["subject"] == "u-1234" and entries[0]["role"] == "compliance"


def _unsigned(claims: dict[str, Any]) -> str:
    import base64

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def test_bad_tokens_are_401(hospital: tuple[TestClient, Any]) -> None:
    client, key = hospital
    now = int(time.time())
    stranger, _ = _rsa_key(kid="idp-2026", alg="RS256")
    cases = {
        "wrong issuer": _idp_token(key, iss="https://evil.example"),
        "wrong audience": _idp_token(key, aud="someone-else"),
        "expired": _idp_token(key, iat=now - 7200, exp=now - 3600),
        "none alg": _unsigned({"iss": HOSPITAL, "aud": "clinfuse-prod", "sub": "u-1",
                               "iat": now, "exp": now + 300, "clinfuse_role": "admin"}),
        "HS256": _idp_token("a-shared-secret-of-32-bytes-or-more!", alg="HS256"),
        "bad signature": _idp_token(stranger),
        "unknown kid": _idp_token(key, kid="rotated-away"),
        "built-in issuer disabled": jwt.encode(
            {"iss": "urn:clinfuse:builtin-issuer", "aud": "clinfuse-prod", "sub": "x",
             "iat": now, "exp": now + 60, "clinfuse_role": "admin"},
            ec.generate_private_key(ec.SECP384R1()), algorithm="ES384"),
        "garbage": "not-a-jwt",
    }
    for why, token in cases.items():
        response = client.get("/audits", headers=_bearer(token))
        assert response.status_code == 401, (why, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer error=")
    assert client.get("/audits").status_code == 401


def test_wrong_or_missing_role_is_403(hospital: tuple[TestClient, Any]) -> None:
    client, key = hospital
    assert client.get("/audits", headers=_bearer(_idp_token(
        key, clinfuse_role="clinician"))).status_code == 403
    assert client.get("/access-log", headers=_bearer(_idp_token(
        key, clinfuse_role="integration"))).status_code == 403
    assert client.get("/audits", headers=_bearer(_idp_token(
        key, clinfuse_role="superuser"))).status_code == 403
    # Several roles: the broadest one granted applies.
    assert client.get("/audits", headers=_bearer(_idp_token(
        key, clinfuse_role=["clinician", "admin"]))).status_code == 200


def test_password_grant_is_off_outside_the_builtin_issuer(
        hospital: tuple[TestClient, Any]) -> None:
    client, _ = hospital
    response = client.post("/auth/token", data={"grant_type": "password", "username": "a",
                                                "password": "bbbbbbbbb"})
    assert response.status_code == 400 and response.json()["error"] == "unsupported_grant_type"


# -- discovery ---------------------------------------------------------------------------


def test_smart_configuration(client: TestClient) -> None:
    config = client.get("/.well-known/smart-configuration").json()
    assert config["token_endpoint"] == TOKEN_URL
    assert config["jwks_uri"] == "http://testserver/auth/jwks.json"
    assert config["issuer"] == "urn:clinfuse:builtin-issuer"
    assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
    assert set(config["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384",
                                                                              "ES384"}
    assert "client_credentials" in config["grant_types_supported"]
    assert "client-confidential-asymmetric" in config["capabilities"]
    assert "system/*.read" in config["scopes_supported"]
    keys = client.get("/auth/jwks.json").json()["keys"]
    assert len(keys) == 1 and keys[0]["alg"] == "ES384" and "d" not in keys[0]


def test_smart_configuration_names_the_hospital_idp(hospital: tuple[TestClient, Any]) -> None:
    client, _ = hospital
    config = client.get("/.well-known/smart-configuration").json()
    assert config["issuer"] == HOSPITAL
