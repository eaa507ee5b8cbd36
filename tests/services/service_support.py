"""Helpers for tests that call the running service."""

from __future__ import annotations

from fastapi import FastAPI

from services.auth.principal import Role


def bearer(app: FastAPI, role: Role, subject: str | None = None) -> dict[str, str]:
    """An Authorization header with a token from the app's built-in issuer."""
    token = app.state.local_issuer.issue(subject or f"test-{role.value}", role)
    return {"Authorization": f"Bearer {token}"}
