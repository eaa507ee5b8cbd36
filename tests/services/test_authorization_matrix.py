"""The authorization matrix, written by hand: every route x every role -> allow or deny.

A second test fails when the app serves a route that is missing here, so a new
route cannot ship without someone deciding who may call it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from tests.services.service_support import bearer, iter_routes

ING, CLIN, COMP, ADM = Role.integration, Role.clinician, Role.compliance, Role.admin
PUBLIC = "public"
#: Dashboard pages authenticate with the session cookie and answer with pages and
#: redirects, not 401/403 JSON; tests/dashboard checks their roles in a real browser.
COOKIE = "cookie"

MATRIX: dict[tuple[str, str], str | frozenset[Role]] = {
    # documentation and operations: no patient data
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    # OAuth: how a caller gets a token in the first place
    ("POST", "/auth/token"): PUBLIC,
    ("GET", "/auth/authorize"): PUBLIC,
    ("POST", "/auth/authorize"): PUBLIC,
    ("GET", "/auth/jwks.json"): PUBLIC,
    ("GET", "/.well-known/smart-configuration"): PUBLIC,
    ("GET", "/fhir/metadata"): PUBLIC,
    # imaging: integration engines send, clinicians and engines read
    ("POST", "/dicomweb/studies"): frozenset({ING, ADM}),
    ("POST", "/dicomweb/studies/{study}"): frozenset({ING, ADM}),
    ("GET", "/dicomweb/studies"): frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/series"): frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/instances"): frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/studies/{study}/series"): frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances"): frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/studies/{study}"): frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/studies/{study}/series/{series}"): frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}"):
        frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/studies/{study}/metadata"): frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/studies/{study}/series/{series}/metadata"): frozenset({ING, CLIN, ADM}),
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}/metadata"):
        frozenset({ING, CLIN, ADM}),
    # FHIR and HL7 v2 data in: integration only
    ("POST", "/fhir"): frozenset({ING, ADM}),
    ("POST", "/fhir/$import"): frozenset({ING, ADM}),
    ("POST", "/hl7v2"): frozenset({ING, ADM}),
    ("GET", "/fhir/Patient/{id}"): frozenset({ING, CLIN, ADM}),
    # predictions: one patient's data, never compliance
    ("POST", "/fhir/Patient/{patient_id}/$predict"): frozenset({ING, CLIN, ADM}),
    ("POST", "/fhir/$predict"): frozenset({ING, CLIN, ADM}),
    ("GET", "/fhir/RiskAssessment"): frozenset({ING, CLIN, ADM}),
    ("GET", "/predictions/{prediction_id}"): frozenset({ING, CLIN, ADM}),
    # CDS Hooks: the EHR calls hooks; feedback comes from the EHR or a clinician
    ("GET", "/cds-services"): frozenset({ING, CLIN, ADM}),
    ("POST", "/cds-services/{service_id}"): frozenset({ING, ADM}),
    ("POST", "/cds-services/{service_id}/feedback"): frozenset({ING, CLIN, ADM}),
    # compliance: aggregates, reports and the (pseudonymised) access log
    ("POST", "/audits"): frozenset({COMP, ADM}),
    ("GET", "/audits"): frozenset({COMP, ADM}),
    ("GET", "/audits/compare"): frozenset({COMP, ADM}),
    ("GET", "/audits/{audit_id}"): frozenset({COMP, ADM}),
    ("GET", "/access-log"): frozenset({COMP, ADM}),
    ("GET", "/access-log/verify"): frozenset({COMP, ADM}),
    # the served model: admins only
    ("GET", "/admin/models"): frozenset({ADM}),
    ("POST", "/admin/models/activate"): frozenset({ADM}),
    ("POST", "/admin/models/rollback"): frozenset({ADM}),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root: Path = tmp_path_factory.mktemp("matrix")
    settings = Settings(database_url=f"sqlite:///{root / 'db.sqlite'}", data_dir=root / "data")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _served(client: TestClient) -> set[tuple[str, str]]:
    return {(m, p) for m, p, _ in iter_routes(client.app)}  # type: ignore[arg-type]


def _url(path: str) -> str:
    # Opaque placeholders: the route's own 404/422 is fine, only 401/403 matter here.
    return re.sub(r"\{[^}]+\}", "x1", path)


def test_every_served_route_is_in_the_matrix(client: TestClient) -> None:
    served = _served(client)
    dashboard = {r for r in served if r[1].startswith("/dashboard")}
    missing = sorted(served - set(MATRIX) - dashboard)
    assert not missing, f"routes without an authorization decision: {missing}"
    stale = sorted(set(MATRIX) - served)
    assert not stale, f"matrix rows for routes that no longer exist: {stale}"


@pytest.mark.parametrize(("method", "path"), sorted(MATRIX))
def test_route_admits_exactly_its_roles(client: TestClient, method: str, path: str) -> None:
    allowed = MATRIX[(method, path)]
    url = _url(path)
    anonymous = client.request(method, url)
    if allowed == PUBLIC:
        # A public form may still refuse a request without its CSRF token (403), but it
        # never asks for a bearer token.
        assert anonymous.status_code != 401, anonymous.text
        return
    assert anonymous.status_code == 401, f"{method} {path} without a token: " \
                                         f"{anonymous.status_code}"
    assert "Bearer" in anonymous.headers.get("www-authenticate", "")
    for role in Role:
        response = client.request(method, url, headers=bearer(client.app, role))  # type: ignore[arg-type]
        # 503 is the documented answer of prediction routes on a server with no model.
        assert response.status_code < 500 or response.status_code == 503, \
            f"{method} {path} as {role}: {response.text}"
        if role in allowed:
            assert response.status_code not in (401, 403), \
                f"{method} {path} must admit {role.value}: {response.status_code}"
        else:
            assert response.status_code == 403, \
                f"{method} {path} must refuse {role.value}: {response.status_code}"
