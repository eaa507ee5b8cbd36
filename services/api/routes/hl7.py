"""HL7 v2 over HTTP: POST ER7 text, get the ACK (or NAK) back as ER7.

Follows the HL7 over HTTP transport: the HTTP status is 200 whenever an HL7
acknowledgement comes back, and the acknowledgement code (MSA-1: AA, AE or AR)
says whether the message was taken. ``X-HL7-Ack-Codes`` repeats the codes, one per
message, for clients that only read headers. The same function serves the MLLP
listener (:mod:`services.mllp`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from services import record_store
from services.api.deps import SessionDep, SettingsDep, read_limited_body, require
from services.api.routes.fhir_ingest import committed, require_media_type, wake_jobs
from services.auth.principal import Role
from services.auth.scopes import Need

#: The HL7 over HTTP media type for ER7 (pipe-and-hat) messages.
ER7 = "x-application/hl7-v2+er7"
ER7_TYPES = frozenset({ER7, "application/hl7-v2+er7", "application/hl7-v2"})
#: What HL7 v2 messages become (fhir_adapters.hl7v2_to_fhir): creates and updates of these
#: types; A40 merges and A11/A13 cancellations mark rows, they delete nothing.
WRITES = Need.of("Patient.cu", "Encounter.cu", "Observation.cu", "DocumentReference.cu")
router = APIRouter(tags=["HL7 v2"],
                   responses={401: {"description": "no valid bearer token"},
                              403: {"description": "the role may not use this route"}})

_EXAMPLE = ("MSH|^~\\&|LAB|HOSP|CLINFUSE|CLINFUSE|20260102030400+0000||ORU^R01^ORU_R01|"
            "MSG0001|P|2.5.1\r"
            "PID|1||MRN00000001^^^HOSP&2.16.840.1.113883.3.9999.1&ISO^MR||Doe^Jane||19500203|F\r"
            "OBR|1||F0001|24323-8^Comprehensive metabolic panel^LN|||20260102030400+0000\r"
            "OBX|1|NM|2524-7^Lactate^LN||4.1|mmol/L^mmol/L^UCUM|0.5-2.2||||F|||"
            "20260102030400+0000\r")
_ACK = ("MSH|^~\\&|CLINFUSE|CLINFUSE|LAB|HOSP|20260102030401+0000||ACK^R01^ACK|"
        "4f1c0e7d9a2b4c6d8e0f|P|2.5.1\rMSA|AA|MSG0001")


@router.post(
    "/hl7v2", summary="Ingest HL7 v2 messages over HTTP; answers ACK or NAK",
    description="ER7 text, one message or several (each answered by its own ACK, in order, "
                "and stored on its own). ADT^A40 merges patients (MRG-1 into PID-3), A11 "
                "cancels the admission, A13 the discharge; results with OBX-11 W or D drop "
                "out of the record. A bad field is nulled and an unreadable result dropped, "
                "and the message is still taken: AA with one ERR of severity W (ERR-4) per "
                "element left out. AE or AR only when nothing could be stored. ERR segments "
                "locate the segment and field, never a value.",
    dependencies=[require(Role.integration, scope=WRITES)],
    openapi_extra={"requestBody": {"required": True, "content": {ER7: {
        "schema": {"type": "string"}, "example": _EXAMPLE}}}},
    responses={200: {"description": "the ACK (MSA-1 AA) or NAK (AE/AR), as ER7",
                     "content": {ER7: {"example": _ACK}}},
               413: {"description": "the body exceeds the upload limit"},
               415: {"description": "not x-application/hl7-v2+er7"}},
    response_class=Response)
async def post_hl7(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    require_media_type(request, ER7_TYPES)
    body = await read_limited_body(request, settings.max_upload_bytes)
    answers = await run_in_threadpool(
        committed, session, lambda: record_store.ingest_hl7(session, body))
    wake_jobs(request)
    patients = {e.patient_id for a in answers if a.result for e in a.result.entries
                if e.patient_id}
    if len(patients) == 1:
        request.state.patient_id = patients.pop()
    return Response("\r".join(a.ack for a in answers) + "\r", media_type=ER7,
                    headers={"X-HL7-Ack-Codes": ",".join(a.code for a in answers)})
