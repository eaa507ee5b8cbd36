"""Compliance views: audits (list, run, report, compare, downloads) and the access log.

Compliance users see aggregates only: audit reports (which suppress small cells
themselves) and the access log with every patient reference pseudonymised. The
audits are run and read through :mod:`services.audit_service`, the same code as the
``/audits`` API.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select

from services import audit_service
from services.access_log import pseudonym, verify_chain
from services.api.deps import SessionDep
from services.api.routes.access_log import pseudonym_secret
from services.api.routes.audits import _model_outcome
from services.auth.principal import Role
from services.cohort_export import OutcomeDefinition
from services.dashboard.web import (
    DashboardError,
    DashboardRoute,
    UserDep,
    check_csrf,
    render,
    require_roles,
)
from services.tables import AccessLogRow, AuditRow

# Its own prefix, included by the app directly: the access log records a route's own path,
# so a router nested in another would be logged without the outer prefix ("/audits").
router = APIRouter(prefix="/dashboard", route_class=DashboardRoute, include_in_schema=False)

ATTRIBUTES = {"sex": "Sex", "race": "Race", "ethnicity": "Ethnicity", "age_band": "Age band"}
#: The smallest group an audit may report: below it cells are suppressed. The form may
#: raise it, never lower it below this floor, so a report cannot single out a few patients.
MIN_GROUP_FLOOR = 10
PAGE = 50
_AUDIT_ID = r"^[0-9a-f]{32}$"
AuditId = Annotated[str, Path(pattern=_AUDIT_ID)]


def _compliance(user: Any, what: str) -> None:
    require_roles(user, Role.compliance, what=what)


def _audit(session: SessionDep, audit_id: str) -> AuditRow:
    try:
        return audit_service.get_audit(session, audit_id)
    except audit_service.AuditServiceError:
        raise DashboardError(404, "Audit not found", "No stored audit has this id.") from None


def _outcome(request: Request) -> OutcomeDefinition:
    """The served model's outcome definition (as the /audits API finds it), else the
    built-in deterioration outcome the demo models predict."""
    config = _model_outcome(request, request.app.state.settings)
    if config is not None:
        try:
            return OutcomeDefinition.from_config(config)
        except ValueError:
            pass
    return OutcomeDefinition.from_config("deterioration")


def _summary(row: AuditRow) -> dict[str, Any]:
    report = row.report or {}
    results = report.get("results") or {}
    flags = [d for d in results.get("disparities") or [] if d.get("flagged")]
    return {"id": row.id, "created_at": row.created_at, "run_by": row.run_by,
            "model_version": row.model_version, "window_start": row.window_start,
            "window_end": row.window_end,
            "n": (report.get("selection") or {}).get("audited"),
            "sensitive": results.get("sensitive") or [],
            "n_flags": len(flags),
            "summary": report.get("summary") or []}


@router.get("/audits")
def audits_page(request: Request, user: UserDep, session: SessionDep,
                error: Annotated[str | None, Query(max_length=300)] = None) -> Response:
    _compliance(user, "audits")
    rows = [_summary(r) for r in audit_service.list_audits(session, limit=200)]
    return render(request, "audits.html", {"nav": "audits", "audits": rows,
                                           "attributes": ATTRIBUTES, "error": error,
                                           "floor": MIN_GROUP_FLOOR})


def _day(value: str | None, *, end: bool) -> datetime | None:
    if not value:
        return None
    try:
        day = datetime.fromisoformat(value).date()
    except ValueError:
        raise DashboardError(400, "Invalid date", "Dates are YYYY-MM-DD.") from None
    # A window's end date is inclusive in the form and exclusive in the audit.
    at = datetime.combine(day, time.min, tzinfo=UTC)
    return at + timedelta(days=1) if end else at


@router.post("/audits")
def run_audit(request: Request, user: UserDep, session: SessionDep,
              csrf: Annotated[str, Form(max_length=128)] = "",
              window_start: Annotated[str | None, Form(max_length=32)] = None,
              window_end: Annotated[str | None, Form(max_length=32)] = None,
              attributes: Annotated[list[str] | None, Form()] = None,
              decision: Annotated[str, Form(pattern="^[A-Za-z0-9_]{1,64}$")] = "high_risk",
              threshold: Annotated[str | None, Form(max_length=16)] = None,
              min_group_size: Annotated[int, Form(ge=MIN_GROUP_FLOOR, le=100000)] = 30,
              ) -> Response:
    """Run an audit over the stored predictions and open its report."""
    check_csrf(request, csrf)
    _compliance(user, "audits")
    chosen = [a for a in (attributes or []) if a in ATTRIBUTES] or None
    cut: float | None = None
    if threshold:
        try:
            cut = float(threshold)
        except ValueError:
            cut = -1.0
        if not 0.0 < cut <= 1.0:
            raise DashboardError(400, "Invalid threshold",
                                 "The decision threshold is a probability between 0 and 1.")
    params = audit_service.AuditParams(
        outcome=_outcome(request), window_start=_day(window_start, end=False),
        window_end=_day(window_end, end=True), sensitive=chosen, threshold=cut,
        decision=decision, min_group_size=min_group_size)
    try:
        row = audit_service.run_audit(session, params, run_by=user.subject)
    except audit_service.AuditServiceError as exc:
        # The service's messages name windows, versions and counts, never patients.
        return render(request, "audits.html", {
            "nav": "audits", "attributes": ATTRIBUTES, "floor": MIN_GROUP_FLOOR,
            "audits": [_summary(r) for r in audit_service.list_audits(session, limit=200)],
            "error": str(exc)}, status_code=exc.status if exc.status < 500 else 422)
    audit_id = row.id
    # Committed before the response (see routes.feedback): the access log writes next.
    session.commit()
    return RedirectResponse(f"/dashboard/audits/{audit_id}", status_code=303)


@router.get("/audits/compare")
def compare_page(request: Request, user: UserDep, session: SessionDep,
                 a: Annotated[str, Query(pattern=_AUDIT_ID)],
                 b: Annotated[str, Query(pattern=_AUDIT_ID)]) -> Response:
    _compliance(user, "audits")
    before, after = _audit(session, a), _audit(session, b)
    diff = audit_service.compare_audits(session, a, b)
    return render(request, "audit_compare.html", {"nav": "audits", "diff": diff,
                                                  "a": _summary(before), "b": _summary(after)})


@router.get("/audits/{audit_id}")
def audit_page(request: Request, user: UserDep, session: SessionDep,
               audit_id: AuditId) -> Response:
    _compliance(user, "audits")
    row = _audit(session, audit_id)
    others = [_summary(r) for r in audit_service.list_audits(session, limit=200)
              if r.id != row.id]
    return render(request, "audit.html", {"nav": "audits", "a": _summary(row),
                                          "report": row.report, "others": others})


@router.get("/audits/{audit_id}/report.html")
def audit_report_html(request: Request, user: UserDep, session: SessionDep,
                      audit_id: AuditId) -> Response:
    """The stored HTML report, sandboxed: it runs no script and reaches nothing."""
    _compliance(user, "audits")
    row = _audit(session, audit_id)
    return Response(row.html, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; "
                                   "style-src 'unsafe-inline'; frame-ancestors 'self'",
        "Cache-Control": "no-store"})


@router.get("/audits/{audit_id}/report.pdf")
def audit_report_pdf(request: Request, user: UserDep, session: SessionDep,
                     audit_id: AuditId) -> Response:
    _compliance(user, "audits")
    row = _audit(session, audit_id)
    return Response(row.pdf, media_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="audit-{row.id}.pdf"',
        "Cache-Control": "no-store"})


@router.get("/audits/{audit_id}/audit.json")
def audit_report_json(request: Request, user: UserDep, session: SessionDep,
                      audit_id: AuditId) -> Response:
    import json

    _compliance(user, "audits")
    row = _audit(session, audit_id)
    return Response(json.dumps(row.report, indent=2), media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="audit-{row.id}'
                                                    f'.json"', "Cache-Control": "no-store"})


# -- the access log -------------------------------------------------------------------


@router.get("/access-log")
def access_log_page(request: Request, user: UserDep, session: SessionDep,
                    page: Annotated[int, Query(ge=1, le=100000)] = 1) -> Response:
    """Newest entries first, patients pseudonymised, and the whole chain verified."""
    _compliance(user, "the access log")
    access_log = request.app.state.access_log
    report = verify_chain(session, access_log.public_key)
    total = session.scalar(select(func.count()).select_from(AccessLogRow)) or 0
    rows = session.scalars(select(AccessLogRow).order_by(AccessLogRow.seq.desc())
                           .limit(PAGE).offset((page - 1) * PAGE)).all()
    secret = pseudonym_secret(request.app.state.settings)
    entries = [{"seq": r.seq, "at": r.at, "subject": r.subject, "role": r.role,
                "action": r.action, "resource": r.resource,
                "patient": pseudonym(r.patient_id, secret), "purpose": r.purpose,
                "status": r.status} for r in rows]
    return render(request, "access_log.html", {
        "nav": "access", "entries": entries, "chain": report, "page": page,
        "pages": max(1, (total + PAGE - 1) // PAGE), "total": total})
