"""Helpers for tests that call the running service."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from services.auth.principal import Role
from services.auth.scopes import default_scopes


def bearer(app: FastAPI, role: Role, subject: str | None = None,
           scope: str | None = None) -> dict[str, str]:
    """An Authorization header with a token from the app's built-in issuer; ``scope``:
    default the role's own (what every issuer of the project gives it)."""
    token = app.state.local_issuer.issue(
        subject or f"test-{role.value}", role,
        scope=default_scopes(role, system=False) if scope is None else scope)
    return {"Authorization": f"Bearer {token}"}


def iter_routes(app: FastAPI) -> list[tuple[str, str, Any]]:
    """Every (method, path, route) the app serves, included routers flattened.

    FastAPI 0.165 keeps included routers as lazy ``_IncludedRouter`` entries in
    ``app.routes``; their ``effective_candidates`` are the routes with full paths.
    """
    out: list[tuple[str, str, Any]] = []
    for route in app.routes:
        candidates = getattr(route, "effective_candidates", None)
        items = (candidates() if callable(candidates) else candidates) if candidates is not None \
            else [route]
        for item in items:
            path = getattr(item, "path", None)
            original = getattr(item, "original_route", item)
            for method in sorted(getattr(item, "methods", None) or []):
                if method != "HEAD" and path is not None:
                    out.append((method, str(path), original))
    return out
