"""Switching the served model, and rolling it back: verified first, swapped atomically.

An admin names a model artifact; it is verified (signature, hashes, FHIR feature
spec) and loaded *before* anything changes, then the service's reference is
swapped in one assignment, so requests in flight finish on the model they
started with and every prediction records the version that made it. Each switch
is a row in ``model_activations``; the newest row is what the service loads at
its next start, so a rollback survives a restart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.core.config import Settings
from services.prediction import ModelLoadError, PredictionService
from services.tables import ModelActivationRow

__all__ = ["ModelSwitchError", "activate", "active_model_path", "history", "rollback"]

log = logging.getLogger(__name__)


class ModelSwitchError(ValueError):
    """The model cannot be switched; the service keeps serving the current one."""


def history(session: Session, limit: int = 50) -> list[ModelActivationRow]:
    return list(session.scalars(select(ModelActivationRow)
                                .order_by(ModelActivationRow.id.desc()).limit(limit)))


def active_model_path(session: Session, settings: Settings) -> Path | None:
    """The newest activation's artifact, else the configured CLINFUSE_MODEL_PATH."""
    newest = session.scalars(select(ModelActivationRow)
                             .order_by(ModelActivationRow.id.desc()).limit(1)).one_or_none()
    return Path(newest.model_path) if newest is not None else settings.model_path


def _load(app_state: Any, path: Path) -> PredictionService:
    settings: Settings = app_state.settings.model_copy(update={"model_path": path})
    try:
        service = PredictionService.from_settings(settings, app_state.dicom_store)
    except ModelLoadError as exc:
        raise ModelSwitchError(f"not switched: {exc}") from None
    if service is None:  # pragma: no cover - from_settings returns None only without a path
        raise ModelSwitchError("not switched: no model path given")
    return service


def activate(app_state: Any, session: Session, path: Path, *, by: str,
             action: str = "switch", reason: str | None = None) -> ModelActivationRow:
    """Verify and load ``path``, record the activation, then serve it."""
    service = _load(app_state, Path(path))
    row = ModelActivationRow(activated_by=by[:256], model_path=str(path),
                             model_name=service.model_name, model_version=service.model_version,
                             action=action, reason=(reason or None))
    session.add(row)
    session.flush()
    service.start_warm_up()
    # One reference assignment: in-flight requests keep the model they started with.
    app_state.predictions = service
    log.info("model %s: now serving %s %s", action, service.model_name, service.model_version)
    return row


def rollback(app_state: Any, session: Session, *, by: str, reason: str | None = None
             ) -> ModelActivationRow:
    """Serve again the model that was active before the current one."""
    rows = history(session, limit=2)
    if not rows:
        raise ModelSwitchError("nothing to roll back: the configured model has never been "
                               "switched")
    previous = Path(rows[1].model_path) if len(rows) > 1 else app_state.settings.model_path
    if previous is None:
        raise ModelSwitchError("nothing to roll back to: no model was served before")
    return activate(app_state, session, previous, by=by, action="rollback", reason=reason)
