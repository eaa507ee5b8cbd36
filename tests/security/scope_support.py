"""Helpers for the scope tests: an app on a throwaway SQLite database, tokens, Bundles."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from services.api.routes.fhir_ingest import _BUNDLE_EXAMPLE
from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from services.db import session_scope
from services.tables import FhirResourceRow, PatientRow, PredictionRow

FHIR = {"Content-Type": "application/fhir+json"}


@contextmanager
def scope_client(root: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=f"sqlite:///{root / 'db.sqlite'}", data_dir=root / "data")
    with TestClient(create_app(settings)) as client:
        yield client


def app_of(client: TestClient) -> FastAPI:
    app: FastAPI = client.app  # type: ignore[assignment]
    return app


def token(client: TestClient, role: Role, scope: str, *, patient: str | None = None,
          subject: str | None = None) -> dict[str, str]:
    """A bearer header for ``role`` with exactly ``scope`` (and a launch ``patient``)."""
    extra = {"patient": patient} if patient is not None else None
    issued = app_of(client).state.local_issuer.issue(subject or f"scope-{role.value}", role,
                                                     scope=scope, extra=extra)
    return {"Authorization": f"Bearer {issued}"}


def bundle(mrn: str = "MRN00000001") -> dict[str, Any]:
    """A transaction Bundle with one Patient (``mrn``) and one Observation."""
    data = copy.deepcopy(_BUNDLE_EXAMPLE)
    data["entry"][0]["resource"]["identifier"][0]["value"] = mrn
    data["entry"][1]["resource"]["identifier"][0]["value"] = f"L-{mrn}"
    return data


def store(client: TestClient, mrn: str) -> str:
    """Store a patient with the integration role's full write scope; its opaque id."""
    answer = client.post("/fhir", json=bundle(mrn),
                         headers={**FHIR, **token(client, Role.integration, "system/*.cruds")})
    assert answer.status_code == 200, answer.text
    location = str(answer.json()["entry"][0]["response"]["location"])
    return location.removeprefix("Patient/")


def counts(client: TestClient) -> tuple[int, int, int]:
    """(patients, resources, predictions) stored."""
    with session_scope(app_of(client).state.sessions) as session:
        return tuple(int(session.scalar(select(func.count()).select_from(t)) or 0)  # type: ignore[return-value]
                     for t in (PatientRow, FhirResourceRow, PredictionRow))


def challenge(response: Any) -> str:
    return str(response.headers.get("www-authenticate", ""))
