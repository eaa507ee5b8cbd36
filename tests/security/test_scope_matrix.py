"""The scope matrix: every route of the app, its declared role and scope, the docs table.

Every route is enumerated from ``app.routes``, so a new route that declares nothing
fails here. For each API route and each role it admits: no scopes -> 403, wrong
scopes (other types, other letters, other clinfuse scopes) -> 403, its declared
scopes -> past authorization. ``patient/`` scopes: the launch patient only, and only
where the route is about one patient. Dashboard pages are checked through their
table (services.dashboard.access). docs/security.md's table must say what the app
enforces, row for row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import Request

from services.api.deps import Requirement
from services.auth.principal import Principal, Role
from services.auth.scopes import CLINFUSE_SCOPES, INTERACTIONS, Need
from services.dashboard.access import PAGES, PUBLIC_PAGES, enforce
from tests.security.scope_support import FHIR, app_of, bundle, challenge, scope_client, token
from tests.services.service_support import iter_routes
from tests.services.test_authorization_matrix import MATRIX, PUBLIC

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
SECTION = "## Routes, roles and scopes"
#: Signed-in pages that show no patient data and need no scope (the role's home, the
#: model card); anything else that declares an empty scope fails.
NO_SCOPE = {("GET", "/dashboard"), ("GET", "/dashboard/"), ("GET", "/dashboard/model-card")}
ROLE_ORDER = [Role.integration, Role.clinician, Role.compliance, Role.admin]
PLACEHOLDER = "x1"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with scope_client(tmp_path_factory.mktemp("scope-matrix")) as test_client:
        yield test_client


def _requirements(route: Any) -> list[Requirement]:
    found: list[Requirement] = []

    def walk(dependant: Any) -> None:
        for sub in dependant.dependencies:
            requirement = getattr(sub.call, "requirement", None)
            if isinstance(requirement, Requirement):
                found.append(requirement)
            walk(sub)

    dependant = getattr(route, "dependant", None)
    if dependant is not None:
        walk(dependant)
    return found


def declared(app: FastAPI) -> tuple[dict[tuple[str, str], Requirement | None],
                                    list[tuple[str, str]]]:
    """(method, path) -> the route's requirement (None: public), and the routes that
    decide nothing."""
    out: dict[tuple[str, str], Requirement | None] = {}
    undecided = []
    for method, path, route in iter_routes(app):
        key = (method, path)
        if path.startswith("/dashboard"):
            if key in PUBLIC_PAGES:
                out[key] = None
            elif key in PAGES:
                out[key] = PAGES[key]
            else:
                undecided.append(key)
            continue
        found = _requirements(route)
        if len(found) == 1:
            out[key] = found[0]
        elif not found and MATRIX.get(key) == PUBLIC:
            out[key] = None
        else:
            undecided.append(key)
    return out, undecided


API_ROUTES = sorted(k for k, v in MATRIX.items() if v != PUBLIC)
PAGE_KEYS = sorted(PAGES)


def test_every_route_declares_role_and_scope(client: TestClient) -> None:
    routes, undecided = declared(app_of(client))
    assert not undecided, f"routes that declare no role and scope (require(..., scope=...)" \
                          f", or services/dashboard/access.py for pages): {undecided}"
    served = set(routes) | set(undecided)
    stale = sorted((set(PAGES) | PUBLIC_PAGES) - served)
    assert not stale, f"dashboard access rows for pages that no longer exist: {stale}"
    for key, requirement in routes.items():
        if requirement is None:
            continue
        if not key[1].startswith("/dashboard"):
            assert requirement.roles == MATRIX[key], \
                f"{key}: require() admits {sorted(requirement.roles)}, the authorization " \
                f"matrix says {sorted(MATRIX[key])}"  # type: ignore[arg-type]
        empty = not requirement.scope.resources and not requirement.scope.custom and \
            not requirement.scope.body
        assert not empty or key in NO_SCOPE, f"{key} declares no scope"


# -- tokens for a need ------------------------------------------------------------------


def _complement(letters: str) -> str:
    return "".join(c for c in INTERACTIONS if c not in letters)


def right_scopes(need: Need, context: str = "user") -> str:
    scopes = [f"{context}/{t}.{letters}" for t, letters in need.resources]
    if need.body:
        scopes.append(f"{context}/*.{need.body}")
    return " ".join(scopes + list(need.custom))


def wrong_scopes(need: Need) -> str:
    """Everything near the need but not it: other types, the other letters, the other
    clinfuse scopes, and the right scopes restricted by a query."""
    scopes = ["user/Basic.cruds", "openid", "fhirUser"]
    scopes += [f"user/{t}.{_complement(letters)}" for t, letters in need.resources
               if _complement(letters)]
    scopes += [f"user/{t}.{letters}?_id=1" for t, letters in need.resources]
    if need.body and _complement(need.body):
        scopes.append(f"user/*.{_complement(need.body)}")
    scopes += [c for c in CLINFUSE_SCOPES if c not in need.custom]
    return " ".join(scopes)


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", PLACEHOLDER, path)


def _ndjson() -> str:
    entries = bundle("MRN-MATRIX-NDJSON")["entry"]
    patient, observation = (dict(e["resource"]) for e in entries)
    patient["id"], observation["subject"] = "p1", {"reference": "Patient/p1"}
    return "\n".join(json.dumps(r) for r in (patient, observation)) + "\n"


def _body(path: str, need: Need) -> dict[str, Any]:
    """A body whose types are checked, for routes that need scopes on the body's types."""
    if not need.body:
        return {}
    if path == "/fhir":
        return {"json": bundle("MRN-MATRIX"), "headers": FHIR}
    assert path == "/fhir/$import", f"{path} needs scopes on its body: give a sample body"
    return {"content": _ndjson(), "headers": {"Content-Type": "application/fhir+ndjson"}}


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
def test_api_route_needs_its_scopes(client: TestClient, method: str, path: str) -> None:
    requirement = declared(app_of(client))[0].get((method, path))
    assert requirement is not None, f"{method} {path} declares no role and scope"
    need, url = requirement.scope, _url(path)
    body = _body(path, need)

    def call(headers: dict[str, str]) -> Any:
        return client.request(method, url, **{**body, "headers": {
            **body.get("headers", {}), **headers}})

    for role in requirement.roles:
        for label, scope in (("no scope", ""), ("wrong scopes", wrong_scopes(need))):
            answer = call(token(client, role, scope))
            assert answer.status_code == 403, f"{method} {path} as {role.value} with " \
                                              f"{label}: {answer.status_code}"
            assert 'error="insufficient_scope"' in challenge(answer)
        answer = call(token(client, role, right_scopes(need)))
        assert answer.status_code not in (401, 403), \
            f"{method} {path} as {role.value} with {right_scopes(need)!r}: {answer.text}"
        # A patient/ token with the same rights, for the patient in the URL.
        launched = token(client, role, right_scopes(need, "patient"), patient=PLACEHOLDER)
        answer = call(launched)
        if not need.resources and not need.body:
            continue  # clinfuse scopes have no context: nothing patient/ could narrow
        if need.patient is None:
            assert answer.status_code == 403, f"{method} {path}: a patient/ token passed"
        elif need.patient != Need.ROUTE:
            assert answer.status_code not in (401, 403), f"{method} {path}: {answer.text}"
            other = token(client, role, right_scopes(need, "patient"), patient="x2")
            assert call(other).status_code == 403


def _page_request(app: FastAPI, method: str, path: str) -> Request:
    route = next(r for m, p, r in iter_routes(app) if (m, p) == (method, path))
    params = {name: PLACEHOLDER for name in re.findall(r"\{([^}]+)\}", path)}
    return Request({"type": "http", "method": method, "path": _url(path), "headers": [],
                    "query_string": b"", "route": route, "path_params": params})


@pytest.mark.parametrize(("method", "path"), PAGE_KEYS)
def test_dashboard_page_needs_its_scopes(client: TestClient, method: str, path: str) -> None:
    app = app_of(client)
    requirement = PAGES[(method, path)]
    need = requirement.scope

    def refusal(role: Role, scope: str, patient: str | None = None) -> str | None:
        return enforce(_page_request(app, method, path), Principal(
            subject="page-test", role=role, scopes=frozenset(scope.split()), patient=patient))

    for role in Role:
        if role not in requirement.roles:
            assert refusal(role, right_scopes(need)) is not None
            continue
        assert refusal(role, right_scopes(need)) is None, (path, role)
        if (method, path) in NO_SCOPE:
            continue
        assert refusal(role, "") is not None and refusal(role, wrong_scopes(need)) is not None
        if not need.resources:
            continue  # clinfuse scopes have no context: nothing patient/ could narrow
        if need.patient is None:
            assert refusal(role, right_scopes(need, "patient"), PLACEHOLDER) is not None
        else:
            assert refusal(role, right_scopes(need, "patient"), PLACEHOLDER) is None
            assert refusal(role, right_scopes(need, "patient"), "x2") is not None


# -- the published table -------------------------------------------------------------------


def _roles_cell(requirement: Requirement | None) -> str:
    if requirement is None:
        return "public"
    if requirement.roles == frozenset(Role):
        return "any (signed in)"
    return ", ".join(r.value for r in ROLE_ORDER if r in requirement.roles)


def _scopes_cell(requirement: Requirement | None) -> str:
    text = requirement.scope.describe() if requirement is not None else ""
    return " ".join(f"`{s}`" for s in text.split()) or "—"


def _patient_cell(requirement: Requirement | None) -> str:
    patient = requirement.scope.patient if requirement is not None else None
    if patient is None:
        return "—"
    return "checked by the route" if patient == Need.ROUTE else f"`{{{patient}}}`"


def _doc_rows() -> dict[tuple[str, str], tuple[str, str, str]]:
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, str], tuple[str, str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            key = (cells[0], cells[1].strip("`"))
            assert key not in rows, f"{DOC}: {key} is listed twice"
            rows[key] = (cells[2], cells[3], cells[4])
    return rows


def test_docs_table_says_what_the_app_enforces(client: TestClient) -> None:
    rows = _doc_rows()
    expected = {key: (_roles_cell(r), _scopes_cell(r), _patient_cell(r))
                for key, r in declared(app_of(client))[0].items()}
    missing = sorted(set(expected) - set(rows))
    assert not missing, f"routes missing from {DOC.name}'s table: {missing}"
    stale = sorted(set(rows) - set(expected))
    assert not stale, f"{DOC.name} lists routes the app does not serve: {stale}"
    wrong = {key: {"docs": rows[key], "app": expected[key]} for key in expected
             if rows[key] != expected[key]}
    assert not wrong, f"{DOC.name}'s table differs from the app: {wrong}"
