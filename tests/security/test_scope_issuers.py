"""Issue 19, finding 6: every issuer of the project gives each role the scopes its routes
need (services.auth.scopes.ROLE_SCOPES), and no more than the role may have.

The demo's password grant, SMART Backend Services client credentials and the
authorization code of the SMART launch, each end to end over HTTP.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from services.app import create_app
from services.auth import smart_launch
from services.auth.backend_services import JWT_BEARER, register_client
from services.auth.principal import Role
from services.auth.scopes import default_scopes
from services.core.config import Settings
from services.db import session_scope
from services.tables import UserRow
from tests.security.scope_support import FHIR, app_of, bundle

BASE = "https://testserver"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("issuers")
    settings = Settings(database_url=f"sqlite:///{root / 'db.sqlite'}", data_dir=root / "data",
                        environment="demo", public_base_url=BASE)
    with TestClient(create_app(settings), base_url=BASE) as test_client:
        # Cheap argon2 parameters keep the test fast; a hash carries its own parameters,
        # so the service verifies it as it would a real one.
        cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
        with session_scope(app_of(test_client).state.sessions) as session:
            for role in Role:
                session.add(UserRow(username=f"user-{role.value}", password_hash=cheap,
                                    role=role.value))
        yield test_client


def _scope_of(access_token: str) -> list[str]:
    return str(jwt.decode(access_token, options={"verify_signature": False})["scope"]).split()


def _bearer(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}"}


@pytest.mark.parametrize("role", list(Role))
def test_password_grant_gives_the_roles_defaults(client: TestClient, role: Role) -> None:
    answer = client.post("/auth/token", data={"grant_type": "password",
                                              "username": f"user-{role.value}",
                                              "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    assert _scope_of(token) == ["openid", "fhirUser",
                                *default_scopes(role, system=False).split()]
    # ... and they are enough for the role's own routes.
    routes = {Role.integration: ("POST", "/fhir"), Role.clinician: ("GET", "/dicomweb/studies"),
              Role.compliance: ("GET", "/access-log"), Role.admin: ("GET", "/admin/models")}
    method, path = routes[role]
    kwargs: dict[str, Any] = {"json": bundle(f"MRN-PW-{role.value}"), "headers": {
        **FHIR, **_bearer(token)}} if method == "POST" else {"headers": _bearer(token)}
    assert client.request(method, path, **kwargs).status_code == 200


def _assertion(key: Any, client_id: str) -> str:
    now = int(time.time())
    return jwt.encode({"iss": client_id, "sub": client_id, "aud": f"{BASE}/auth/token",
                       "exp": now + 120, "jti": uuid.uuid4().hex}, key, algorithm="ES384",
                      headers={"kid": "k1"})


def test_backend_client_gets_its_roles_defaults_or_what_it_asks(client: TestClient) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    with session_scope(app_of(client).state.sessions) as session:
        row = register_client(session, "lab-engine", {"keys": [
            {**jwk, "kid": "k1", "alg": "ES384"}]}, Role.integration)
        assert row.scope == default_scopes(Role.integration, system=True)

    def grant(scope: str) -> Any:
        return client.post("/auth/token", data={
            "grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": _assertion(key, "lab-engine")})

    everything = grant("")
    assert everything.status_code == 200, everything.text
    token = everything.json()["access_token"]
    assert _scope_of(token) == default_scopes(Role.integration, system=True).split()
    assert client.post("/fhir", json=bundle("MRN-ENGINE-1"),
                       headers={**FHIR, **_bearer(token)}).status_code == 200
    # A narrower v2 (or v1) scope is covered by system/*.crus; a broader one is not.
    narrow = grant("system/Observation.rs system/*.read system/*.cruds")
    assert narrow.status_code == 200, narrow.text
    assert narrow.json()["scope"] == "system/Observation.rs system/*.read"
    assert client.post("/fhir", json=bundle("MRN-ENGINE-2"), headers={
        **FHIR, **_bearer(narrow.json()["access_token"])}).status_code == 403


def _code_flow(client: TestClient, username: str, scope: str) -> Any:
    verifier = smart_launch.new_code_verifier()
    fields = {"response_type": "code", "client_id": smart_launch.DASHBOARD_CLIENT_ID,
              "redirect_uri": f"{BASE}/dashboard/callback", "state": "s-1", "scope": scope,
              "code_challenge": smart_launch.code_challenge(verifier),
              "code_challenge_method": "S256", "aud": f"{BASE}/fhir"}
    page = client.get("/auth/authorize", params=fields)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found is not None
    answer = client.post("/auth/authorize", data={
        **fields, "csrf": found.group(1), "username": username, "password": PASSWORD,
        "decision": "allow"}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    code = parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]
    return client.post("/auth/token", data={
        "grant_type": "authorization_code", "code": code,
        "redirect_uri": fields["redirect_uri"], "client_id": smart_launch.DASHBOARD_CLIENT_ID,
        "code_verifier": verifier})


def test_authorization_code_grants_what_was_asked_within_the_role(client: TestClient) -> None:
    clinician = _code_flow(client, "user-clinician", "openid fhirUser user/*.rs user/*.cruds "
                                                     "clinfuse/admin clinfuse/feedback")
    assert clinician.status_code == 200, clinician.text
    assert clinician.json()["scope"] == "openid fhirUser user/*.rs clinfuse/feedback"
    assert _scope_of(clinician.json()["access_token"]) == clinician.json()["scope"].split()
    officer = _code_flow(client, "user-compliance", "openid clinfuse/audit user/*.rs")
    assert officer.status_code == 200, officer.text
    assert officer.json()["scope"] == "openid clinfuse/audit"
    assert client.get("/audits", headers=_bearer(officer.json()["access_token"])
                      ).status_code == 200
