"""Admin: which model the service serves; switch and roll back (admin only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from services import model_registry
from services.api.deps import PrincipalDep, SessionDep, require
from services.auth.principal import Role
from services.auth.scopes import Need
from services.tables import ModelActivationRow

router = APIRouter(prefix="/admin", tags=["Admin"],
                   dependencies=[require(Role.admin, scope=Need.of("clinfuse/admin"))],
                   responses={401: {"description": "no valid bearer token"},
                              403: {"description": "only admins may change the model"}})


class ModelSwitch(BaseModel):
    """A signed model artifact to serve (a directory path on the server)."""

    path: str = Field(min_length=1, max_length=1024,
                      examples=["/var/lib/clinfuse/models/clinfuse-late-fusion-1.1.0"])
    reason: str | None = Field(default=None, max_length=1000,
                               examples=["quarterly retrain validated by the site"])


class ModelRollback(BaseModel):
    reason: str | None = Field(default=None, max_length=1000,
                               examples=["calibration drift seen in the last audit"])


def _row(row: ModelActivationRow) -> dict[str, Any]:
    return {"activated_at": row.activated_at.isoformat(), "activated_by": row.activated_by,
            "model_name": row.model_name, "model_version": row.model_version,
            "model_path": row.model_path, "action": row.action, "reason": row.reason}


@router.get("/models", summary="The served model and the switch/rollback history")
def models(request: Request, session: SessionDep) -> dict[str, Any]:
    service = getattr(request.app.state, "predictions", None)
    current = None if service is None else {
        "model_name": service.model_name, "model_version": service.model_version}
    return {"serving": current,
            "configured_path": str(request.app.state.settings.model_path or "") or None,
            "history": [_row(r) for r in model_registry.history(session)]}


@router.post("/models/activate", summary="Verify a model artifact and serve it",
             responses={422: {"description": "the artifact failed verification; the current "
                                             "model keeps serving"}})
def activate(body: ModelSwitch, request: Request, session: SessionDep,
             principal: PrincipalDep) -> dict[str, Any]:
    try:
        row = model_registry.activate(request.app.state, session, Path(body.path),
                                      by=principal.subject, reason=body.reason)
    except model_registry.ModelSwitchError as exc:
        raise HTTPException(422, str(exc)) from None
    return _row(row)


@router.post("/models/rollback", summary="Serve again the model that was active before",
             responses={409: {"description": "there is nothing to roll back to"},
                        422: {"description": "the previous artifact no longer verifies"}})
def rollback(body: ModelRollback, request: Request, session: SessionDep,
             principal: PrincipalDep) -> dict[str, Any]:
    try:
        row = model_registry.rollback(request.app.state, session, by=principal.subject,
                                      reason=body.reason)
    except model_registry.ModelSwitchError as exc:
        status = 409 if "nothing" in str(exc) else 422
        raise HTTPException(status, str(exc)) from None
    return _row(row)
