"""The FHIR resource store: ingest by identity, link to patients, rebuild their records.

Every ingested resource is one ``fhir_resources`` row keyed by ``(resource_type,
identity)``. The identity is, in order:

1. for a Patient, its business key by the PatientRecord rules (the MR-typed
   identifier, else the first with system and value): ``system|value``;
2. the resource's first business identifier (``identifier``, then
   ``masterIdentifier``): ``system|value``;
3. for HL7 v2 results, notes and visits without one, a natural key (patient,
   code or class, time): HL7 v2 has no id that survives a resend, and a
   correction (OBX-11 ``W``/``D``) must find the result it corrects;
4. the sender's id (``id:<id>``), else the entry's fullUrl, else the content hash.

The stored JSON is normalised the way a FHIR server answers it: ``id`` is the
server's opaque id (for a Patient, the patient's id), references that resolve
in the unit or to a stored patient name those ids, and ``meta.versionId`` /
``meta.lastUpdated`` are dropped. The content hash covers that normal form, so the
same content sent twice (even with fresh ``urn:uuid`` fullUrls) changes nothing.

After a unit is stored, each changed patient's ``PatientRow.record`` is rebuilt
from the patient's *active* resources with
:func:`fhir_adapters.fhir_json.records_from_resources`: entered-in-error,
cancelled and merged resources drop out. A ``patient-updated`` job is queued for
each changed patient.

Merges: a Patient whose ``link`` says it ``replaces`` another (HL7 ADT^A40 MRG-1
arrives this way) takes over the prior patient's identifiers, resources,
predictions and every other row that points at it; the prior patient row is
removed. Cancellations: ADT^A11 cancels the admission, ADT^A13 reopens the
discharged visit.

Errors are :class:`~fhir_adapters.errors.IngestError` with located, value-free
issues; a unit that fails leaves nothing behind (it runs in a savepoint).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal
from urllib.parse import parse_qsl

from sqlalchemy import select, update
from sqlalchemy.orm import Session, defer

from fhir_adapters.errors import IngestError, Issue, NotPatientData
from fhir_adapters.fhir_json import (
    records_from_json,
    records_from_resources,
)
from fhir_adapters.hl7v2 import AckCode, ack_code_for, build_ack
from fhir_adapters.hl7v2_parse import parse_fast, read_messages
from fhir_adapters.hl7v2_to_fhir import map_message
from fhir_adapters.record import PatientIdentifier, PatientRecord
from services.patient_store import (
    find_patients,
    identifiers_known,
    identifiers_of,
    link_identifiers,
)
from services.tables import Base, FhirResourceRow, JobRow, PatientRow, PredictionRow

__all__ = [
    "ACTIVE",
    "APPLIED",
    "CANCELLED",
    "ENTERED_IN_ERROR",
    "MERGED",
    "PATIENT_UPDATED",
    "EntryResult",
    "Hl7Result",
    "Incoming",
    "IngestResult",
    "atomic",
    "bundle_items",
    "ingest",
    "ingest_batch",
    "ingest_bundle",
    "ingest_hl7",
    "merge_patients",
    "patient_resource",
    "rebuild_record",
    "refresh_patients",
]

Source = Literal["fhir", "ndjson", "hl7v2", "cds-prefetch"]
Outcome = Literal["created", "updated", "unchanged"]

#: Row status: only active resources enter the patient's record. ``merged``: a prior
#: patient's Patient resource; ``applied``: an HL7 A11/A13 notice applied to the visit it names.
ACTIVE, ENTERED_IN_ERROR, CANCELLED, MERGED = "active", "entered-in-error", "cancelled", "merged"
APPLIED = "applied"
#: The background job queued for every patient whose record changed.
PATIENT_UPDATED = "patient-updated"

#: Bundle types ingested as one all-or-nothing unit; ``batch`` goes entry by entry.
TRANSACTION_LIKE = frozenset({"transaction", "collection", "searchset", "document", "message"})
#: Elements that point at the patient a resource is about (the Patient compartment's usual ones).
_PATIENT_ELEMENTS = ("subject", "patient", "beneficiary")
#: Resource types whose status ``cancelled`` means the thing did not happen.
_CANCELLABLE = frozenset({"Encounter", "Observation", "DiagnosticReport"})
_OPEN_ENCOUNTER = frozenset({"planned", "arrived", "triaged", "in-progress", "onleave"})
_MAX_IDENTITY = 800
_SERVER_ID = re.compile(r"[0-9a-f]{32}\Z")
_CHUNK = 400


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Incoming:
    """One resource of a unit being ingested, with where it sits in the request."""

    resource: Mapping[str, Any]
    #: FHIRPath-like location used in errors, e.g. ``Bundle.entry[3].resource``.
    expr: str
    full_url: str | None = None


@dataclass(frozen=True)
class EntryResult:
    """What happened to one resource."""

    expr: str
    resource_type: str
    outcome: Outcome
    #: The server's id: the patient's opaque id for a Patient, else the row's id.
    id: str
    patient_id: str | None

    @property
    def location(self) -> str:
        return f"{self.resource_type}/{self.id}"


@dataclass
class IngestResult:
    """Per-entry outcomes of one unit, the patients whose records changed, the merges done."""

    entries: list[EntryResult] = field(default_factory=list)
    patients_changed: set[str] = field(default_factory=set)
    #: prior patient id -> surviving patient id
    merged: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        counts = {"created": 0, "updated": 0, "unchanged": 0}
        for entry in self.entries:
            counts[entry.outcome] += 1
        return counts


@dataclass(frozen=True)
class Hl7Result:
    """One HL7 v2 message's answer: the ACK/NAK text, its code and what was stored."""

    ack: str
    code: AckCode
    result: IngestResult | None
    #: Why the message was refused (NAKs only); value-free.
    error: IngestError | None = None


# --------------------------------------------------------------------------- transactions


@contextmanager
def atomic(session: Session) -> Iterator[None]:
    """A savepoint around one unit: when the unit fails it leaves nothing behind.

    pysqlite opens its transaction lazily at the first write, so a SAVEPOINT issued
    first would *be* the outermost transaction and its RELEASE would commit the
    caller's work early; an explicit BEGIN first keeps the caller in charge. It is
    BEGIN IMMEDIATE because a unit reads before it writes: in WAL mode a reader whose
    snapshot another writer (the job worker, the access log) has since moved past
    cannot become a writer and fails at once, where IMMEDIATE waits its turn.
    """
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        dbapi = connection.connection.dbapi_connection
        if dbapi is not None and not getattr(dbapi, "in_transaction", True):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    with session.begin_nested():
        yield


# --------------------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _canonical(resource: Mapping[str, Any]) -> bytes:
    return json.dumps(resource, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _sha256(resource: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(resource)).hexdigest()


def _json_copy(value: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists, scalars): several times faster than deepcopy."""
    if isinstance(value, dict):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_copy(v) for v in value]
    return value


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _patient_identifiers(resource: Mapping[str, Any]) -> tuple[list[PatientIdentifier],
                                                              PatientIdentifier | None]:
    """(identifiers, key) by the PatientRecord rules: system and value, MR-typed first."""
    identifiers: list[PatientIdentifier] = []
    key: PatientIdentifier | None = None
    for ident in _list(resource.get("identifier")):
        if not isinstance(ident, dict):
            continue
        system, value = _str(ident.get("system")), _str(ident.get("value"))
        if system is None or value is None:
            continue
        pid = PatientIdentifier(system, value)
        if pid not in identifiers:
            identifiers.append(pid)
        kind = ident.get("type")
        codings = _list(kind.get("coding")) if isinstance(kind, dict) else []
        if key is None and any(isinstance(c, dict) and c.get("code") == "MR" for c in codings):
            key = pid
    if key is None and identifiers:
        key = identifiers[0]
    return identifiers, key


def _business_identity(resource: Mapping[str, Any]) -> str | None:
    for ident in [*_list(resource.get("identifier")), resource.get("masterIdentifier")]:
        if isinstance(ident, dict) and _str(ident.get("value")):
            return f"{_str(ident.get('system')) or ''}|{ident['value']}"
    return None


def _token(concept: Any) -> str:
    """A CodeableConcept (or Coding) as ``system|code``, else its text."""
    if not isinstance(concept, dict):
        return ""
    codings = _list(concept.get("coding")) or [concept]
    for coding in codings:
        if isinstance(coding, dict) and _str(coding.get("code")):
            return f"{_str(coding.get('system')) or ''}|{coding['code']}"
    return _str(concept.get("text")) or ""


def _hl7_natural_key(resource: Mapping[str, Any], patient_id: str | None) -> str | None:
    """Patient + what + when for HL7 v2 results, notes and visits that carry no identifier."""
    if patient_id is None:
        return None
    rt = resource.get("resourceType")
    if rt == "Observation":
        what, when = _token(resource.get("code")), _str(resource.get("effectiveDateTime"))
    elif rt == "DocumentReference":
        context = resource.get("context")
        period = context.get("period") if isinstance(context, dict) else None
        what = _token(resource.get("type"))
        when = _str(resource.get("date")) or (
            _str(period.get("start")) if isinstance(period, dict) else None)
    elif rt == "Encounter":
        period = resource.get("period")
        what = _token(resource.get("class"))
        when = _str(period.get("start")) if isinstance(period, dict) else None
    else:
        return None
    if when is None:
        return None  # without a time a natural key would lump distinct events together
    return f"hl7v2|{patient_id}|{rt}|{what}|{when}"


def _fit(identity: str) -> str:
    if len(identity) <= _MAX_IDENTITY:
        return identity
    return "sha256:" + hashlib.sha256(identity.encode("utf-8")).hexdigest()


def _status_of(resource: Mapping[str, Any]) -> str:
    status = resource.get("status")
    if status == "entered-in-error":
        return ENTERED_IN_ERROR
    verification = resource.get("verificationStatus")  # Condition, AllergyIntolerance
    if _token(verification).endswith("|entered-in-error"):
        return ENTERED_IN_ERROR
    if status == "cancelled" and resource.get("resourceType") in _CANCELLABLE:
        return CANCELLED
    return ACTIVE


def _strip_meta(resource: dict[str, Any]) -> None:
    meta = resource.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if meta:
            resource["meta"] = meta
        else:
            resource.pop("meta")


def _rewrite_references(node: Any, rewrite: Any) -> None:
    """Apply ``rewrite(ref) -> str | None`` to every ``reference`` string, in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                new = rewrite(value)
                if new is not None:
                    node[key] = new
            elif isinstance(value, dict | list):
                _rewrite_references(value, rewrite)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict | list):
                _rewrite_references(value, rewrite)


def _relative(ref: str) -> tuple[str, str] | None:
    """``(type, id)`` of a literal reference, relative or absolute, without _history."""
    if ref.startswith(("#", "urn:")) or "?" in ref:
        return None
    parts = ref.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-1]:
        return parts[-2], parts[-1]
    return None


def _conditional_identifier(ref: str) -> tuple[str, str, str] | None:
    """``(type, system, value)`` of ``Type?identifier=system|value``."""
    rtype, sep, query = ref.partition("?")
    if not sep:
        return None
    params = parse_qsl(query)
    if len(params) != 1 or params[0][0] != "identifier" or "|" not in params[0][1]:
        return None
    system, _, value = params[0][1].partition("|")
    return rtype.rsplit("/", 1)[-1], system, value


# --------------------------------------------------------------------------- the unit


class _WouldChange(Exception):
    """A read-only pass found something to store."""


class _Unit:
    """One unit of ingest (a Bundle, an NDJSON file, an HL7 message) against the store.

    With ``dry`` the unit only reads: it raises :class:`_WouldChange` at the first
    thing it would write, and otherwise ends with every entry ``unchanged``.
    """

    def __init__(self, session: Session, items: Sequence[Incoming], source: Source,
                 event: str | None, *, dry: bool = False) -> None:
        self.session = session
        self.dry = dry
        self.items = list(items)
        self.source = source
        self.event = event
        self.issues: list[Issue] = []
        self.result = IngestResult()
        self.by_url: dict[str, int] = {}
        self.by_type_id: dict[tuple[str, str], int] = {}
        self.by_identifier: dict[tuple[str, str, str], set[int]] | None = None
        self.patient_of: dict[int, str | None] = {}
        self.server_id: dict[int, str] = {}

    # ---------------------------------------------------------------- issues

    def issue(self, n: int, path: str, code: Any, message: str) -> None:
        item = self.items[n]
        expr = f"{item.expr}.{path}" if path else item.expr
        if self.source == "hl7v2" and item.resource.get("resourceType") == "Patient":
            self.issues.append(Issue(code, message, segment="PID", field=3))
        else:
            self.issues.append(Issue(code, message, expr))

    def check(self) -> None:
        if self.issues:
            raise IngestError(self.issues)

    # ---------------------------------------------------------------- run

    def run(self) -> IngestResult:
        for n, item in enumerate(self.items):
            rt, rid = item.resource.get("resourceType"), item.resource.get("id")
            if item.full_url:
                self.by_url[item.full_url] = n
            if isinstance(rt, str) and isinstance(rid, str):
                self.by_type_id.setdefault((rt, rid), n)
        self.resolve_patients()
        self.check()
        self.attribute()
        self.check()
        identities = self.identities()
        rows = self.existing_rows(identities)
        assigned: dict[tuple[str, str], str] = {}
        for n, identity in enumerate(identities):
            if self.rt(n) == "Patient":
                self.server_id[n] = self.patient_of[n] or ""
                continue
            # The same resource twice in one unit is one row, with one id.
            row = rows.get((self.rt(n), identity))
            self.server_id[n] = assigned.setdefault(
                (self.rt(n), identity), row.id if row is not None else _new_id())
        for n, identity in enumerate(identities):
            self.store(n, identity, rows)
        if self.dry:
            if any(self.rt(n) == "Patient" and item.resource.get("link")
                   for n, item in enumerate(self.items)):
                raise _WouldChange  # merges are left to the writing pass
            return self.result
        self.session.flush()
        self.merges()
        return self.result

    def rt(self, n: int) -> str:
        return str(self.items[n].resource["resourceType"])

    # ---------------------------------------------------------------- patients

    def resolve_patients(self) -> None:
        for n, item in enumerate(self.items):
            if self.rt(n) != "Patient":
                continue
            identifiers, key = _patient_identifiers(item.resource)
            if key is None:
                self.issue(n, "identifier", "required",
                           "a stored Patient needs a business identifier with both system and "
                           "value; without one it cannot be linked to its data safely")
                continue
            found = find_patients(self.session, identifiers)
            if len(found) > 1:
                self.issue(n, "identifier", "processing",
                           f"the identifiers of this Patient name {len(found)} different stored "
                           "patients; merge them first (ADT^A40, or Patient.link 'replaces')")
                continue
            if found:
                patient_id = found.pop()
                row = self.session.get(PatientRow, patient_id)
                assert row is not None
                if row.resource_id is None or (row.identifier_system, row.identifier_value) == (
                        key.system, key.value):
                    resource_id = _str(item.resource.get("id")) or row.resource_id
                    if self.dry and resource_id != row.resource_id:
                        raise _WouldChange
                    row.resource_id = resource_id
            elif self.dry:
                raise _WouldChange
            else:
                row = PatientRow(identifier_system=key.system, identifier_value=key.value,
                                 resource_id=_str(item.resource.get("id")), record={})
                self.session.add(row)
                self.session.flush()
                patient_id = row.id
            if self.dry:
                if not identifiers_known(self.session, identifiers):
                    raise _WouldChange
            else:
                link_identifiers(self.session, patient_id, identifiers, steal=False)
            self.patient_of[n] = patient_id

    def resolve_in_unit(self, ref: str) -> int | None:
        if ref in self.by_url:
            return self.by_url[ref]
        cond = _conditional_identifier(ref)
        if cond is not None:
            if self.by_identifier is None:
                # Built on first use: Synthea names every Practitioner this way.
                self.by_identifier = {}
                for n, item in enumerate(self.items):
                    for i in _list(item.resource.get("identifier")):
                        if isinstance(i, dict) and _str(i.get("value")):
                            self.by_identifier.setdefault(
                                (self.rt(n), _str(i.get("system")) or "", i["value"]),
                                set()).add(n)
            hits = self.by_identifier.get(cond, set())
            return next(iter(hits)) if len(hits) == 1 else None
        if "://" in ref:
            base = ref.split("/_history/")[0]
            if base in self.by_url:
                return self.by_url[base]
        rel = _relative(ref)
        return self.by_type_id.get(rel) if rel is not None else None

    def stored_patient(self, ref: str) -> str | None:
        """The opaque id of the stored patient ``ref`` names, or None."""
        cond = _conditional_identifier(ref)
        if cond is not None:
            rtype, system, value = cond
            if rtype != "Patient" or not system or not value:
                return None
            found = find_patients(self.session, [PatientIdentifier(system, value)])
            if found:
                return found.pop() if len(found) == 1 else None
            # A conditional reference names the patient by business key: that is enough
            # to file the data now; demographics follow when the Patient arrives.
            if self.dry:
                raise _WouldChange
            row = PatientRow(identifier_system=system, identifier_value=value, record={})
            self.session.add(row)
            self.session.flush()
            link_identifiers(self.session, row.id, [PatientIdentifier(system, value)])
            return row.id
        rel = _relative(ref)
        if rel is None or rel[0] != "Patient":
            return None
        if self.session.get(PatientRow, rel[1]) is not None:
            return rel[1]
        by_sender = list(self.session.scalars(
            select(PatientRow.id).where(PatientRow.resource_id == rel[1]).limit(2)))
        return by_sender[0] if len(by_sender) == 1 else None

    def attribute(self) -> None:
        """Which patient each non-Patient resource belongs to (None: not patient data)."""
        for n, item in enumerate(self.items):
            if self.rt(n) == "Patient":
                continue
            self.patient_of[n] = None
            for element in _PATIENT_ELEMENTS:
                target = item.resource.get(element)
                ref = target.get("reference") if isinstance(target, dict) else None
                if not isinstance(ref, str) or not ref:
                    continue
                in_unit = self.resolve_in_unit(ref)
                if in_unit is not None:
                    if self.rt(in_unit) == "Patient":
                        self.patient_of[n] = self.patient_of.get(in_unit)
                    break
                names_patient = (_conditional_identifier(ref) or ("",))[0] == "Patient" or (
                    (_relative(ref) or ("",))[0] == "Patient")
                if not names_patient:
                    continue  # a Group, Device or Location subject: not one patient's data
                patient_id = self.stored_patient(ref)
                if patient_id is None:
                    self.issue(n, f"{element}.reference", "not-found",
                               "does not resolve to a Patient in this request or in the store")
                self.patient_of[n] = patient_id
                break

    # ---------------------------------------------------------------- identity

    def identities(self) -> list[str]:
        identities: list[str] = []
        seen: dict[tuple[str, str], int] = {}
        for n, item in enumerate(self.items):
            r = item.resource
            identity: str | None
            if self.rt(n) == "Patient":
                _, key = _patient_identifiers(r)
                identity = str(key)
            else:
                identity = _business_identity(r)
                if identity is None and self.source == "hl7v2":
                    identity = _hl7_natural_key(r, self.patient_of.get(n))
                    if identity is not None:
                        # Two results with one code and time in one message stay apart.
                        count = seen.get((self.rt(n), identity), 0) + 1
                        seen[(self.rt(n), identity)] = count
                        identity = identity if count == 1 else f"{identity}#{count}"
                if identity is None and _str(r.get("id")):
                    identity = f"id:{r['id']}"
                    if self.source == "hl7v2":
                        # HL7 ids derive from MSH-10, which careless senders reuse: scope
                        # them to the patient so two patients' visits never share a row.
                        identity = f"hl7v2|{self.patient_of.get(n)}|{identity}"
                if identity is None and item.full_url:
                    identity = item.full_url
                if identity is None:
                    identity = "sha256:" + _sha256(r)
            identities.append(_fit(identity))
        return identities

    def existing_rows(self, identities: list[str]) -> dict[tuple[str, str], FhirResourceRow]:
        wanted: dict[str, set[str]] = {}
        for n, identity in enumerate(identities):
            wanted.setdefault(self.rt(n), set()).add(identity)
        rows: dict[tuple[str, str], FhirResourceRow] = {}
        for rt, ids in wanted.items():
            ordered = sorted(ids)
            for start in range(0, len(ordered), _CHUNK):
                # The stored JSON is loaded only for a row that changes: a resend of
                # unchanged data (every CDS hook's prefetch) compares hashes only.
                for row in self.session.scalars(select(FhirResourceRow).options(
                        defer(FhirResourceRow.resource)).where(
                        FhirResourceRow.resource_type == rt,
                        FhirResourceRow.identity.in_(ordered[start:start + _CHUNK]))):
                    rows[(rt, row.identity)] = row
        return rows

    # ---------------------------------------------------------------- storing

    def normalise(self, n: int) -> dict[str, Any]:
        resource = _json_copy(dict(self.items[n].resource))
        resource["id"] = self.server_id[n]
        _strip_meta(resource)

        def rewrite(ref: str) -> str | None:
            if ref.startswith("#"):
                return None
            target = self.resolve_in_unit(ref)
            if target is not None:
                return f"{self.rt(target)}/{self.server_id[target]}"
            rel, cond = _relative(ref), _conditional_identifier(ref)
            if (rel and rel[0] == "Patient") or (cond and cond[0] == "Patient"):
                patient_id = self.stored_patient(ref)
                return f"Patient/{patient_id}" if patient_id else None
            return None

        for key, value in resource.items():
            if key not in ("id", "text") and isinstance(value, dict | list):
                _rewrite_references(value, rewrite)
        if self.source == "hl7v2" and self.event == "A13" and self.rt(n) == "Encounter":
            # A13 cancels the discharge: the visit is under way again, with no end.
            resource["status"] = "in-progress"
            if isinstance(resource.get("period"), dict):
                resource["period"].pop("end", None)
        return resource

    def store(self, n: int, identity: str, rows: dict[tuple[str, str], FhirResourceRow]) -> None:
        rt, item = self.rt(n), self.items[n]
        patient_id = self.patient_of.get(n)
        resource = self.normalise(n)
        digest, status = _sha256(resource), _status_of(resource)
        row = rows.get((rt, identity))
        if row is not None and row.content_sha256 == digest and row.patient_id == patient_id \
                and row.status in (status, APPLIED):
            self.result.entries.append(EntryResult(item.expr, rt, "unchanged",
                                                   self.server_id[n], patient_id))
            return
        if self.dry:
            raise _WouldChange
        if row is None and rt == "Encounter" and self.source == "hl7v2" and patient_id:
            target = self.cancellation_target(patient_id)
            if target is not None:
                self.apply_cancellation(n, target)
                # The notice is kept (inactive) under its own identity, so a resend finds
                # it and changes nothing instead of cancelling the next visit back.
                rows[(rt, identity)] = notice = FhirResourceRow(
                    id=self.server_id[n], resource_type=rt, identity=identity,
                    patient_id=patient_id, content_sha256=digest, status=APPLIED,
                    resource=resource, source=self.source, updated_at=_now())
                self.session.add(notice)
                return
        outcome: Outcome = "updated"
        if row is None:
            row = FhirResourceRow(id=self.server_id[n] if rt != "Patient" else _new_id(),
                                  resource_type=rt, identity=identity)
            self.session.add(row)
            rows[(rt, identity)] = row
            outcome = "created"
        elif row.patient_id is not None and row.patient_id != patient_id:
            self.result.patients_changed.add(row.patient_id)
        row.patient_id = patient_id
        row.content_sha256 = digest
        row.status = status
        row.resource = resource
        row.source = self.source
        row.updated_at = _now()
        if patient_id is not None:
            self.result.patients_changed.add(patient_id)
        self.result.entries.append(EntryResult(item.expr, rt, outcome, self.server_id[n],
                                               patient_id))

    def cancellation_target(self, patient_id: str) -> FhirResourceRow | None:
        """The visit an ADT^A11/A13 without a matching visit number refers to: the latest."""
        if self.event not in ("A11", "A13"):
            return None
        wanted = _OPEN_ENCOUNTER if self.event == "A11" else {"finished"}
        candidates = [r for r in self.session.scalars(select(FhirResourceRow).where(
            FhirResourceRow.patient_id == patient_id, FhirResourceRow.resource_type == "Encounter",
            FhirResourceRow.status == ACTIVE)) if r.resource.get("status") in wanted]
        if not candidates:
            return None

        def started(row: FhirResourceRow) -> str:
            period = row.resource.get("period")
            return str(period.get("start", "")) if isinstance(period, dict) else ""

        return max(candidates, key=lambda r: (started(r), r.updated_at.isoformat()))

    def apply_cancellation(self, n: int, row: FhirResourceRow) -> None:
        resource = copy.deepcopy(row.resource)
        if self.event == "A11":
            resource["status"] = "cancelled"
        else:
            resource["status"] = "in-progress"
            if isinstance(resource.get("period"), dict):
                resource["period"].pop("end", None)
        row.resource = resource
        row.content_sha256 = _sha256(resource)
        row.status = _status_of(resource)
        row.updated_at = _now()
        assert row.patient_id is not None
        self.result.patients_changed.add(row.patient_id)
        self.result.entries.append(EntryResult(self.items[n].expr, "Encounter", "updated",
                                               row.id, row.patient_id))

    # ---------------------------------------------------------------- merges

    def merges(self) -> None:
        for n, item in enumerate(self.items):
            if self.rt(n) != "Patient" or self.patient_of.get(n) is None:
                continue
            this = self.patient_of[n]
            assert this is not None
            for link in _list(item.resource.get("link")):
                if not isinstance(link, dict) or link.get("type") not in ("replaces",
                                                                         "replaced-by"):
                    continue
                other = self.linked_patient(link.get("other"), this)
                if other is None or other == this:
                    # An unknown prior identifier was linked to this patient instead.
                    self.result.patients_changed.add(this)
                    continue
                prior, survivor = (other, this) if link["type"] == "replaces" else (this, other)
                if self.session.get(PatientRow, prior) is None:
                    continue
                merge_patients(self.session, prior, survivor)
                self.result.merged[prior] = survivor
                self.result.patients_changed.discard(prior)
                self.result.patients_changed.add(survivor)
                if this == prior:
                    return  # this patient is gone; its other links mean nothing now

    def linked_patient(self, other: Any, this: str) -> str | None:
        """The stored patient ``Patient.link.other`` names; an unknown identifier joins ``this``."""
        if not isinstance(other, dict):
            return None
        ident = other.get("identifier")
        if isinstance(ident, dict) and _str(ident.get("system")) and _str(ident.get("value")):
            pid = PatientIdentifier(ident["system"], ident["value"])
            found = find_patients(self.session, [pid])
            if not found:
                # The prior record never reached us: its identifier now names the survivor,
                # so later messages that still use it find the right patient.
                link_identifiers(self.session, this, [pid])
                return None
            return found.pop() if len(found) == 1 else None
        ref = other.get("reference")
        if isinstance(ref, str):
            target = self.resolve_in_unit(ref)
            if target is not None:
                return self.patient_of.get(target)
            return self.stored_patient(ref)
        return None


def _new_id() -> str:
    return uuid.uuid4().hex


def _enqueue_patient_updated(session: Session, patient_id: str) -> None:
    from services.jobs import enqueue_patient_updated

    enqueue_patient_updated(session, patient_id)


# --------------------------------------------------------------------------- merge


def merge_patients(session: Session, prior: str, survivor: str) -> None:
    """Fold patient ``prior`` into ``survivor`` and remove ``prior``'s row.

    Every row that points at ``prior`` (identifiers, resources, predictions and any
    other table with a foreign key to ``patients.id``) is repointed; the prior
    patient's own Patient resources are marked ``merged`` so the survivor's
    demographics stand, and references inside the moved JSON name the survivor.
    """
    if prior == survivor:
        return
    session.flush()
    moved = list(session.scalars(select(FhirResourceRow).where(
        FhirResourceRow.patient_id == prior)))
    predictions = list(session.scalars(select(PredictionRow).where(
        PredictionRow.patient_id == prior)))
    old, new = f"Patient/{prior}", f"Patient/{survivor}"

    def repoint(ref: str) -> str | None:
        return new if ref == old else None

    taken = set(session.scalars(select(FhirResourceRow.identity).where(
        FhirResourceRow.patient_id == survivor)))
    for row in moved:
        resource = copy.deepcopy(row.resource)
        _rewrite_references(resource, repoint)
        if row.resource_type == "Patient":
            resource["id"] = survivor
            row.status = MERGED
        row.resource = resource
        row.content_sha256 = _sha256(resource)
        row.patient_id = survivor
        # HL7 natural keys name the patient; keep them findable under the survivor.
        prefix = f"hl7v2|{prior}|"
        if row.identity.startswith(prefix):
            renamed = f"hl7v2|{survivor}|" + row.identity[len(prefix):]
            if renamed not in taken:
                row.identity = renamed
    for prediction in predictions:
        prediction.patient_id = survivor
        if prediction.risk_assessment:
            assessment = copy.deepcopy(prediction.risk_assessment)
            _rewrite_references(assessment, repoint)
            prediction.risk_assessment = assessment
    session.flush()
    # Whatever else points at the prior patient (tables other features add) follows too.
    for table in Base.metadata.sorted_tables:
        if table.name in ("patients", FhirResourceRow.__tablename__,
                          PredictionRow.__tablename__):
            continue
        for fk in table.foreign_keys:
            if fk.column.table.name == "patients" and fk.column.name == "id":
                session.execute(update(table).where(fk.parent == prior)
                                .values({fk.parent.name: survivor}))
    # Queued work for the prior patient would only fail on a missing patient now; the
    # survivor gets its own patient-updated job when the merging unit finishes.
    for job in session.scalars(select(JobRow).where(JobRow.kind == PATIENT_UPDATED,
                                                    JobRow.status == "queued")):
        if job.payload.get("patient_id") == prior:
            job.status = "superseded"
            job.finished_at = _now()
    session.flush()
    session.expire_all()
    patient = session.get(PatientRow, prior)
    if patient is not None:
        session.delete(patient)
    session.flush()


# --------------------------------------------------------------------------- records


def patient_resource(session: Session, patient_id: str) -> dict[str, Any] | None:
    """The patient's current Patient resource (its id is the opaque patient id), or None."""
    patient = session.get(PatientRow, patient_id)
    if patient is None:
        return None
    rows = _patient_rows(session, patient)
    if rows:
        return copy.deepcopy(rows[0].resource)
    return {"resourceType": "Patient", "id": patient_id, "identifier": [
        {"system": i.system, "value": i.value} for i in identifiers_of(session, patient_id)]}


def _patient_rows(session: Session, patient: PatientRow) -> list[FhirResourceRow]:
    """Active Patient resources, the one carrying the patient's key first, then newest."""
    rows = list(session.scalars(select(FhirResourceRow).where(
        FhirResourceRow.patient_id == patient.id, FhirResourceRow.resource_type == "Patient",
        FhirResourceRow.status == ACTIVE)))
    key = f"{patient.identifier_system}|{patient.identifier_value}"
    rows.sort(key=lambda r: r.updated_at.isoformat(), reverse=True)
    rows.sort(key=lambda r: r.identity != key)
    return rows


def rebuild_record(session: Session, patient_id: str) -> PatientRecord:
    """Rebuild ``PatientRow.record`` from the patient's active resources, and return it."""
    patient = session.get(PatientRow, patient_id)
    if patient is None:
        raise KeyError(f"no patient with id {patient_id!r}")
    rows = list(session.scalars(select(FhirResourceRow).where(
        FhirResourceRow.patient_id == patient_id, FhirResourceRow.status == ACTIVE,
        FhirResourceRow.resource_type != "Patient")))
    resources: list[dict[str, Any]] = [r.resource for r in _patient_rows(session, patient)]
    if not resources:
        resources.append({"resourceType": "Patient", "id": patient_id})
    resources.extend(r.resource for r in rows)
    # Resources the record reads through references (a Medication's code, a payer's
    # name) are not the patient's own: fetch the stored ones they name.
    have = {r.id for r in rows}
    wanted: set[str] = set()

    def collect(ref: str) -> None:
        rel = _relative(ref)
        if rel is not None and _SERVER_ID.match(rel[1]) and rel[1] not in have:
            wanted.add(rel[1])

    for r in rows:
        _rewrite_references(r.resource, lambda ref: collect(ref))
    wanted.discard(patient_id)
    if wanted:
        ordered = sorted(wanted)
        for start in range(0, len(ordered), _CHUNK):
            resources.extend(r.resource for r in session.scalars(select(FhirResourceRow).where(
                FhirResourceRow.id.in_(ordered[start:start + _CHUNK]),
                FhirResourceRow.patient_id.is_(None), FhirResourceRow.status == ACTIVE)))
    records = records_from_resources(resources)
    record = records[0]
    for other in records[1:]:
        record.merge(other)
    record.key = PatientIdentifier(patient.identifier_system, patient.identifier_value)
    record.identifiers = tuple(sorted({record.key, *identifiers_of(session, patient_id)}))
    record.resource_id = patient.resource_id
    patient.record = record.to_json()
    patient.updated_at = _now()
    return record


# --------------------------------------------------------------------------- units


def ingest(session: Session, items: Sequence[Incoming], *, source: Source,
           event: str | None = None, refresh: bool = True) -> IngestResult:
    """Store one unit of already validated resources, all or nothing.

    ``event`` is the HL7 v2 trigger event (A11 and A13 change what the unit means).
    With ``refresh`` (the default) the changed patients' records are rebuilt and their
    jobs queued; a caller storing many units in one transaction passes False and calls
    :func:`refresh_patients` once at the end.
    """
    for n, item in enumerate(items):
        if not isinstance(item.resource, Mapping) or not isinstance(
                item.resource.get("resourceType"), str):
            raise IngestError(Issue("structure", "expected a FHIR resource (a JSON object with "
                                    "a resourceType)", item.expr or f"resource {n}"))
    # A resend of stored data (every CDS hook's prefetch, a replayed HL7 feed) is found
    # unchanged by reads alone, without taking the database's write lock.
    # Its located errors are those the writing pass would raise: it read the same state.
    with suppress(_WouldChange):
        return _Unit(session, items, source, event, dry=True).run()
    with atomic(session):
        result = _Unit(session, items, source, event).run()
        if refresh:
            refresh_patients(session, result.patients_changed)
    return result


def refresh_patients(session: Session, patient_ids: set[str]) -> None:
    """Rebuild each patient's record and queue its ``patient-updated`` job.

    Patients merged away meanwhile are skipped: their survivor is in the set.
    """
    for patient_id in sorted(patient_ids):
        if session.get(PatientRow, patient_id) is not None:
            rebuild_record(session, patient_id)
            _enqueue_patient_updated(session, patient_id)


def _validate(check: Callable[[], object]) -> None:
    """Run a fhir_adapters parse for its checks; no patient data is fine for the store."""
    with suppress(NotPatientData):
        check()


def bundle_items(bundle: Mapping[str, Any]) -> tuple[list[Incoming], list[Issue]]:
    """A Bundle's entries as Incoming items, with issues for entries that cannot be ingested."""
    items: list[Incoming] = []
    issues: list[Issue] = []
    batchy = bundle.get("type") in ("transaction", "batch")
    for i, entry in enumerate(_list(bundle.get("entry"))):
        where = f"Bundle.entry[{i}]"
        if not isinstance(entry, dict):
            continue  # records_from_json reports it
        request = entry.get("request")
        method = request.get("method") if isinstance(request, dict) else None
        if entry.get("resource") is None or (batchy and method not in (None, "POST", "PUT")):
            issues.append(Issue("not-supported", "only entries that carry a resource (POST or "
                                "PUT) are ingested; mark data entered-in-error instead of "
                                "deleting it", f"{where}.request.method" if method else where))
            continue
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue
        full_url = entry.get("fullUrl")
        items.append(Incoming(entry["resource"], f"{where}.resource",
                              full_url if isinstance(full_url, str) else None))
    return items, issues


def ingest_bundle(session: Session, bundle: Mapping[str, Any], *, raw: bytes | str | None = None,
                  source: Source = "fhir") -> IngestResult:
    """A transaction (or collection, searchset, document, message) Bundle, all or nothing.

    Raises
    ------
    IngestError
        Every located problem in the Bundle; nothing is stored.
    """
    if bundle.get("resourceType") != "Bundle":
        raise IngestError(Issue("not-supported", "expected a Bundle", "resourceType"))
    if bundle.get("type") == "batch":
        raise IngestError(Issue("not-supported", "a batch Bundle is ingested entry by entry: "
                                "use ingest_batch", "Bundle.type"))
    _validate(lambda: records_from_json(raw if raw is not None else bundle))
    items, issues = bundle_items(bundle)
    if issues:
        raise IngestError(issues)
    return ingest(session, items, source=source)


def ingest_batch(session: Session, bundle: Mapping[str, Any], *, source: Source = "fhir"
                 ) -> list[EntryResult | IngestError]:
    """A batch Bundle, entry by entry: each entry stored or refused on its own."""
    answers: list[EntryResult | IngestError] = []
    entries = _list(bundle.get("entry"))
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        try:
            if not isinstance(entry, dict):
                raise IngestError(Issue("structure", "a Bundle entry must be an object", where))
            items, issues = bundle_items({"type": "batch", "entry": [entry]})
            if issues:
                raise IngestError([_relocate(x, "Bundle.entry[0]", where) for x in issues])
            item = items[0]
            located = Incoming(item.resource, f"{where}.resource", item.full_url)
            rt = item.resource.get("resourceType")
            try:
                _validate(partial(records_from_json, dict(item.resource)))
            except IngestError as exc:
                prefix = rt if isinstance(rt, str) else ""
                raise type(exc)([_relocate(x, prefix, located.expr) for x in exc.issues]
                                ) from None
            result = ingest(session, [located], source=source)
            answers.append(result.entries[0])
        except IngestError as exc:
            answers.append(exc)
    return answers


def _relocate(issue: Issue, old: str, new: str) -> Issue:
    expr = issue.expression
    if expr is not None and old and (expr == old or expr.startswith(old + ".")):
        expr = new + expr[len(old):]
    elif expr is None or not old:
        expr = new if expr is None else f"{new}.{expr}"
    return Issue(issue.code, issue.diagnostics, expr, issue.severity, issue.segment,
                 issue.segment_index, issue.field)


def ingest_hl7(session: Session, data: bytes | str) -> list[Hl7Result]:
    """Every HL7 v2 message in ``data``, each stored on its own and answered by an ACK/NAK.

    A stored message is acknowledged AA, with one ERR (severity W) per element that
    was nulled or dropped on the way (docs/ingest-policy.md).
    """
    try:
        messages = read_messages(data)
    except IngestError as exc:
        return [Hl7Result(build_ack(data, "AR", exc), "AR", None, exc)]
    answers: list[Hl7Result] = []
    changed: set[str] = set()
    for message in messages:
        try:
            segments = parse_fast(message.text)
            # message_index=1 for every message: a message resent on its own, outside the
            # batch it first came in, must get the same resource ids.
            mapped = map_message(segments, message_index=1)
            resources = mapped.resources
            event = segments[0].value(9, comp=2).strip() or None
            items = [Incoming(r, f"{r['resourceType']}[{n}]") for n, r in enumerate(resources)]
            _validate(partial(records_from_resources, resources))
            # Records are rebuilt once at the end, not after every message of a feed.
            result = ingest(session, items, source="hl7v2", event=event, refresh=False)
            changed |= result.patients_changed
            warnings = [*message.warnings, *mapped.warnings]
            answers.append(Hl7Result(build_ack(segments, "AA", warnings), "AA", result))
        except IngestError as exc:
            code = ack_code_for(exc)
            answers.append(Hl7Result(build_ack(message.text, code, exc), code, None, exc))
    refresh_patients(session, changed)
    return answers
