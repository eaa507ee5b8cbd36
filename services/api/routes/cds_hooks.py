"""CDS Hooks 2.0 routes: discovery, the patient-view service and its feedback endpoint.

The logic lives in :mod:`services.cds_hooks`; errors are OperationOutcomes (400 for
a malformed request, 404 for an unknown service or card, 412 when the patient's
data cannot be had, 503 without a model).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from services import cds_hooks
from services.api.deps import SessionDep, SettingsDep, base_url, read_limited_body, require
from services.api.errors import error_response
from services.auth.principal import Principal, Role
from services.auth.scopes import Need
from services.cds_hooks import FeedbackRequest, HookError, HookRequest
from services.outbound import Outbound
from services.prediction import PredictionError, PredictionService
from services.tables import PredictionRow

router = APIRouter(prefix="/cds-services", tags=["CDS Hooks"],
                   responses={401: {"description": "no valid bearer token"},
                              403: {"description": "the role may not use this route"}})

Ehr = Annotated[Principal, require(Role.integration, Role.clinician,
                                   scope=Need.of("clinfuse/cds-hooks"))]
#: A hook call stores the prefetched record and a RiskAssessment.
Hooker = Annotated[Principal, require(Role.integration, scope=Need.of(
    "clinfuse/cds-hooks", "record.cu", "RiskAssessment.c"))]
FeedbackGiver = Annotated[Principal, require(Role.integration, Role.clinician,
                                             scope=Need.of("clinfuse/feedback"))]

_CARD_EXAMPLE = {"cards": [{
    "uuid": "9368d37b-283f-44a0-93ea-547cebab93ed",
    "summary": "Deterioration risk 37% (high risk). Top factors: lactate +9, imaging -3, "
               "notes +3 pts",
    "detail": "Predicted risk of deterioration within 30 days: 37% ...\n\n"
              "**Not validated for clinical use.**",
    "indicator": "critical",
    "source": {"label": "clinfuse-late-fusion 1.0.0 · Not validated for clinical use"},
    "links": [{"label": "Open the risk and its explanation in clinfuse",
               "url": "https://clinfuse.example.org/dashboard/patients/"
                      "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "type": "smart",
               "appContext": "{\"patient\": \"0a1b2c3d4e5f60718293a4b5c6d7e8f9\"}"}],
    "overrideReasons": [dict(r) for r in cds_hooks.OVERRIDE_REASONS[:1]]}]}


def _service_or_none(request: Request) -> PredictionService | None:
    service: PredictionService | None = getattr(request.app.state, "predictions", None)
    return service


def _error(request: Request, exc: HookError) -> JSONResponse:
    return error_response(request, exc.status, exc.message, issues=exc.issues())


@router.get("", summary="CDS Hooks discovery",
            responses={200: {"content": {"application/json": {"example": cds_hooks.discovery(
                None)}}}})
def discover(request: Request, principal: Ehr) -> dict[str, Any]:
    """The one service this server offers (patient-view) and its prefetch templates."""
    return cds_hooks.discovery(_service_or_none(request))


@router.post("/{service_id}", summary="Call the patient-view service",
             responses={200: {"content": {"application/json": {"example": _CARD_EXAMPLE}}},
                        400: {"description": "malformed request (OperationOutcome)"},
                        404: {"description": "no such service (OperationOutcome)"},
                        412: {"description": "the patient's data cannot be had "
                                             "(OperationOutcome)"},
                        413: {"description": "the body exceeds the upload limit"},
                        503: {"description": "no model is configured (OperationOutcome)"}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"type": "object"},
                 "example": cds_hooks.HOOK_EXAMPLE}}}})
async def call_service(request: Request, service_id: str, principal: Hooker,
                       session: SessionDep, settings: SettingsDep) -> Response:
    """Answer ``patient-view`` with one card: the risk, why, and a link to the dashboard.

    Prefetch keys that are absent or ``null`` are fetched from ``fhirServer`` with the
    ``fhirAuthorization`` token (searchset paging followed on the server's own origin).
    The data is stored, the prediction is made as of now and stored with the card's
    uuid, which feedback refers to.
    """
    started = time.perf_counter()
    request.state.access_action = "predict"
    if service_id != cds_hooks.SERVICE_ID:
        return _error(request, HookError(404, "no CDS service with this id", "service_id",
                                         "not-found"))
    service = _service_or_none(request)
    if service is None:
        return _error(request, HookError(503, "no model is configured on this server; the "
                                         "service cannot answer", None, "exception"))
    try:
        hook = cds_hooks.parse_model(HookRequest, await read_limited_body(
            request, settings.max_upload_bytes))
        root = base_url(request, settings, "")
        result = await run_in_threadpool(cds_hooks.handle_patient_view, session, service, hook,
                                         requested_by=principal.subject, base_url=root,
                                         outbound=Outbound.from_settings(settings),
                                         reuse_within_s=settings.prediction_reuse_s)
    except HookError as exc:
        # An answered error must not commit: SessionDep commits whatever is left.
        session.rollback()
        return _error(request, exc)
    except PredictionError as exc:
        session.rollback()
        return _error(request, HookError(412, str(exc), None, "processing"))
    request.state.patient_id = result.prediction.patient_id
    elapsed = f"{1000 * (time.perf_counter() - started):.1f}"
    return JSONResponse(result.response, headers={"Server-Timing": f"hook;dur={elapsed}"})


@router.post("/{service_id}/feedback", summary="Feedback on a card",
             responses={200: {"description": "stored"},
                        400: {"description": "malformed feedback (OperationOutcome)"},
                        404: {"description": "unknown service or card (OperationOutcome)"},
                        413: {"description": "the body exceeds the upload limit"}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"type": "object"},
                 "example": cds_hooks.FEEDBACK_EXAMPLE}}}})
async def feedback(request: Request, service_id: str, principal: FeedbackGiver,
                   session: SessionDep, settings: SettingsDep) -> Response:
    """Record accepted/overridden (with overrideReason and userComment) per card, all or none."""
    if service_id != cds_hooks.SERVICE_ID:
        return _error(request, HookError(404, "no CDS service with this id", "service_id",
                                         "not-found"))
    try:
        body = cds_hooks.parse_model(FeedbackRequest, await read_limited_body(
            request, min(settings.max_upload_bytes, 1024 * 1024)))
        rows = await run_in_threadpool(cds_hooks.handle_feedback, session, body,
                                       recorded_by=principal.subject)
        # Committed before answering: SessionDep's commit runs after the response is sent.
        await run_in_threadpool(session.commit)
    except HookError as exc:
        session.rollback()
        return _error(request, exc)
    patients = {r.prediction_id for r in rows}
    if rows:
        first = session.get(PredictionRow, rows[0].prediction_id)
        request.state.patient_id = first.patient_id if first is not None else None
    return JSONResponse({"stored": len(rows), "predictions": len(patients)})
