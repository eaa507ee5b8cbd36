"""Fairness audits over stored predictions: run, list, get (JSON, HTML, PDF), compare.

For the compliance and admin roles. Audits are aggregates: no route here returns a
patient id or value; groups under the minimum size show only "insufficient data".
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from fhir_adapters.record import ensure_utc
from services import audit_service
from services.api.deps import MAX_OFFSET, SessionDep, SettingsDep, require
from services.audit_service import AuditParams, AuditServiceError
from services.auth.principal import Principal, Role
from services.auth.scopes import Need
from services.cohort_export import BUILTIN_OUTCOMES, OutcomeDefinition
from services.core.config import Settings
from services.tables import AuditRow

router = APIRouter(prefix="/audits", tags=["Audits"],
                   responses={401: {"description": "no valid bearer token"},
                              403: {"description": "only compliance and admin may use audits"}})
AUDITOR = require(Role.compliance, scope=Need.of("clinfuse/audit"))
Auditor = Annotated[Principal, AUDITOR]

_EXAMPLE_WINDOW = {"window_start": "2026-10-01T00:00:00Z", "window_end": "2026-11-01T00:00:00Z"}


class AuditRunRequest(BaseModel):
    """What to audit; everything but the window has a default."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {**_EXAMPLE_WINDOW, "model_version": "1.0.0", "sensitive": ["sex", "race"],
         "outcome": "deterioration", "n_boot": 1000}]})

    window_start: datetime | None = Field(None, description="predictions with an index time "
                                          "at or after this (ISO 8601; UTC if no offset)")
    window_end: datetime | None = Field(None, description="... and before this; default now")
    model_version: str | None = Field(None, max_length=64, description="required when the "
                                      "window holds predictions of several versions")
    sensitive: list[str] | None = Field(None, max_length=8, description="attributes recorded "
                                        "with the predictions; default sex, race, ethnicity, "
                                        "age_band (those present)")
    threshold: float | None = Field(None, gt=0, le=1, description="decision threshold; "
                                    "default the predictions' own `decision` threshold")
    decision: str = Field("high_risk", max_length=64,
                          description="which of the model's decision thresholds to audit")
    outcome: str | dict[str, Any] | None = Field(
        None, description=f"the outcome that labels the predictions: a name "
                          f"({', '.join(sorted(BUILTIN_OUTCOMES))}) or a definition "
                          "(name, definition, horizon_days, coding); default the served "
                          "model's own")
    follow_up_until: datetime | None = Field(None, description="records are complete up to "
                                             "this time; default now")
    min_group_size: int = Field(30, ge=5, le=10_000)
    n_boot: int = Field(1000, ge=50, le=5000)
    multiplicity: Literal["bh", "holm"] = "bh"


class AuditSummary(BaseModel):
    """One stored audit, without its full report."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f2c9e0a5b7d4e1f8a6c2b9d0e4f7a1c", "created_at": "2026-11-26T10:00:00Z",
        "run_by": "compliance-officer", "model_version": "1.0.0", **_EXAMPLE_WINDOW,
        "data_fingerprint": "9b1d...", "n_rows": 412, "n_patients": 412, "n_flags": 1,
        "summary": ["412 scored encounters ...", "- race = Black: TPR lower ..."]}]})

    id: str
    created_at: datetime
    run_by: str
    model_version: str | None
    window_start: datetime | None
    window_end: datetime | None
    data_fingerprint: str
    n_rows: int | None
    n_patients: int | None
    n_flags: int
    summary: list[str]

    @classmethod
    def of(cls, row: AuditRow) -> AuditSummary:
        results = row.report.get("results", {}) if isinstance(row.report, dict) else {}
        flags = [d for d in results.get("disparities", []) if d.get("flagged")]
        return cls(id=row.id, created_at=ensure_utc(row.created_at), run_by=row.run_by,
                   model_version=row.model_version, window_start=_utc(row.window_start),
                   window_end=_utc(row.window_end), data_fingerprint=row.data_fingerprint,
                   n_rows=results.get("n_rows"), n_patients=results.get("n_patients"),
                   n_flags=len(flags), summary=list(row.report.get("summary", [])))


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else ensure_utc(value)


def _fail(exc: AuditServiceError) -> HTTPException:
    return HTTPException(exc.status, str(exc))


def _model_outcome(request: Request, settings: Settings) -> dict[str, Any] | None:
    """The served model's outcome definition, from its artifact's config."""
    service = getattr(request.app.state, "predictions", None)
    outcome = getattr(service, "outcome", None)
    if isinstance(outcome, dict) and outcome:
        return dict(outcome)
    for holder in (service, getattr(service, "artifact", None), getattr(service, "model", None)):
        config = getattr(holder, "config", None)
        if isinstance(config, dict) and isinstance(config.get("outcome"), dict):
            return dict(config["outcome"])
    if settings.model_path is not None:
        path = Path(settings.model_path) / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(config, dict) and isinstance(config.get("outcome"), dict):
            return dict(config["outcome"])
    return None


@router.post("", summary="Run a fairness audit over stored predictions", status_code=201,
             response_model=AuditSummary,
             responses={409: {"description": "predictions exist but none has a known "
                                             "outcome yet"},
                        422: {"description": "no predictions in the window, several model "
                                             "versions, unknown attributes or outcome"}})
def run_audit(request: Request, body: AuditRunRequest, session: SessionDep,
              settings: SettingsDep, principal: Auditor) -> AuditSummary:
    request.state.access_action = "audit"  # reads records for labels; reports aggregates
    outcome_config = body.outcome if body.outcome is not None else _model_outcome(request,
                                                                                  settings)
    if outcome_config is None:
        raise HTTPException(422, "no outcome definition: the served model states none; pass "
                                 f"outcome (one of {sorted(BUILTIN_OUTCOMES)} or a definition)")
    try:
        outcome = OutcomeDefinition.from_config(outcome_config)
    except ValueError as exc:
        raise HTTPException(422, f"outcome: {exc}") from None
    params = AuditParams(outcome=outcome, window_start=body.window_start,
                         window_end=body.window_end, model_version=body.model_version,
                         sensitive=body.sensitive, threshold=body.threshold,
                         decision=body.decision, min_group_size=body.min_group_size,
                         n_boot=body.n_boot, multiplicity=body.multiplicity,
                         follow_up_until=body.follow_up_until)
    try:
        row = audit_service.run_audit(session, params, run_by=principal.subject)
    except AuditServiceError as exc:
        raise _fail(exc) from None
    # Commit before answering: SessionDep's own commit runs after the response is sent
    # (and after the access-log middleware, whose SQLite write would wait on ours), so a
    # 201 must not precede a commit that could still fail.
    session.commit()
    return AuditSummary.of(row)


@router.get("", summary="List stored audits, newest first", response_model=list[AuditSummary])
def list_audits(session: SessionDep, _: Auditor,
                limit: Annotated[int, Query(ge=1, le=500)] = 100,
                offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> list[AuditSummary]:
    return [AuditSummary.of(r) for r in audit_service.list_audits(session, limit=limit,
                                                                  offset=offset)]


@router.get("/compare", summary="What changed between two audits",
            responses={200: {"content": {"application/json": {"example": {
                "before": "3f2c...", "after": "8a1b...",
                "provenance": {"data_window": {"before": {}, "after": {}}},
                "flags_raised": [], "flags_cleared": [], "flags_kept": [],
                "metric_changes": []}}}},
                404: {"description": "unknown audit"}})
def compare(session: SessionDep, _: Auditor,
            a: Annotated[str, Query(max_length=64, description="the earlier audit's id")],
            b: Annotated[str, Query(max_length=64, description="the later audit's id")]
            ) -> dict[str, Any]:
    try:
        return audit_service.compare_audits(session, a, b)
    except AuditServiceError as exc:
        raise _fail(exc) from None


_MEDIA = {"json": "application/json", "html": "text/html; charset=utf-8",
          "pdf": "application/pdf"}


@router.get("/{audit_id}", summary="One audit: its JSON report, HTML or PDF",
            response_class=Response,
            responses={200: {"description": "the report in the asked format",
                             "content": {"application/json": {"example": {
                                 "schema": "clinfuse.audit/1", "audit_id": "3f2c...",
                                 "summary": ["..."], "results": {}}},
                                 "text/html": {}, "application/pdf": {}}},
                       404: {"description": "unknown audit"}})
def get_audit(session: SessionDep, _: Auditor, audit_id: str,
              format: Annotated[Literal["json", "html", "pdf"],
                                Query(description="json (default), html or pdf")] = "json"
              ) -> Response:
    try:
        row = audit_service.get_audit(session, audit_id)
    except AuditServiceError as exc:
        raise _fail(exc) from None
    if format == "html":
        return HTMLResponse(row.html)
    if format == "pdf":
        return Response(row.pdf, media_type=_MEDIA["pdf"], headers={
            "Content-Disposition": f'inline; filename="audit-{row.id}.pdf"'})
    return JSONResponse(row.report)
