"""The access log, read back: entries (pseudonymised for compliance) and chain verification.

Compliance officers review who touched patient data without seeing which patient:
patient ids are replaced by a keyed pseudonym (HMAC-SHA256 with a deployment
secret), stable across requests so that one patient's accesses can still be
followed. Admins see the opaque ids themselves.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from fhir_adapters.record import ensure_utc
from services.access_log import AccessLog, pseudonym, pseudonym_secret, verify_chain
from services.api.deps import MAX_OFFSET, SessionDep, SettingsDep, require
from services.auth.principal import Principal, Role
from services.auth.scopes import Need
from services.tables import AccessLogRow

router = APIRouter(prefix="/access-log", tags=["Access log"],
                   responses={401: {"description": "no valid bearer token"},
                              403: {"description": "only compliance and admin may read the "
                                                   "access log"}})
Reviewer = Annotated[Principal, require(Role.compliance, scope=Need.of("clinfuse/access-log"))]

class AccessLogEntry(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "seq": 42, "at": "2026-11-26T10:00:00Z", "subject": "dr-lee", "role": "clinician",
        "action": "read", "resource": "GET /fhir/Patient/{id}/predictions",
        "patient": "P-1f3a9c0e5b7d2a41", "purpose": "TREAT", "status": 200,
        "hash": "5e0c...", "pseudonymised": True}]})

    seq: int
    at: datetime
    subject: str
    role: str
    action: str
    resource: str
    #: The opaque patient id (admin) or its pseudonym (compliance); None: no patient.
    patient: str | None
    purpose: str | None
    status: int
    hash: str
    pseudonymised: bool


class ChainVerification(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "ok": False, "entries": 1200, "checkpoints": 12, "last_checkpoint_seq": 1200,
        "problems": ["entry 17: its contents do not match its hash (edited)"]}]})

    ok: bool
    entries: int
    checkpoints: int
    last_checkpoint_seq: int | None
    problems: list[str]


@router.get("", summary="Access-log entries, newest first",
            response_model=list[AccessLogEntry])
def list_entries(session: SessionDep, settings: SettingsDep, principal: Reviewer,
                 since: Annotated[datetime | None, Query(description="at or after")] = None,
                 until: Annotated[datetime | None, Query(description="before")] = None,
                 subject: Annotated[str | None, Query(max_length=256)] = None,
                 action: Annotated[str | None, Query(max_length=64)] = None,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                 offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> list[AccessLogEntry]:
    query = select(AccessLogRow)
    if since is not None:
        query = query.where(AccessLogRow.at >= since)
    if until is not None:
        query = query.where(AccessLogRow.at < until)
    if subject is not None:
        query = query.where(AccessLogRow.subject == subject)
    if action is not None:
        query = query.where(AccessLogRow.action == action)
    rows = session.scalars(query.order_by(AccessLogRow.seq.desc()).limit(limit)
                           .offset(offset)).all()
    # Only admins see which patient; everyone else gets the keyed pseudonym.
    hide = principal.role is not Role.admin
    secret = pseudonym_secret(settings) if hide else b""
    return [AccessLogEntry(seq=r.seq, at=ensure_utc(r.at), subject=r.subject, role=r.role,
                           action=r.action,
                           resource=r.resource,
                           patient=pseudonym(r.patient_id, secret) if hide else r.patient_id,
                           purpose=r.purpose, status=r.status, hash=r.hash, pseudonymised=hide)
            for r in rows]


@router.get("/verify", summary="Verify the hash chain and the signed checkpoints",
            response_model=ChainVerification)
def verify(request: Request, session: SessionDep, _: Reviewer) -> ChainVerification:
    access_log: AccessLog = request.app.state.access_log
    # Against the exported checkpoints too, when they are kept: only they show a tail
    # deleted together with the checkpoints above it.
    report = verify_chain(session, access_log.public_key,
                          exported=access_log.checkpoint_file)
    return ChainVerification(ok=report.ok, entries=report.entries,
                             checkpoints=report.checkpoints,
                             last_checkpoint_seq=report.last_checkpoint_seq,
                             problems=report.problems)
