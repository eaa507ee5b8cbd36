"""Liveness, readiness and Prometheus metrics (no patient data; no token needed)."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

router = APIRouter(tags=["Operations"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail}


@router.get("/readyz", summary="Readiness: database, model, storage and job queue",
            responses={503: {"description": "a dependency is not ready"}})
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    settings = state.settings
    checks = []
    try:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks.append(_check("database", True, state.engine.dialect.name))
    except Exception as exc:  # any driver error means "not ready", never a crash
        checks.append(_check("database", False, type(exc).__name__))
    predictions = getattr(state, "predictions", None)
    if settings.model_path is None:
        checks.append(_check("model", True, "no model configured: predictions disabled"))
    else:
        loaded = predictions is not None
        checks.append(_check("model", loaded, "loaded" if loaded else "not loaded"))
    storage = settings.dicom_storage_dir
    writable = storage.is_dir() and os.access(storage, os.W_OK)
    checks.append(_check("storage", writable, "writable" if writable else "not writable"))
    worker = getattr(state, "jobs", None)
    if worker is None:
        checks.append(_check("job_queue", True, "no worker in this process"))
    else:
        alive = bool(getattr(worker, "is_alive", lambda: False)())
        checks.append(_check("job_queue", alive, "worker running" if alive else "worker stopped"))
    ready = all(c["ok"] for c in checks)
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")
