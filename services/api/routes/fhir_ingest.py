"""FHIR R4 routes for ingest and reading: Bundles, bulk NDJSON, metadata, Patient read.

- ``POST /fhir``: a transaction Bundle is all or nothing; a batch is stored entry by
  entry and answered with a batch-response; collection, searchset, document and
  message Bundles are ingested like a transaction.
- ``POST /fhir/$import``: one bulk-data NDJSON file (``application/fhir+ndjson``),
  line by line: a bad line is dropped and named (``line N``) in the answer's
  OperationOutcome as a warning, the good lines are stored; only a file with no usable
  line is refused (see :mod:`services.ndjson_import`). Named after the Bulk Data
  ``$import`` operation, but synchronous and for one file per request.
- ``GET /fhir/metadata``: the CapabilityStatement of what this server serves.
- ``GET /fhir/Patient/{id}``: the stored Patient, by its opaque id.

Errors are OperationOutcomes (see :mod:`services.api.errors`) naming the entry and
element, never a value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from fhir_adapters.errors import IngestError, Issue
from services import ndjson_import, record_store
from services.api.deps import (
    PrincipalDep,
    SessionDep,
    SettingsDep,
    base_url,
    body_need,
    check_scopes,
    read_limited_body,
    require,
)
from services.api.errors import FHIR_JSON
from services.auth.principal import Principal, Role
from services.auth.scopes import Need, bundle_types
from services.body_encoding import ContentEncodingError, decoded_body
from services.record_store import EntryResult, IngestResult

T = TypeVar("T")
PREFIX = "/fhir"
router = APIRouter(prefix=PREFIX, tags=["FHIR"],
                   responses={401: {"description": "no valid bearer token (OperationOutcome)"},
                              403: {"description": "the role may not use this route "
                                                   "(OperationOutcome)"}})
#: Integration engines write (create and update, since storing is an upsert by business
#: identifier) every resource type they send; clinicians (and integration) read.
WRITE = require(Role.integration, scope=Need.of(body="cu"))
READ = require(Role.integration, Role.clinician, scope=Need.of("Patient.r", patient="id"))

JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
NDJSON_TYPES = frozenset({"application/fhir+ndjson", "application/ndjson",
                          "application/x-ndjson"})
FHIR_NDJSON = "application/fhir+ndjson"

_OUTCOME = {"description": "the request was refused: an OperationOutcome naming the entry and "
                           "element, never a value",
            "content": {FHIR_JSON: {"example": {"resourceType": "OperationOutcome", "issue": [{
                "severity": "error", "code": "value",
                "diagnostics": "is not a valid FHIR dateTime",
                "expression": ["Bundle.entry[1].resource.effectiveDateTime"]}]}}}}

_BUNDLE_EXAMPLE: dict[str, Any] = {
    "resourceType": "Bundle", "type": "transaction",
    "entry": [
        {"fullUrl": "urn:uuid:6b1f2c1e-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient",
                      "identifier": [{"type": {"coding": [{
                          "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                          "code": "MR"}]},
                          "system": "urn:oid:2.16.840.1.113883.3.9999.1",
                          "value": "MRN00000001"}],
                      "gender": "female", "birthDate": "1950-02-03"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:6b1f2c1e-0000-4000-8000-000000000002",
         "resource": {"resourceType": "Observation", "status": "final",
                      "identifier": [{"system": "urn:example:lab", "value": "L-1"}],
                      "code": {"coding": [{"system": "http://loinc.org", "code": "2524-7"}]},
                      "subject": {"reference": "urn:uuid:6b1f2c1e-0000-4000-8000-000000000001"},
                      "effectiveDateTime": "2026-01-02T03:04:00Z",
                      "valueQuantity": {"value": 4.1, "unit": "mmol/L",
                                        "system": "http://unitsofmeasure.org",
                                        "code": "mmol/L"}},
         "request": {"method": "POST", "url": "Observation"}},
    ],
}
_RESPONSE_EXAMPLE = {
    "resourceType": "Bundle", "type": "transaction-response",
    "entry": [
        {"response": {"status": "201 Created",
                      "location": "Patient/0d4c1bbf5e0a4cf5b6f3d0a2f7c41e11"}},
        {"response": {"status": "201 Created",
                      "location": "Observation/6a0e8e0d1b6f4f3c8b1f0b7e9d2c3a44"}},
    ],
}
_NDJSON_EXAMPLE = (
    '{"resourceType":"Patient","id":"p1","identifier":[{"system":'
    '"urn:oid:2.16.840.1.113883.3.9999.1","value":"MRN00000001"}],"gender":"female"}\n'
    '{"resourceType":"Observation","id":"o1","status":"final","code":{"coding":[{"system":'
    '"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/p1"},'
    '"effectiveDateTime":"2026-01-02T03:04:00Z","valueQuantity":{"value":88,"unit":"/min"}}\n'
)


def fhir_json(payload: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(payload, status_code=status, media_type=FHIR_JSON)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_media_type(request: Request, allowed: frozenset[str]) -> None:
    """415 unless the request's Content-Type is one of ``allowed``."""
    media = _media_type(request)
    if media not in allowed:
        shown = media[:80] or "none"
        raise HTTPException(415, f"Content-Type {shown!r} is not accepted here; send "
                                 f"{' or '.join(sorted(allowed))}")


def parse_json(body: bytes) -> Any:
    """The JSON document, or an IngestError with line and column (never the text)."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError(Issue("structure", f"not UTF-8 text (invalid byte at offset "
                                f"{exc.start}); FHIR JSON must be UTF-8")) from None
    if not text.strip():
        raise IngestError(Issue("structure", "empty body: expected a FHIR Bundle"))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # exc.msg is a fixed phrase ("Expecting ',' delimiter"); it never quotes the input.
        raise IngestError(Issue("structure", f"malformed JSON at line {exc.lineno}, column "
                                f"{exc.colno}: {exc.msg}")) from None


def error_status(error: IngestError) -> int:
    """400 for what cannot be parsed, 422 for content that breaks a rule."""
    return 400 if any(i.code == "structure" for i in error.issues) else 422


def outcome_response(error: IngestError) -> JSONResponse:
    return fhir_json(error.to_operation_outcome(), error_status(error))


def _information(text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": text}]}


_STATUS = {"created": "201 Created", "updated": "200 OK", "unchanged": "200 OK"}
_SAID = {"created": "created", "updated": "updated: the stored content changed",
         "unchanged": "unchanged: the same content is already stored"}


def _entry_response(entry: EntryResult) -> dict[str, Any]:
    return {"response": {"status": _STATUS[entry.outcome], "location": entry.location,
                         "outcome": _information(_SAID[entry.outcome])}}


def _note_patient(request: Request, patient_ids: set[str | None]) -> None:
    """The access log names the patient when the request touched exactly one."""
    ids = {p for p in patient_ids if p}
    if len(ids) == 1:
        request.state.patient_id = ids.pop()


def committed(session: Session, work: Callable[[], T]) -> T:
    """Run ``work`` and commit before the response is built.

    SessionDep's own commit runs after the response is sent, and after the access-log
    middleware, whose SQLite write would wait on ours; an answer that says "stored" must
    also not precede a commit that could still fail. A refusal rolls back, which ends
    the transaction (a rolled-back savepoint still holds SQLite's write lock).
    """
    try:
        value = work()
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return value


def wake_jobs(request: Request) -> None:
    """Nudge the job worker: the patient-updated jobs just committed can run now."""
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is not None:
        jobs.wake()


def _ingest_bundle(session: Session, principal: Principal, bundle: Any, body: bytes
                   ) -> tuple[str, IngestResult | list[EntryResult | IngestError]]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise IngestError(Issue("not-supported", "POST /fhir takes a Bundle (transaction, "
                                "batch, collection or searchset); got something else",
                                "resourceType"))
    check_scopes(principal, body_need(bundle_types(bundle), "cu"))
    if bundle.get("type") == "batch":
        return "batch", committed(session, lambda: record_store.ingest_batch(session, bundle))
    return "transaction", committed(
        session, lambda: record_store.ingest_bundle(session, bundle, raw=body))


@router.post(
    "", summary="Ingest a FHIR Bundle (transaction, batch, collection, searchset)",
    description="A **transaction** (and a collection, searchset, document or message Bundle) "
                "is stored all or nothing: any problem refuses the whole Bundle with an "
                "OperationOutcome naming the entry and element, and nothing is stored. A "
                "**batch** is stored entry by entry and answered with a batch-response Bundle "
                "whose entries carry each entry's status, location and outcome. Resources are "
                "keyed by their business identifier (a Patient by its MRN), so sending the "
                "same content twice changes nothing.",
    dependencies=[WRITE],
    openapi_extra={"requestBody": {"required": True, "content": {FHIR_JSON: {
        "schema": {"type": "object", "required": ["resourceType"], "properties": {
            "resourceType": {"const": "Bundle"},
            "type": {"enum": ["transaction", "batch", "collection", "searchset", "document",
                              "message"]},
            "entry": {"type": "array", "items": {"type": "object"}}}},
        "example": _BUNDLE_EXAMPLE}}}},
    responses={200: {"description": "stored: a transaction-response or batch-response Bundle",
                     "content": {FHIR_JSON: {"example": _RESPONSE_EXAMPLE}}},
               400: _OUTCOME, 413: {"description": "the body exceeds the upload limit"},
               415: {"description": "not application/fhir+json"}, 422: _OUTCOME})
async def post_bundle(request: Request, session: SessionDep, settings: SettingsDep,
                      principal: PrincipalDep) -> JSONResponse:
    require_media_type(request, JSON_TYPES)
    body = await read_limited_body(request, settings.max_upload_bytes)
    try:
        bundle = parse_json(body)
        kind, result = await run_in_threadpool(_ingest_bundle, session, principal, bundle,
                                               body)
    except IngestError as exc:
        return outcome_response(exc)
    wake_jobs(request)
    if isinstance(result, IngestResult):
        _note_patient(request, {e.patient_id for e in result.entries})
        return fhir_json({"resourceType": "Bundle", "type": "transaction-response",
                          "entry": [_entry_response(e) for e in result.entries]})
    entries: list[dict[str, Any]] = []
    for answer in result:
        if isinstance(answer, EntryResult):
            entries.append(_entry_response(answer))
        else:
            status = error_status(answer)
            entries.append({"response": {
                "status": "400 Bad Request" if status == 400 else "422 Unprocessable Entity",
                "outcome": answer.to_operation_outcome()}})
    _note_patient(request, {a.patient_id for a in result if isinstance(a, EntryResult)})
    return fhir_json({"resourceType": "Bundle", "type": f"{kind}-response", "entry": entries})


_IMPORT_WARNED = {"resourceType": "OperationOutcome", "issue": [
    {"severity": "information", "code": "informational",
     "diagnostics": "ingested 1 resources for 1 patient(s): 1 created, 0 updated, 0 unchanged; "
                    "1 line(s) dropped (see the warnings)"},
    {"severity": "warning", "code": "structure",
     "diagnostics": "line 2, Observation.valueQuantity.value: must be a decimal (a JSON "
                    "number); the resource was dropped",
     "expression": ["Observation.valueQuantity.value"]}]}


@router.post(
    "/$import", summary="Ingest one bulk-data NDJSON file, line by line",
    description="One FHIR Bulk Data NDJSON file (one resource per line, as a bulk export "
                "writes it), stored line by line: a bad line (not JSON, not a resource, a "
                "resource with a missing or malformed element, a subject that is neither in "
                "the file nor stored) is dropped, and the good lines are stored. The answer "
                "is an OperationOutcome: the counts, then one warning per problem naming the "
                "line and element, never a value. Only a file with no usable line is refused "
                "(400/422, nothing stored). Synchronous, one file per request; references may "
                "point at resources of earlier files.",
    dependencies=[WRITE],
    openapi_extra={"requestBody": {"required": True, "content": {FHIR_NDJSON: {
        "schema": {"type": "string"}, "example": _NDJSON_EXAMPLE}}}},
    responses={200: {"description": "stored: an OperationOutcome with the counts and a "
                                    "warning for each dropped line",
                     "content": {FHIR_JSON: {"example": _IMPORT_WARNED}}},
               400: _OUTCOME,
               413: {"description": "the body, or what its Content-Encoding: gzip inflates "
                                    "to, exceeds the upload limit"},
               415: {"description": "not application/fhir+ndjson, or a Content-Encoding "
                                    "other than gzip"}, 422: _OUTCOME})
async def import_ndjson(request: Request, session: SessionDep, settings: SettingsDep,
                        principal: PrincipalDep) -> JSONResponse:
    require_media_type(request, NDJSON_TYPES)
    body = await read_limited_body(request, settings.max_upload_bytes)
    try:
        # Content-Encoding: gzip inflates up to the same limit as an uncompressed body.
        body = decoded_body(body, request.headers.get("content-encoding"),
                            max_bytes=settings.max_upload_bytes)
    except ContentEncodingError as exc:
        raise HTTPException(exc.status, exc.detail) from None

    def store() -> ndjson_import.NdjsonImport:
        stored = ndjson_import.import_ndjson(session, body)
        # The file's types are known once its lines are read: a type the token may not
        # write refuses the whole file, rolled back by committed().
        check_scopes(principal, body_need({e.resource_type for e in stored.result.entries},
                                          "cu"))
        return stored

    try:
        stored = await run_in_threadpool(committed, session, store)
    except IngestError as exc:
        return outcome_response(exc)
    wake_jobs(request)
    result = stored.result
    patients = {e.patient_id for e in result.entries if e.patient_id}
    _note_patient(request, set(patients))
    counts = result.counts()
    text = (f"ingested {len(result.entries)} resources for {len(patients)} patient(s): "
            f"{counts['created']} created, {counts['updated']} updated, "
            f"{counts['unchanged']} unchanged")
    if stored.dropped_lines:
        text += f"; {stored.dropped_lines} line(s) dropped (see the warnings)"
    outcome = _information(text)
    outcome["issue"] += [w.to_fhir() for w in stored.warnings]
    return fhir_json(outcome)


#: (resource type or None for system level, kind, name, path template) of every FHIR
#: interaction clinfuse may serve; metadata lists the ones whose route is mounted.
_INTERACTIONS: tuple[tuple[str | None, str, str, str, str], ...] = (
    (None, "interaction", "transaction", "POST", "/fhir"),
    (None, "interaction", "batch", "POST", "/fhir"),
    (None, "operation", "import", "POST", "/fhir/$import"),
    (None, "operation", "predict", "POST", "/fhir/$predict"),
    ("Patient", "interaction", "read", "GET", "/fhir/Patient/{}"),
    ("Patient", "operation", "predict", "POST", "/fhir/Patient/{}/$predict"),
    ("RiskAssessment", "interaction", "search-type", "GET", "/fhir/RiskAssessment"),
)
_OPERATION_DOCS = {
    "import": "Synchronous, one NDJSON file per request (application/fhir+ndjson), line by "
              "line: bad lines are dropped and named as warnings, the rest stored.",
    "predict": "clinfuse's risk prediction: a RiskAssessment with its explanation, for a "
               "posted Bundle (system level) or an ingested patient (instance level). Not "
               "validated for clinical use.",
}


def _served(request: Request) -> set[tuple[str, str]]:
    """(METHOD, path with ``{}`` for parameters) of every mounted API route.

    Read from the OpenAPI document, which FastAPI builds (and caches) over every
    included router, however deeply nested.
    """
    served: set[tuple[str, str]] = set()
    for path, operations in request.app.openapi().get("paths", {}).items():
        template = re.sub(r"\{[^}]*\}", "{}", path)
        served.update((method.upper(), template) for method in operations)
    return served


def capability_statement(request: Request, base: str) -> dict[str, Any]:
    served = _served(request)
    system: dict[str, list[dict[str, Any]]] = {"interaction": [], "operation": []}
    types: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rtype, kind, name, method, path in _INTERACTIONS:
        if (method, path) not in served:
            continue
        if kind == "interaction":
            entry: dict[str, Any] = {"code": name}
        else:
            # clinfuse's own operations: canonical names, not documents served here.
            entry = {"name": name, "definition": f"urn:clinfuse:OperationDefinition:{name}",
                     "documentation": _OPERATION_DOCS[name]}
        bucket = system if rtype is None else types.setdefault(
            rtype, {"interaction": [], "operation": []})
        bucket[kind].append(entry)
    resources = []
    for rtype, parts in types.items():
        resource: dict[str, Any] = {"type": rtype}
        if parts["interaction"]:
            resource["interaction"] = parts["interaction"]
        if parts["operation"]:
            resource["operation"] = parts["operation"]
        if rtype == "RiskAssessment" and any(
                i["code"] == "search-type" for i in parts["interaction"]):
            resource["searchParam"] = [{"name": "patient", "type": "reference",
                                        "documentation": "the patient's opaque id"}]
        resources.append(resource)
    root = base.removesuffix(PREFIX)
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "Writes need the integration role; reads the clinician or "
                         "integration role. Each route also needs SMART scopes (v2 .cruds "
                         "or v1 .read/.write; patient/ scopes reach only the launch "
                         "patient): see /.well-known/smart-configuration and the "
                         "service's security documentation. Not validated for clinical "
                         "use.",
        "security": {
            "cors": False,
            "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"}]}],
            "description": "OAuth 2.0 bearer tokens (JWT, RS256/ES384) from the hospital's "
                           "identity provider; SMART Backend Services for system clients. "
                           f"See {root}/.well-known/smart-configuration.",
        },
        "resource": resources,
    }
    if system["interaction"]:
        rest["interaction"] = system["interaction"]
    if system["operation"]:
        rest["operation"] = system["operation"]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "publisher": "clinfuse",
        "kind": "instance",
        "software": {"name": "clinfuse", "version": str(request.app.version)},
        "implementation": {"description": "clinfuse clinical decision support (not "
                                          "validated for clinical use)", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    }


@router.get(
    "/metadata", summary="The CapabilityStatement (FHIR R4)",
    description="What this server serves: transaction and batch Bundles, NDJSON $import, "
                "Patient read, and (when mounted) $predict and RiskAssessment search. "
                "Public: no token needed.",
    responses={200: {"description": "a CapabilityStatement", "content": {FHIR_JSON: {
        "example": {"resourceType": "CapabilityStatement", "status": "active",
                    "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
                    "rest": [{"mode": "server", "interaction": [{"code": "transaction"},
                                                                 {"code": "batch"}],
                              "resource": [{"type": "Patient",
                                            "interaction": [{"code": "read"}]}]}]}}}}})
def metadata(request: Request, settings: SettingsDep) -> JSONResponse:
    return fhir_json(capability_statement(request, base_url(request, settings, PREFIX)))


@router.get(
    "/Patient/{id}", summary="Read a stored Patient by its opaque id",
    description="The Patient resource as stored (its id is the opaque patient id; URLs never "
                "carry an MRN). Clinicians and integration engines may read it.",
    dependencies=[READ],
    responses={200: {"description": "the Patient", "content": {FHIR_JSON: {"example": {
        "resourceType": "Patient", "id": "0d4c1bbf5e0a4cf5b6f3d0a2f7c41e11",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1",
                        "value": "MRN00000001"}], "gender": "female",
        "birthDate": "1950-02-03"}}}},
               404: {"description": "no such patient (OperationOutcome)"}})
def read_patient(id: str, request: Request, session: SessionDep) -> JSONResponse:
    resource = record_store.patient_resource(session, id)
    if resource is None:
        raise HTTPException(404, "no Patient with this id")
    request.state.patient_id = id
    return fhir_json(resource)
