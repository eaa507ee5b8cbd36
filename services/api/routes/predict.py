"""Predictions over FHIR: ``$predict`` for a stored patient or a posted Bundle, and reads.

``$predict`` answers a FHIR ``Parameters`` resource, the usual shape of an
operation with several outputs:

=================  ===============  ==================================================
name               value            when
=================  ===============  ==================================================
``prediction``     ``valueId``      always: the stored prediction's id
``riskAssessment`` ``resource``     scored: the RiskAssessment (FHIR R4, validated),
                                    ``id`` = the prediction id
``explanation``    ``valueAttach``  scored: the explanation document (JSON, base64,
                   ``ment``         ``url`` = ``/predictions/{id}``, where it is JSON)
``refusal``        ``valueString``  not scored: why (outside the model's population,
                                    no input)
``stored``         ``valueBoolean`` ``false`` when nothing was stored (then there is no
                                    ``prediction`` and no explanation ``url``)
=================  ===============  ==================================================

A refusal is an answer, not an error: it is stored (audits count refusals) and
answered with 200. URLs carry opaque patient ids, never an MRN.

Storing needs a writing role: with a Bundle, only the integration (and admin) role,
whose token may also create and update the Bundle's resource types and
RiskAssessment, stores the Bundle and the prediction. A clinician's Bundle is scored
in memory and nothing is stored (:mod:`services.unsaved_prediction`), so a read role
never writes through ``$predict``.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from fhir_adapters.errors import IngestError
from fhir_adapters.fhir_json import parse_fhir_datetime
from fhir_adapters.record import ensure_utc
from services import record_store
from services.api.deps import (
    MAX_OFFSET,
    SessionDep,
    SettingsDep,
    base_url,
    body_need,
    check_patient,
    check_scopes,
    read_limited_body,
    require,
)
from services.api.errors import FHIR_JSON, error_response
from services.auth.principal import Principal, Role
from services.auth.scopes import Need, bundle_types
from services.prediction import (
    PatientNotFound,
    Prediction,
    PredictionError,
    PredictionService,
    indicator_for,
)
from services.tables import FeedbackRow, PredictionRow
from services.unsaved_prediction import NotOnePatient, score_bundle

router = APIRouter(prefix="/fhir", tags=["Predictions"],
                   responses={401: {"description": "no valid bearer token"},
                              403: {"description": "the role may not use this route"},
                              503: {"description": "no model is configured"}})
#: ``/predictions/{id}``: the dashboard's JSON, outside the FHIR base.
json_router = APIRouter(prefix="/predictions", tags=["Predictions"],
                        responses={401: {"description": "no valid bearer token"},
                                   403: {"description": "the role may not use this route"}})

#: $predict reads the patient's record and stores a RiskAssessment.
Predictor = Annotated[Principal, require(
    Role.integration, Role.clinician,
    scope=Need.of("record.r", "RiskAssessment.c", patient="patient_id"))]
#: $predict with a Bundle reads the posted record; storing it needs more (STORING).
BundlePredictor = Annotated[Principal, require(
    Role.integration, Role.clinician, scope=Need.of(
        "record.r", note="storing (integration, admin): also <Type>.cu and "
                         "RiskAssessment.c; a clinician's Bundle is scored, not stored"))]
#: Who stores a posted Bundle and its prediction; on top, their token needs this and
#: create/update on each of the Bundle's resource types.
WRITING_ROLES = frozenset({Role.integration, Role.admin})
STORING = Need.of("RiskAssessment.c")
Searcher = Annotated[Principal, require(Role.clinician, Role.integration,
                                        scope=Need.of("RiskAssessment.s", patient=Need.ROUTE))]
Reader = Annotated[Principal, require(Role.clinician, Role.integration,
                                      scope=Need.of("RiskAssessment.r", patient=Need.ROUTE))]
OpaqueId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="opaque id")]


def get_predictions(request: Request) -> PredictionService:
    """The served model; 503 when none is configured."""
    service: PredictionService | None = getattr(request.app.state, "predictions", None)
    if service is None:
        raise HTTPException(503, "no model is configured on this server "
                                 "(CLINFUSE_MODEL_PATH); predictions are unavailable")
    return service


PredictionsDep = Annotated[PredictionService, Depends(get_predictions)]

_RISK_EXAMPLE: dict[str, Any] = {
    "resourceType": "RiskAssessment", "id": "5d0f1c2e9a8b4c7d8e6f5a4b3c2d1e0f",
    "status": "preliminary",
    "subject": {"reference": "Patient/0a1b2c3d4e5f60718293a4b5c6d7e8f9"},
    "occurrenceDateTime": "2026-11-26T09:00:00Z",
    "prediction": [{"outcome": {"text": "death or ICU transfer within 30 days"},
                    "probabilityDecimal": 0.23}],
    "note": [{"text": "Not validated for clinical use"}]}
_PARAMETERS_EXAMPLE: dict[str, Any] = {"resourceType": "Parameters", "parameter": [
    {"name": "prediction", "valueId": "5d0f1c2e9a8b4c7d8e6f5a4b3c2d1e0f"},
    {"name": "riskAssessment", "resource": _RISK_EXAMPLE},
    {"name": "explanation", "valueAttachment": {
        "contentType": "application/json", "data": "eyJyaXNrIjog...",
        "url": "https://clinfuse.example.org/predictions/5d0f1c2e9a8b4c7d8e6f5a4b3c2d1e0f"}}]}
_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "a Parameters resource (see the module docs)",
          "content": {FHIR_JSON: {"example": _PARAMETERS_EXAMPLE}}},
    404: {"description": "no such patient (OperationOutcome)"},
    400: {"description": "the body is not a FHIR resource of the expected type "
                         "(OperationOutcome)"},
    413: {"description": "the body exceeds the upload limit"},
    422: {"description": "the record cannot become model input (OperationOutcome)"},
}


def _fhir(content: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status, media_type=FHIR_JSON)


def _parameters(row: PredictionRow, root: str) -> dict[str, Any]:
    url = f"{root}/predictions/{row.id}"
    params: list[dict[str, Any]] = [{"name": "prediction", "valueId": row.id}]
    if row.risk_assessment is not None:
        params.append({"name": "riskAssessment", "resource": row.risk_assessment})
    if row.explanation is not None:
        data = base64.b64encode(json.dumps(row.explanation, separators=(",", ":"))
                                .encode()).decode("ascii")
        params.append({"name": "explanation", "valueAttachment": {
            "contentType": "application/json", "data": data, "url": url,
            "title": "clinfuse explanation"}})
    if row.refusal is not None:
        params.append({"name": "refusal", "valueString": row.refusal})
    return {"resourceType": "Parameters", "parameter": params}


def _unsaved_parameters(result: Prediction) -> dict[str, Any]:
    """The Parameters of a prediction that was not stored: no id to fetch it by."""
    params: list[dict[str, Any]] = []
    if result.risk_assessment is not None:
        params.append({"name": "riskAssessment", "resource": result.risk_assessment})
    if result.explanation is not None:
        data = base64.b64encode(json.dumps(result.explanation, separators=(",", ":"),
                                           default=str).encode()).decode("ascii")
        params.append({"name": "explanation", "valueAttachment": {
            "contentType": "application/json", "data": data,
            "title": "clinfuse explanation"}})
    if result.refusal is not None:
        params.append({"name": "refusal", "valueString": result.refusal})
    params.append({"name": "stored", "valueBoolean": False})
    return {"resourceType": "Parameters", "parameter": params}


def _index_time(body: dict[str, Any] | None) -> datetime | None:
    """``indexTime`` (valueDateTime or valueInstant) from a Parameters body, if given."""
    if not body:
        return None
    parameters = body.get("parameter") or []
    if not isinstance(parameters, list):
        raise HTTPException(400, "Parameters.parameter must be an array")
    for i, p in enumerate(parameters):
        if isinstance(p, dict) and p.get("name") == "indexTime":
            value = p.get("valueDateTime") or p.get("valueInstant")
            try:
                if not isinstance(value, str) or "T" not in value:
                    raise ValueError
                return parse_fhir_datetime(value)
            except ValueError:
                raise HTTPException(400, f"Parameters.parameter[{i}].value[x]: indexTime must "
                                         "be a dateTime with a time and zone") from None
    return None


async def _json_body(request: Request, limit: int, *, required: bool) -> dict[str, Any] | None:
    raw = await read_limited_body(request, limit)
    if not raw.strip():
        if required:
            raise HTTPException(400, "a Bundle or Parameters body is required")
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise HTTPException(400, "the body must be a FHIR resource")
    return data


def _predict(service: PredictionService, session: Session, patient_id: str, *, source: str,
             requested_by: str, index_time: datetime | None) -> PredictionRow:
    """Predict and commit: SessionDep's own commit runs only after the response is sent
    (and after the access-log middleware, which must not wait on this transaction)."""
    try:
        row = service.predict_patient(session, patient_id, source=source,
                                      requested_by=requested_by, index_time=index_time)
    except PatientNotFound:
        raise HTTPException(404, "no patient with this id") from None
    except PredictionError as exc:
        raise HTTPException(422, str(exc)) from None
    session.commit()
    return row


@router.post("/Patient/{patient_id}/$predict", summary="Predict for a stored patient",
             responses=_PREDICT_RESPONSES,
             openapi_extra={"requestBody": {"required": False, "content": {FHIR_JSON: {
                 "schema": {"type": "object", "required": ["resourceType"], "properties": {
                     "resourceType": {"const": "Parameters"},
                     "parameter": {"type": "array", "items": {"type": "object"}}}},
                 "example": {"resourceType": "Parameters", "parameter": [
                     {"name": "indexTime", "valueDateTime": "2026-11-26T09:00:00Z"}]}}}}})
async def predict_patient(request: Request, patient_id: OpaqueId, principal: Predictor,
                          session: SessionDep, settings: SettingsDep,
                          service: PredictionsDep) -> JSONResponse:
    """Predict, explain and store for an ingested patient, as of now or ``indexTime``.

    The body is optional: a ``Parameters`` with ``indexTime`` (dateTime) sets the index
    time; nothing after it is used.
    """
    request.state.patient_id = patient_id
    request.state.access_action = "predict"
    body = await _json_body(request, settings.max_upload_bytes, required=False)
    if body is not None and body["resourceType"] != "Parameters":
        raise HTTPException(400, "the body must be a Parameters resource")
    row = await run_in_threadpool(_predict, service, session, patient_id, source="fhir",
                                  requested_by=principal.subject, index_time=_index_time(body))
    return _fhir(_parameters(row, base_url(request, settings, "")))


@router.post("/$predict", summary="Ingest a Bundle, then predict for its patient",
             responses={**_PREDICT_RESPONSES, 400: {"description": "not one patient's Bundle, "
                                                    "or it does not ingest (OperationOutcome)"}},
             openapi_extra={"requestBody": {"required": True, "content": {FHIR_JSON: {
                 "schema": {"type": "object", "required": ["resourceType"], "properties": {
                     "resourceType": {"enum": ["Bundle", "Parameters"]}}},
                 "example": {"resourceType": "Bundle", "type": "transaction", "entry": [
                     {"fullUrl": "urn:uuid:5bd5a1a4-05b2-4f0c-a7a6-8f1d7f0d2b11",
                      "resource": {"resourceType": "Patient", "identifier": [
                          {"system": "urn:oid:2.16.840.1.113883.3.9999.1",
                           "value": "MRN1234"}], "birthDate": "1950-04-02"},
                      "request": {"method": "POST", "url": "Patient"}}]}}}}})
async def predict_bundle(request: Request, principal: BundlePredictor, session: SessionDep,
                         settings: SettingsDep, service: PredictionsDep) -> JSONResponse:
    """Ingest one patient's Bundle (transaction or collection: all or nothing), then predict.

    The body is the Bundle, or a ``Parameters`` with the Bundle as ``bundle`` (resource)
    and an optional ``indexTime``. For the integration and admin roles the data is
    stored like any FHIR ingest, so the patient's stored record (including earlier data)
    is what the model sees. Any other role's Bundle is scored as posted, in memory, and
    nothing is stored (``stored`` false in the answer).
    """
    request.state.access_action = "predict"
    body = await _json_body(request, settings.max_upload_bytes, required=True)
    assert body is not None
    index_time = None
    if body["resourceType"] == "Parameters":
        index_time = _index_time(body)
        bundle = next((p.get("resource") for p in body.get("parameter") or []
                       if isinstance(p, dict) and p.get("name") == "bundle"), None)
        if not isinstance(bundle, dict):
            raise HTTPException(400, "Parameters.parameter: a 'bundle' resource is required")
    else:
        bundle = body
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") == "batch":
        raise HTTPException(400, "$predict takes one patient's transaction or collection "
                                 "Bundle")
    if principal.role not in WRITING_ROLES:
        return await _score_unsaved(request, service, bundle, index_time)
    check_scopes(principal, Need(body_need(bundle_types(bundle), "cu").resources
                                 + STORING.resources))

    def ingest_and_predict() -> PredictionRow:
        try:
            result = record_store.ingest_bundle(session, bundle)
        except IngestError as exc:
            raise _IngestFailed(exc) from None
        patients = {e.id for e in result.entries if e.resource_type == "Patient"}
        if len(patients) != 1:
            raise HTTPException(400, f"$predict takes one patient's Bundle; this one holds "
                                     f"{len(patients)} Patient resources")
        patient_id = patients.pop()
        # The data stands on its own: commit it before the (slow) prediction, so no
        # write lock is held while the model runs (SQLite has one writer at a time).
        session.commit()
        request.state.patient_id = patient_id
        return _predict(service, session, patient_id, source="fhir",
                        requested_by=principal.subject, index_time=index_time)

    try:
        row = await run_in_threadpool(ingest_and_predict)
    except _IngestFailed as exc:
        session.rollback()
        return error_response(request, 400, "the Bundle does not ingest",
                              issues=exc.error.issues)
    return _fhir(_parameters(row, base_url(request, settings, "")))


async def _score_unsaved(request: Request, service: PredictionService, bundle: dict[str, Any],
                         index_time: datetime | None) -> JSONResponse:
    try:
        result = await run_in_threadpool(score_bundle, service, bundle, index_time=index_time)
    except IngestError as exc:
        return error_response(request, 400, "the Bundle is not valid FHIR R4 patient data",
                              issues=exc.issues)
    except NotOnePatient as exc:
        raise HTTPException(400, str(exc)) from None
    except PredictionError as exc:
        raise HTTPException(422, str(exc)) from None
    return _fhir(_unsaved_parameters(result))


class _IngestFailed(Exception):
    def __init__(self, error: IngestError) -> None:
        super().__init__("ingest failed")
        self.error = error


@router.get("/RiskAssessment", summary="Search a patient's RiskAssessments",
            responses={200: {"description": "a searchset Bundle, newest first",
                             "content": {FHIR_JSON: {"example": {
                                 "resourceType": "Bundle", "type": "searchset", "total": 1,
                                 "entry": [{"fullUrl": "https://clinfuse.example.org/fhir/"
                                            "RiskAssessment/5d0f1c2e9a8b4c7d8e6f5a4b3c2d1e0f",
                                            "resource": _RISK_EXAMPLE,
                                            "search": {"mode": "match"}}]}}}},
                       400: {"description": "no subject given (OperationOutcome)"}})
def search_risk_assessments(
        request: Request, principal: Searcher, session: SessionDep, settings: SettingsDep,
        subject: Annotated[str | None, Query(description="Patient/{opaque id}",
                                             max_length=128)] = None,
        patient: Annotated[str | None, Query(description="the same, as a bare id",
                                             max_length=128)] = None,
        count: Annotated[int, Query(alias="_count", ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(alias="_offset", ge=0, le=MAX_OFFSET)] = 0) -> JSONResponse:
    """The scored predictions of one patient as RiskAssessments (refusals have none)."""
    ref = subject or patient
    if not ref:
        raise HTTPException(400, "subject (Patient/{id}) is required: RiskAssessments are "
                                 "searched per patient")
    patient_id = ref.removeprefix("Patient/")
    check_patient(request, patient_id)
    root = base_url(request, settings, "")
    if len(patient_id) != 32 or not all(c in "0123456789abcdef" for c in patient_id):
        rows: list[PredictionRow] = []
        total = 0
    else:
        request.state.patient_id = patient_id
        # Scored predictions have a probability and a RiskAssessment; refusals have neither.
        query = select(PredictionRow).where(PredictionRow.patient_id == patient_id,
                                            PredictionRow.probability.is_not(None))
        all_rows = [r for r in session.scalars(query.order_by(PredictionRow.created_at.desc(),
                                                              PredictionRow.id))
                    if r.risk_assessment]
        total = len(all_rows)
        rows = all_rows[offset:offset + count]
    self_url = f"{root}/fhir/RiskAssessment?subject=Patient/{patient_id}&_count={count}"
    links = [{"relation": "self", "url": f"{self_url}&_offset={offset}"}]
    if offset + count < total:
        links.append({"relation": "next", "url": f"{self_url}&_offset={offset + count}"})
    return _fhir({"resourceType": "Bundle", "type": "searchset", "total": total, "link": links,
                  "entry": [{"fullUrl": f"{root}/fhir/RiskAssessment/{r.id}",
                             "resource": r.risk_assessment, "search": {"mode": "match"}}
                            for r in rows]})


# ----------------------------------------------------------------------------- JSON


class FeedbackPublic(BaseModel):
    id: str
    outcome: str
    override_reason: dict[str, Any] | None
    user_comment: str | None
    outcome_timestamp: datetime
    recorded_by: str
    channel: str


class PredictionPublic(BaseModel):
    """One stored prediction with its explanation, for the dashboard."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "5d0f1c2e9a8b4c7d8e6f5a4b3c2d1e0f",
        "patient_id": "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
        "created_at": "2026-11-26T09:00:01Z", "index_time": "2026-11-26T09:00:00Z",
        "model_name": "clinfuse-late-fusion", "model_version": "1.0.0",
        "probability": 0.23, "refusal": None, "indicator": "warning",
        "decisions": {"high_risk": {"threshold": 0.3, "flag": False},
                      "moderate_risk": {"threshold": 0.1, "flag": True}},
        "modalities": "image+ehr+note", "source": "cds-hooks",
        "cds_card_uuid": "9368d37b-283f-44a0-93ea-547cebab93ed",
        "explanation": {"risk": {"probability": 0.23}, "rationale": "Predicted risk ..."},
        "risk_assessment": {"resourceType": "RiskAssessment"}, "feedback": []}]})

    id: str
    patient_id: str
    created_at: datetime
    index_time: datetime
    model_name: str
    model_version: str
    probability: float | None
    refusal: str | None
    indicator: str
    decisions: dict[str, Any]
    modalities: str
    source: str
    cds_card_uuid: str | None
    explanation: dict[str, Any] | None
    risk_assessment: dict[str, Any] | None
    feedback: list[FeedbackPublic]


@json_router.get("/{prediction_id}", summary="A prediction with its explanation (JSON)",
                 response_model=PredictionPublic,
                 responses={404: {"description": "no such prediction"}})
def get_prediction(request: Request, prediction_id: OpaqueId, principal: Reader,
                   session: SessionDep) -> PredictionPublic:
    """The explanation document and everything stored with it; the dashboard's source."""
    row = session.get(PredictionRow, prediction_id)
    if row is None:
        raise HTTPException(404, "no prediction with this id")
    check_patient(request, row.patient_id)
    request.state.patient_id = row.patient_id
    thresholds = {k: float(v["threshold"]) for k, v in (row.decisions or {}).items()
                  if isinstance(v, dict) and v.get("threshold") is not None}
    feedback = session.scalars(select(FeedbackRow).where(FeedbackRow.prediction_id == row.id)
                               .order_by(FeedbackRow.created_at))
    return PredictionPublic(
        id=row.id, patient_id=row.patient_id, created_at=ensure_utc(row.created_at),
        index_time=ensure_utc(row.index_time), model_name=row.model_name,
        model_version=row.model_version,
        probability=row.probability, refusal=row.refusal,
        indicator=indicator_for(row.probability, thresholds), decisions=row.decisions or {},
        modalities=row.modalities, source=row.source, cds_card_uuid=row.cds_card_uuid,
        explanation=row.explanation, risk_assessment=row.risk_assessment,
        feedback=[FeedbackPublic(id=f.id, outcome=f.outcome, override_reason=f.override_reason,
                                 user_comment=f.user_comment,
                                 outcome_timestamp=ensure_utc(f.outcome_timestamp),
                                 recorded_by=f.recorded_by, channel=f.channel)
                  for f in feedback])
