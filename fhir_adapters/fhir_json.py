"""FHIR R4 JSON to PatientRecord: the fast path.

Plain ``json`` and dict walking, no pydantic, so bulk ingest stays cheap. The
checks that decide whether a file is usable still run here: R4 required
elements of the resources we map, references that must resolve inside the file,
dates that parse and are not in the future. A file with any problem is rejected
whole (an :class:`~fhir_adapters.errors.IngestError` listing every located
issue); nothing is half-ingested. ``strict=True`` adds full R4 validation with
``fhir.resources`` (see :mod:`fhir_adapters.fhir_strict`).

Messages never echo patient values: they name the element and the rule.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from fhir_adapters.errors import IngestError, Issue, IssueCode, NotPatientData
from fhir_adapters.record import (
    Coding,
    Condition,
    Demographics,
    Encounter,
    ImagingSeriesRef,
    ImagingStudyRef,
    Medication,
    Note,
    Observation,
    Outcome,
    PatientIdentifier,
    PatientRecord,
)

__all__ = [
    "MAPPED_RESOURCE_TYPES",
    "R4_RESOURCE_TYPES",
    "parse_fhir_date",
    "parse_fhir_datetime",
    "records_from_json",
    "records_from_ndjson",
    "records_from_resources",
]

LOINC = "http://loinc.org"
US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
GENDER_IDENTITY = "http://hl7.org/fhir/StructureDefinition/patient-genderIdentity"

# A word list reads better than 146 quoted names.
_R4_TYPE_NAMES = """
Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice
Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
ObservationDefinition OperationDefinition OperationOutcome Organization OrganizationAffiliation
Parameters Patient PaymentNotice PaymentReconciliation Person PlanDefinition Practitioner
PractitionerRole Procedure Provenance Questionnaire QuestionnaireResponse RelatedPerson
RequestGroup ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject
RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot Specimen
SpecimenDefinition StructureDefinition StructureMap Subscription Substance
SubstanceNucleicAcid SubstancePolymer SubstanceProtein SubstanceReferenceInformation
SubstanceSourceMaterial SubstanceSpecification SupplyDelivery SupplyRequest Task
TerminologyCapabilities TestReport TestScript ValueSet VerificationResult VisionPrescription
"""
#: Every resource type of FHIR R4 (4.0.1).
R4_RESOURCE_TYPES = frozenset(_R4_TYPE_NAMES.split())

#: Resource types that become part of a PatientRecord.
MAPPED_RESOURCE_TYPES = frozenset({
    "Patient", "Observation", "Condition", "MedicationRequest", "MedicationStatement",
    "MedicationAdministration", "Encounter", "ImagingStudy", "DocumentReference",
    "DiagnosticReport", "Coverage",
})

#: The element that points at the patient, per mapped type.
_SUBJECT = {
    "Observation": "subject", "Condition": "subject", "MedicationRequest": "subject",
    "MedicationStatement": "subject", "MedicationAdministration": "subject",
    "Encounter": "subject", "ImagingStudy": "subject", "DocumentReference": "subject",
    "DiagnosticReport": "subject", "Coverage": "beneficiary",
}

#: R4 elements with cardinality 1..1 or 1..* on the mapped types ("x" = a choice type).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "Observation": ("status", "code"),
    "Condition": ("subject",),
    "MedicationRequest": ("status", "intent", "medication[x]", "subject"),
    "MedicationStatement": ("status", "medication[x]", "subject"),
    "MedicationAdministration": ("status", "medication[x]", "subject", "effective[x]"),
    "Encounter": ("status", "class"),
    "ImagingStudy": ("status", "subject"),
    "DocumentReference": ("status", "content"),
    "DiagnosticReport": ("status", "code"),
    "Coverage": ("status", "beneficiary", "payor"),
}

_SUPPORTED_BUNDLE_TYPES = frozenset(
    {"transaction", "batch", "collection", "searchset", "document", "message"}
)
_ALL_BUNDLE_TYPES = _SUPPORTED_BUNDLE_TYPES | {
    "history", "transaction-response", "batch-response"
}

#: Clock skew and time zones: a date "today" somewhere is not yet today in UTC.
_FUTURE_SLACK = timedelta(days=1)
#: Cap on issues per file, so a systematically broken export stays readable.
_MAX_ISSUES = 50

_DATETIME_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_DATE_RE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_WS_RE = re.compile(r"\s+")
_URN_REF_RE = re.compile(r'"reference"\s*:\s*"(urn:(?:uuid|oid):[^"\\]*)"')
_URN_REF_START_RE = re.compile(r'"reference"\s*:\s*"urn:(?:uuid|oid):')
_HASH_REF_RE = re.compile(r'"reference"\s*:\s*"#')


# --------------------------------------------------------------------------- dates


@lru_cache(maxsize=16384)
def parse_fhir_datetime(value: str) -> datetime:
    """Parse a FHIR date, dateTime or instant to an aware UTC datetime.

    Naive and date-only values are taken as UTC; partial dates ("2019",
    "2019-03") mean the start of that period.

    Raises
    ------
    ValueError
        When ``value`` is not a FHIR date/dateTime/instant.
    """
    m = _DATETIME_RE.fullmatch(value)
    if m is None:
        raise ValueError("not a FHIR date, dateTime or instant")
    year, month, day, hour, minute, second, frac, tz = m.groups()
    micro = int((frac[1:] + "000000")[:6]) if frac else 0
    # FHIR allows a leap second (":60"); datetime does not.
    sec = min(int(second), 59) if second else 0
    when = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0),
                    int(minute or 0), sec, micro, tzinfo=UTC)
    if tz and tz != "Z":
        offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
        when = when - offset if tz[0] == "+" else when + offset
    return when


@lru_cache(maxsize=4096)
def parse_fhir_date(value: str) -> date:
    """Parse a FHIR date ("2019", "2019-03", "2019-03-07") to the first day it covers."""
    m = _DATE_RE.fullmatch(value)
    if m is None:
        raise ValueError("not a FHIR date")
    year, month, day = m.groups()
    return date(int(year), int(month or 1), int(day or 1))


# --------------------------------------------------------------------------- parsing


def _as_text(data: bytes | str, label: str | None = None) -> str:
    """Input as text; IngestError when it is empty or not UTF-8."""
    prefix = f"{label}: " if label else ""
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise IngestError(Issue(
                "structure", f"{prefix}not UTF-8 text (invalid byte at offset {e.start}); "
                "FHIR JSON must be UTF-8")) from None
    else:
        text = data.removeprefix("\ufeff")
    if not text.strip():
        raise IngestError(Issue("structure", f"{prefix}empty input: expected FHIR JSON"))
    return text


def _load_json(data: bytes | str, label: str | None = None) -> Any:
    """``json.loads`` with located, value-free errors."""
    prefix = f"{label}: " if label else ""
    text = _as_text(data, label)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        # e.msg is a fixed phrase ("Expecting ',' delimiter"); it never quotes the input.
        raise IngestError(Issue(
            "structure", f"{prefix}malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        )) from None
    except RecursionError:
        # Arrays or objects nested thousands deep: no FHIR resource is, and the parser
        # would exhaust the stack.
        raise IngestError(Issue("structure", f"{prefix}JSON nested too deeply")) from None
    except ValueError as e:
        raise IngestError(Issue("structure", f"{prefix}malformed JSON: {e}")) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _check_resource_type(obj: Any, expr: str, label: str | None) -> Issue | None:
    """An issue when ``obj`` is not a JSON object with a known R4 resourceType.

    ``expr`` locates ``obj`` ("" for the top level of a document).
    """
    prefix = f"{label}: " if label else ""
    rt_expr = f"{expr}.resourceType" if expr else "resourceType"
    if not isinstance(obj, dict):
        kind = "an array" if isinstance(obj, list) else f"a JSON {type(obj).__name__}"
        return Issue("structure", f"{prefix}expected a FHIR resource (a JSON object), got {kind}",
                     expr or None)
    rt = obj.get("resourceType")
    if rt is None:
        return Issue("structure", f"{prefix}not a FHIR resource: the JSON object has no "
                     "resourceType", rt_expr)
    if not isinstance(rt, str) or rt not in R4_RESOURCE_TYPES:
        shown = rt[:40] if isinstance(rt, str) else type(rt).__name__
        hint = ""
        if isinstance(rt, str):
            close = difflib.get_close_matches(rt, R4_RESOURCE_TYPES, n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
        return Issue("not-supported", f"{prefix}unknown resourceType {shown!r}: not a FHIR R4 "
                     f"resource type{hint}", rt_expr)
    return None


# --------------------------------------------------------------------------- items


@dataclass(eq=False)
class _Item:
    """One resource in the unit being ingested, with where it came from."""

    resource: dict[str, Any]
    expr: str  # FHIRPath-like location, e.g. Bundle.entry[3].resource
    full_url: str | None = None
    label: str | None = None  # prefix for diagnostics, e.g. "Observation.ndjson line 12"
    container: _Item | None = None
    contained: dict[str, _Item] = field(default_factory=dict)

    @property
    def rt(self) -> str:
        return str(self.resource["resourceType"])

    def ref(self) -> str:
        rid = self.resource.get("id")
        if self.container is not None:
            return f"{self.container.ref()}#{rid}"
        if isinstance(rid, str) and rid:
            return f"{self.rt}/{rid}"
        if self.full_url:
            return self.full_url
        return f"{self.label}: {self.expr}" if self.label else self.expr


def _items_from_document(obj: Any, label: str | None = None) -> tuple[list[_Item], list[Issue]]:
    """Split a parsed JSON document into resource items (Bundle entries or one resource)."""
    issue = _check_resource_type(obj, "", label)
    if issue is not None:
        return [], [issue]
    rt = obj["resourceType"]
    if rt != "Bundle":
        return [_Item(obj, rt, None, label)], []
    issues: list[Issue] = []
    prefix = f"{label}: " if label else ""
    btype = obj.get("type")
    if btype is None or btype == "":
        issues.append(Issue("required", f"{prefix}Bundle.type is required (R4 1..1)",
                            "Bundle.type"))
    elif not isinstance(btype, str) or btype not in _ALL_BUNDLE_TYPES:
        issues.append(Issue("value", f"{prefix}Bundle.type is not a bundle-type code",
                            "Bundle.type"))
    elif btype not in _SUPPORTED_BUNDLE_TYPES:
        issues.append(Issue("not-supported", f"{prefix}Bundle.type {btype!r} is not ingested: "
                            "send a transaction, batch, collection, searchset, document or "
                            "message Bundle", "Bundle.type"))
    entries = obj.get("entry", [])
    if not isinstance(entries, list):
        issues.append(Issue("structure", f"{prefix}Bundle.entry must be an array", "Bundle.entry"))
        entries = []
    items: list[_Item] = []
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        if not isinstance(entry, dict):
            issues.append(Issue("structure", f"{prefix}a Bundle entry must be an object", where))
            continue
        resource = entry.get("resource")
        if resource is None:
            # Transaction DELETEs and some searchset entries legitimately carry no resource.
            continue
        bad = _check_resource_type(resource, f"{where}.resource", label)
        if bad is not None:
            issues.append(bad)
            continue
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue  # server warnings about the search, not data
        full_url = entry.get("fullUrl")
        items.append(_Item(resource, f"{where}.resource",
                           full_url if isinstance(full_url, str) else None, label))
    return items, issues


# --------------------------------------------------------------------------- public API


def records_from_json(
    data: bytes | str | Mapping[str, Any],
    source: str | None = None,
    *,
    strict: bool = False,
) -> list[PatientRecord]:
    """PatientRecords from one FHIR R4 JSON document: a Bundle or a single resource.

    Parameters
    ----------
    data
        The JSON text (bytes or str) or an already parsed dict.
    source
        Names the input in errors (a file path, say).
    strict
        Also validate every resource with ``fhir.resources`` R4B; slower.

    Returns
    -------
    list[PatientRecord]
        One record per patient, in order of appearance; a patient that is only
        referenced (``Patient/123`` outside the file) gets a record keyed by
        that reference (``key=None, resource_id="123"``).

    Raises
    ------
    IngestError
        When anything in the document is malformed; the whole document is rejected.
    NotPatientData
        When the document is well formed but carries no patient data (a ValueSet, say).
    """
    try:
        raw: str | None = None
        obj: Any
        if isinstance(data, Mapping):
            obj = data
        else:
            raw = _as_text(data)
            obj = _load_json(raw)
        items, issues = _items_from_document(obj)
        if strict and not issues:
            from fhir_adapters.fhir_strict import validate_document

            issues = validate_document(obj)
        if issues:
            raise IngestError(issues)
        return _Ingest(items, str(obj["resourceType"]), raw).run()
    except IngestError as e:
        raise _with_source(e, source) from None


def records_from_resources(
    resources: Iterable[Mapping[str, Any]], source: str | None = None, *, strict: bool = False
) -> list[PatientRecord]:
    """PatientRecords from a flat list of resource dicts that reference each other by id.

    References are relative (``Patient/<id>``) or contained (``#id``). The HL7 v2
    path converts messages to such lists first.
    """
    try:
        items: list[_Item] = []
        issues: list[Issue] = []
        for i, resource in enumerate(resources):
            label = f"resource {i}"
            bad = _check_resource_type(resource, "", label)
            if bad is not None:
                issues.append(bad)
                continue
            item = _Item(dict(resource), str(resource["resourceType"]), None, label)
            items.append(item)
            if strict:
                from fhir_adapters.fhir_strict import validate_resource

                issues.extend(validate_resource(item.resource, item.expr, label))
        if issues:
            raise IngestError(issues)
        return _Ingest(items, "resource list").run()
    except IngestError as e:
        raise _with_source(e, source) from None


def records_from_ndjson(
    data: bytes | str | Mapping[str, bytes | str],
    source: str | None = None,
    *,
    strict: bool = False,
) -> list[PatientRecord]:
    """PatientRecords from NDJSON: one resource per line, as FHIR Bulk Data export writes it.

    ``data`` is one NDJSON text, or a mapping of file name to text for a whole
    bulk-export folder (``Patient.ndjson``, ``Observation.ndjson``, ...): the
    files are ingested together, so references link across them.
    """
    files = data if isinstance(data, Mapping) else {"": data}
    try:
        items: list[_Item] = []
        issues: list[Issue] = []
        for name, text in files.items():
            if isinstance(text, bytes | bytearray):
                try:
                    text = bytes(text).decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    where = f"{name}: " if name else ""
                    issues.append(Issue("structure", f"{where}not UTF-8 text (invalid byte at "
                                        f"offset {e.start}); NDJSON must be UTF-8"))
                    continue
            for lineno, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
                if not line.strip():
                    continue
                label = f"{name} line {lineno}" if name else f"line {lineno}"
                try:
                    obj = _load_json(line, label)
                except IngestError as e:
                    issues.extend(e.issues)
                    continue
                bad = _check_resource_type(obj, "", label)
                if bad is not None:
                    issues.append(bad)
                    continue
                if obj["resourceType"] == "Bundle":
                    issues.append(Issue("not-supported", f"{label}: a Bundle inside NDJSON is not "
                                        "ingested; NDJSON carries one resource per line",
                                        "Bundle"))
                    continue
                item = _Item(obj, obj["resourceType"], None, label)
                items.append(item)
                if strict:
                    from fhir_adapters.fhir_strict import validate_resource

                    issues.extend(validate_resource(obj, item.expr, label))
                if len(issues) >= _MAX_ISSUES:
                    break
        if not items and not issues:
            issues.append(Issue("structure", "empty input: no resources in the NDJSON"))
        if issues:
            raise IngestError(issues[:_MAX_ISSUES])
        return _Ingest(items, "NDJSON").run()
    except IngestError as e:
        raise _with_source(e, source) from None


def _with_source(error: IngestError, source: str | None) -> IngestError:
    if source is None or error.source is not None:
        return error
    return type(error)(error.issues, source=source)


# --------------------------------------------------------------------------- ingest


class _Reject(Exception):
    """Internal: the issue cap was reached."""


#: Receives each issue with its item and whether the element can be nulled (the resource
#: lives on without it) rather than the resource dropped: see :mod:`fhir_adapters.fhir_lenient`.
IssueSink = Callable[[_Item | None, Issue, bool], None]


class _Ingest:
    """Resolve references and map the items of one unit (file, folder) to PatientRecords."""

    def __init__(self, items: list[_Item], what: str, raw: str | None = None, *,
                 on_issue: IssueSink | None = None) -> None:
        self.what = what
        self.raw = raw
        # Without a sink any issue rejects the unit (a transaction's all-or-nothing).
        self.on_issue = on_issue
        self.items: list[_Item] = []
        self.issues: list[Issue] = []
        self.by_url: dict[str, _Item] = {}
        self.by_type_id: dict[tuple[str, str], _Item] = {}
        self._by_identifier: dict[tuple[str, str | None, str], list[_Item]] | None = None
        self.now = datetime.now(UTC)
        for item in items:
            self._add(item)

    def _add(self, item: _Item) -> None:
        self.items.append(item)
        r = item.resource
        if item.container is None:
            if item.full_url:
                self.by_url[item.full_url] = item
            rid = r.get("id")
            if isinstance(rid, str):
                self.by_type_id.setdefault((item.rt, rid), item)
        contained = r.get("contained")
        if item.container is None and contained:
            if not isinstance(contained, list):
                self.issue(item, "contained", "structure", "must be an array", nullable=True)
                return
            for j, sub in enumerate(contained):
                bad = _check_resource_type(sub, f"{item.expr}.contained[{j}]", item.label)
                if bad is not None:
                    self._report(item, bad, True)
                    continue
                sub_item = _Item(sub, f"{item.expr}.contained[{j}]", None, item.label, item)
                sid = sub.get("id")
                if isinstance(sid, str):
                    item.contained[sid] = sub_item
                self._add(sub_item)

    # ---------------------------------------------------------------- issues

    def issue(self, item: _Item | None, path: str, code: IssueCode, message: str, *,
              nullable: bool = False) -> None:
        """Report a problem; ``nullable``: the resource can live without the element."""
        expr = item.expr if item is not None else self.what
        if path:
            expr = f"{expr}.{path}"
        label = item.label if item is not None else None
        self._report(item, Issue(code, f"{label}: {message}" if label else message, expr),
                     nullable)

    def _report(self, item: _Item | None, issue: Issue, nullable: bool) -> None:
        if self.on_issue is not None:
            self.on_issue(item, issue, nullable)
            return
        self.issues.append(issue)
        if len(self.issues) >= _MAX_ISSUES:
            raise _Reject

    # ---------------------------------------------------------------- references

    def resolve(self, ref: str, item: _Item) -> _Item | None:
        """The item ``ref`` points at, or None when it points outside this unit."""
        if ref.startswith("#"):
            root = item.container or item
            return root if ref == "#" else root.contained.get(ref[1:])
        target = self.by_url.get(ref)
        if target is not None:
            return target
        if "?" in ref:
            return self._resolve_conditional(ref)
        if ref.startswith("urn:"):
            return None
        if "://" in ref:
            return self.by_url.get(ref.split("/_history/")[0])
        parts = ref.split("/")
        if len(parts) < 2:
            return None
        # Relative references resolve against the referencing entry's base URL first.
        base = _base_of(item.full_url if item.container is None else
                        (item.container.full_url or None))
        if base is not None:
            target = self.by_url.get(f"{base}/{parts[0]}/{parts[1]}")
            if target is not None:
                return target
        return self.by_type_id.get((parts[0], parts[1]))

    def _resolve_conditional(self, ref: str) -> _Item | None:
        rtype, _, query = ref.partition("?")
        params = parse_qsl(query)
        tokens = [v for k, v in params if k == "identifier"]
        if not tokens or len(tokens) != len(params):
            return None  # only identifier searches can be resolved without a server
        if self._by_identifier is None:
            self._by_identifier = {}
            for it in self.items:
                if it.container is not None:
                    continue
                for ident in _list(it.resource.get("identifier")):
                    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                        system = ident.get("system")
                        self._by_identifier.setdefault(
                            (it.rt, system if isinstance(system, str) else None, ident["value"]),
                            [],
                        ).append(it)
        found: set[int] = set()
        candidates: dict[int, _Item] = {}
        for n, token in enumerate(tokens):
            matches = self._match_identifier(rtype, token)
            ids = {id(m) for m in matches}
            candidates.update({id(m): m for m in matches})
            found = ids if n == 0 else found & ids
        if len(found) == 1:
            return candidates[found.pop()]
        return None

    def _match_identifier(self, rtype: str, token: str) -> list[_Item]:
        assert self._by_identifier is not None
        if "|" in token:
            system, _, value = token.partition("|")
            return self._by_identifier.get((rtype, system or None, value), [])
        return [it for (t, _, v), its in self._by_identifier.items()
                if t == rtype and v == token for it in its]

    def check_internal_references(self) -> None:
        """Every urn:uuid:/urn:oid: and #contained reference must resolve inside the unit."""
        if self.raw is not None and self._internal_references_resolve_quickly(self.raw):
            return
        for item in self.items:
            if item.rt == "Bundle":
                continue  # a nested Bundle resolves against its own entries
            refs: list[str] = []
            _collect_refs(item.resource, refs)
            if all(not _is_internal(r) or self.resolve(r, item) is not None for r in refs):
                continue
            # Slow path, only for a broken resource: find where each bad reference sits.
            for path, ref in _located_refs(item.resource, ""):
                if _is_internal(ref) and self.resolve(ref, item) is None:
                    kind = "contained resource" if ref.startswith("#") else "entry"
                    in_what = "this resource" if ref.startswith("#") else f"this {self.what}"
                    # Only an unresolved subject loses the resource its patient.
                    subject = _SUBJECT.get(item.rt)
                    self.issue(item, path, "not-found",
                               f"reference does not resolve to any {kind} in {in_what}",
                               nullable=path != f"{subject}.reference")

    def _internal_references_resolve_quickly(self, raw: str) -> bool:
        """True when a scan of the JSON text proves every internal reference resolves.

        Walking every element of a large Bundle costs more than parsing it; the
        text scan finds the urn: references at regex speed, and only resources
        with contained resources need walking for their #references. Any doubt
        (a miss, or #references outside those resources) returns False, and the
        caller walks everything and locates each failure.
        """
        urns = _URN_REF_RE.findall(raw)
        if len(urns) != len(_URN_REF_START_RE.findall(raw)):
            return False  # an escaped character defeated the scan
        if any(u not in self.by_url for u in set(urns)):
            return False
        expected = len(_HASH_REF_RE.findall(raw))
        found = 0
        for item in self.items:
            if not (item.contained or item.container is not None):
                continue
            refs: list[str] = []
            _collect_refs(item.resource, refs)
            for ref in refs:
                if ref.startswith("#"):
                    found += 1
                    if self.resolve(ref, item) is None:
                        return False
        return found == expected

    # ---------------------------------------------------------------- attribution

    def patient_slot(self, item: _Item) -> tuple[Any, ...] | None:
        """The patient a clinical item belongs to, as a slot key, or None."""
        elem = _SUBJECT.get(item.rt)
        subject = item.resource.get(elem) if elem else None
        if not isinstance(subject, dict):
            return None
        ref = subject.get("reference")
        if not isinstance(ref, str) or not ref:
            return None
        target = self.resolve(ref, item)
        if target is not None:
            return ("item", id(target)) if target.rt == "Patient" else None
        return _external_patient_slot(ref)

    # ---------------------------------------------------------------- run

    def run(self) -> list[PatientRecord]:
        try:
            records = self.map_records()
        except _Reject:
            records = {}
        if self.issues:
            raise IngestError(self.issues[:_MAX_ISSUES])
        if not records:
            raise NotPatientData(Issue("not-supported", self._no_patient_reason(), self.what
                                       if self.what in R4_RESOURCE_TYPES else None))
        return list(records.values())

    def map_records(self) -> dict[tuple[Any, ...], PatientRecord]:
        """The records by patient slot (see :meth:`patient_slot`); issues go to the sink."""
        self.check_internal_references()
        return self._map_all()

    def _map_all(self) -> dict[tuple[Any, ...], PatientRecord]:
        records: dict[tuple[Any, ...], PatientRecord] = {}
        payers: dict[tuple[Any, ...], list[str]] = {}
        slots: dict[int, tuple[Any, ...]] = {}
        slot: tuple[Any, ...] | None
        for item in self.items:
            if item.rt == "Patient":
                slot = ("item", id(item))
                records[slot] = self._map_patient(item)
        for item in self.items:
            if item.rt in _SUBJECT:
                self._check_required(item)
                slot = self.patient_slot(item)
                if slot is not None:
                    slots[id(item)] = slot
        self._propagate_to_results(slots)
        for item in self.items:
            slot = slots.get(id(item))
            if slot is None:
                continue
            record = records.get(slot)
            if record is None:
                record = records[slot] = _record_for_external(slot)
            rt = item.rt
            if rt == "Observation":
                record.observations.extend(self._map_observation(item))
            elif rt == "Condition":
                record.conditions.append(self._map_condition(item))
            elif rt.startswith("Medication"):
                record.medications.append(self._map_medication(item))
            elif rt == "Encounter":
                record.encounters.append(self._map_encounter(item))
            elif rt == "ImagingStudy":
                record.imaging.append(self._map_imaging(item))
            elif rt in ("DocumentReference", "DiagnosticReport"):
                record.notes.extend(self._map_notes(item))
            elif rt == "Coverage":
                for payer in self._map_coverage(item):
                    if payer not in payers.setdefault(slot, []):
                        payers[slot].append(payer)
        for slot, names in payers.items():
            record = records[slot]
            if not record.demographics.payers:
                record.demographics = _replace_payers(record.demographics, tuple(names))
        return records

    def _propagate_to_results(self, slots: dict[int, tuple[Any, ...]]) -> None:
        """Results of a report or panel without their own subject belong to its patient.

        Lab bundles (the R4 ``Bundle-report`` example, say) put the subject on
        the DiagnosticReport only.
        """
        for item in self.items:
            slot = slots.get(id(item))
            if slot is None or item.rt not in ("DiagnosticReport", "Observation"):
                continue
            elem = "result" if item.rt == "DiagnosticReport" else "hasMember"
            for ref in _list(item.resource.get(elem)):
                if not isinstance(ref, dict) or not isinstance(ref.get("reference"), str):
                    continue
                target = self.resolve(ref["reference"], item)
                if (target is not None and target.rt == "Observation"
                        and id(target) not in slots and "subject" not in target.resource):
                    slots[id(target)] = slot

    def _no_patient_reason(self) -> str:
        if not self.items:
            return "no patient data: it holds no resources"
        types: dict[str, int] = {}
        for item in self.items:
            if item.container is None:
                types[item.rt] = types.get(item.rt, 0) + 1
        unattributed = [t for t in types if t in _SUBJECT]
        if unattributed:
            return (f"no patient data: the {', '.join(unattributed)} resource(s) have no "
                    "patient subject (none, display-only, or not a Patient, e.g. a Group), so "
                    "they cannot be attributed to a patient")
        mapped = ", ".join(sorted(MAPPED_RESOURCE_TYPES))
        if self.what in types and sum(types.values()) == 1:
            return (f"no patient data: {self.what} is not one of the resource types "
                    f"PatientRecords are built from ({mapped})")
        found = ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
        return (f"no patient data: found {found}, none of the resource types PatientRecords "
                f"are built from ({mapped})")

    # ---------------------------------------------------------------- checks

    def _check_required(self, item: _Item) -> None:
        r = item.resource
        for name in _REQUIRED.get(item.rt, ()):
            if name.endswith("[x]"):
                stem = name[:-3]
                if not any(k.startswith(stem) and k[len(stem):][:1].isupper() and r[k] not in
                           (None, "", [], {}) for k in r):
                    self.issue(item, name, "required",
                               f"{item.rt}.{name} is required (R4 1..1) and missing")
            elif r.get(name) in (None, "", [], {}):
                self.issue(item, name, "required",
                           f"{item.rt}.{name} is required (R4 1..) and missing")
            elif name in ("status", "intent") and not isinstance(r[name], str):
                self.issue(item, name, "structure", "must be a code (a JSON string)")

    def dt(self, item: _Item, path: str, value: Any, *, past: bool = True,
           nullable: bool = True) -> datetime | None:
        """Parse a FHIR dateTime element; issues for malformed or future values.

        A bad time is nullable by default: the resource reads as if it had none.
        """
        if value is None:
            return None
        if not isinstance(value, str):
            self.issue(item, path, "structure", "must be a dateTime (a JSON string)",
                       nullable=nullable)
            return None
        try:
            when = parse_fhir_datetime(value)
        except ValueError:
            self.issue(item, path, "value", "is not a valid FHIR dateTime", nullable=nullable)
            return None
        if past and when > self.now + _FUTURE_SLACK:
            self.issue(item, path, "value", "is in the future; a recorded event cannot be",
                       nullable=nullable)
            return None
        return when

    def num(self, item: _Item, path: str, value: Any, *, nullable: bool = False
            ) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.issue(item, path, "structure", "must be a decimal (a JSON number)",
                       nullable=nullable)
            return None
        return float(value)

    # ---------------------------------------------------------------- Patient

    def _map_patient(self, item: _Item) -> PatientRecord:
        r = item.resource
        identifiers: list[PatientIdentifier] = []
        key: PatientIdentifier | None = None
        for i, ident in enumerate(_list(r.get("identifier"))):
            if not isinstance(ident, dict):
                self.issue(item, f"identifier[{i}]", "structure", "must be an object",
                           nullable=True)
                continue
            system, value = ident.get("system"), ident.get("value")
            if not (isinstance(system, str) and system and isinstance(value, str) and value):
                continue  # without a system an identifier cannot link records safely
            pid = PatientIdentifier(system, value)
            if pid not in identifiers:
                identifiers.append(pid)
            if key is None and _is_mrn(ident):
                key = pid
        if key is None and identifiers:
            key = identifiers[0]

        birth: date | None = None
        if r.get("birthDate") is not None:
            raw = r["birthDate"]
            try:
                birth = parse_fhir_date(raw) if isinstance(raw, str) else None
                if birth is None:
                    self.issue(item, "birthDate", "structure", "must be a date (a JSON string)",
                               nullable=True)
            except ValueError:
                self.issue(item, "birthDate", "value", "is not a valid FHIR date", nullable=True)
            if birth is not None and birth > (self.now + _FUTURE_SLACK).date():
                self.issue(item, "birthDate", "value", "is in the future", nullable=True)
                birth = None

        race, race_text = _omb_extension(r, US_CORE_RACE)
        ethnicity, ethnicity_text = _omb_extension(r, US_CORE_ETHNICITY)
        gender_identity = None
        for ext in _list(r.get("extension")):
            if isinstance(ext, dict) and ext.get("url") == GENDER_IDENTITY:
                gender_identity = _cc_code(ext.get("valueCodeableConcept"))
        language = None
        comms = [c for c in _list(r.get("communication")) if isinstance(c, dict)]
        comms.sort(key=lambda c: c.get("preferred") is not True)
        if comms:
            language = _cc_code(comms[0].get("language"))
        gender = r.get("gender")
        demographics = Demographics(
            sex=gender if isinstance(gender, str) else None,
            gender_identity=gender_identity,
            birth_date=birth,
            race=race,
            race_text=race_text,
            ethnicity=ethnicity,
            ethnicity_text=ethnicity_text,
            language=language,
        )
        outcome = Outcome()
        if "deceasedDateTime" in r:
            when = self.dt(item, "deceasedDateTime", r["deceasedDateTime"])
            if when is not None and birth is not None and when.date() < birth:
                self.issue(item, "deceasedDateTime", "invariant", "is before birthDate",
                           nullable=True)
                when = None
            outcome = Outcome(deceased=True, deceased_time=when)
        elif "deceasedBoolean" in r:
            flag = r["deceasedBoolean"]
            if not isinstance(flag, bool):
                self.issue(item, "deceasedBoolean", "structure", "must be a JSON boolean",
                           nullable=True)
            else:
                outcome = Outcome(deceased=flag)
        rid = r.get("id") if isinstance(r.get("id"), str) else None
        if item.container is not None:
            # A contained id is local to its container; qualify it so it cannot collide.
            rid = item.ref()
        return PatientRecord(key=key, resource_id=rid, identifiers=tuple(identifiers),
                             demographics=demographics, outcome=outcome)

    # ---------------------------------------------------------------- Observation

    def _map_observation(self, item: _Item) -> list[Observation]:
        r = item.resource
        code, system, display = _coding_of(r.get("code"), LOINC)
        effective = self._effective(item, r)
        issued = self.dt(item, "issued", r.get("issued"))
        if effective is None:
            effective = issued
        category = None
        for cat in _list(r.get("category")):
            category = _cc_code(cat)
            if category:
                break
        src = item.ref()
        out: list[Observation] = []
        value, unit, has_value = self._value(item, r, "")
        low, high = self._range(item, r.get("referenceRange"), "referenceRange")
        components = _list(r.get("component"))
        if has_value or not components:
            out.append(Observation(code, system, display, value, unit, effective, low, high,
                                   category, src))
        for j, comp in enumerate(components):
            path = f"component[{j}]"
            if not isinstance(comp, dict) or not comp.get("code"):
                self.issue(item, f"{path}.code", "required",
                           "Observation.component.code is required (R4 1..1) and missing",
                           nullable=True)
                continue
            c_code, c_system, c_display = _coding_of(comp.get("code"), LOINC)
            c_value, c_unit, _ = self._value(item, comp, path + ".")
            c_low, c_high = self._range(item, comp.get("referenceRange"), f"{path}.referenceRange")
            out.append(Observation(c_code, c_system, c_display, c_value, c_unit, effective,
                                   c_low, c_high, category, f"{src}.{path}"))
        return out

    def _effective(self, item: _Item, r: dict[str, Any]) -> datetime | None:
        if "effectiveDateTime" in r:
            return self.dt(item, "effectiveDateTime", r["effectiveDateTime"])
        if "effectiveInstant" in r:
            return self.dt(item, "effectiveInstant", r["effectiveInstant"])
        period = r.get("effectivePeriod")
        if isinstance(period, dict):
            start = self.dt(item, "effectivePeriod.start", period.get("start"))
            return start if start is not None else self.dt(
                item, "effectivePeriod.end", period.get("end"))
        return None

    def _value(self, item: _Item, obj: dict[str, Any], prefix: str
               ) -> tuple[float | str | bool | None, str | None, bool]:
        """(value, unit, has_value) of an Observation or component value[x]."""
        if "valueQuantity" in obj:
            q = obj["valueQuantity"]
            if not isinstance(q, dict):
                self.issue(item, f"{prefix}valueQuantity", "structure", "must be an object")
                return None, None, True
            unit = q.get("code") or q.get("unit")
            return (self.num(item, f"{prefix}valueQuantity.value", q.get("value")),
                    unit if isinstance(unit, str) else None, True)
        if "valueCodeableConcept" in obj:
            return _cc_code(obj["valueCodeableConcept"]), None, True
        for key in ("valueString", "valueDateTime", "valueTime"):
            if key in obj:
                v = obj[key]
                if not isinstance(v, str):
                    self.issue(item, prefix + key, "structure", "must be a JSON string")
                    return None, None, True
                if key == "valueDateTime":
                    self.dt(item, prefix + key, v, past=False, nullable=False)
                return v, None, True
        if "valueBoolean" in obj:
            v = obj["valueBoolean"]
            if not isinstance(v, bool):
                self.issue(item, f"{prefix}valueBoolean", "structure", "must be a JSON boolean")
                return None, None, True
            return v, None, True
        if "valueInteger" in obj:
            v = obj["valueInteger"]
            if isinstance(v, bool) or not isinstance(v, int):
                self.issue(item, f"{prefix}valueInteger", "structure", "must be a JSON integer")
                return None, None, True
            return float(v), None, True
        # valueRange, valueRatio, valueSampledData, valuePeriod: no scalar to keep.
        return None, None, any(k.startswith("value") for k in obj)

    def _range(self, item: _Item, ranges: Any, path: str) -> tuple[float | None, float | None]:
        for i, rr in enumerate(_list(ranges)):
            if not isinstance(rr, dict):
                continue
            low, high = rr.get("low"), rr.get("high")
            lo = self.num(item, f"{path}[{i}].low.value", low.get("value"),
                          nullable=True) if isinstance(low, dict) else None
            hi = self.num(item, f"{path}[{i}].high.value", high.get("value"),
                          nullable=True) if isinstance(high, dict) else None
            if lo is not None or hi is not None:
                return lo, hi
        return None, None

    # ---------------------------------------------------------------- others

    def _map_condition(self, item: _Item) -> Condition:
        r = item.resource
        code, system, display = _coding_of(r.get("code"), None)
        onset = self.dt(item, "onsetDateTime", r.get("onsetDateTime"))
        if onset is None and isinstance(r.get("onsetPeriod"), dict):
            onset = self.dt(item, "onsetPeriod.start", r["onsetPeriod"].get("start"))
        recorded = self.dt(item, "recordedDate", r.get("recordedDate"))
        if onset is None:
            onset = recorded
        abatement = self.dt(item, "abatementDateTime", r.get("abatementDateTime"))
        if abatement is None and isinstance(r.get("abatementPeriod"), dict):
            abatement = self.dt(item, "abatementPeriod.start", r["abatementPeriod"].get("start"))
        return Condition(code, system, display, onset, abatement,
                         _cc_code(r.get("clinicalStatus")), item.ref())

    def _map_medication(self, item: _Item) -> Medication:
        r = item.resource
        concept = r.get("medicationCodeableConcept")
        med_ref = r.get("medicationReference")
        if concept is None and isinstance(med_ref, dict) and isinstance(
                med_ref.get("reference"), str):
            target = self.resolve(med_ref["reference"], item)
            if target is not None and target.rt == "Medication":
                concept = target.resource.get("code")
            elif med_ref.get("display"):
                concept = {"text": med_ref["display"]}
        code, system, display = _coding_of(concept, None)
        if item.rt == "MedicationRequest":
            when = self.dt(item, "authoredOn", r.get("authoredOn"))
        else:
            when = self._effective(item, r)
            if when is None and item.rt == "MedicationStatement":
                when = self.dt(item, "dateAsserted", r.get("dateAsserted"))
        status = r.get("status")
        return Medication(code, system, display, when,
                          status if isinstance(status, str) else None, item.ref())

    def _map_encounter(self, item: _Item) -> Encounter:
        r = item.resource
        cls = r.get("class")
        enc_class = cls.get("code") if isinstance(cls, dict) else None
        period: dict[str, Any] = r["period"] if isinstance(r.get("period"), dict) else {}
        status = r.get("status")
        # Planned encounters may lie ahead; only those under way or over must be past.
        past = status in ("arrived", "triaged", "in-progress", "onleave", "finished")
        start = self.dt(item, "period.start", period.get("start"), past=past)
        end = self.dt(item, "period.end", period.get("end"), past=past)
        enc_type = None
        for t in _list(r.get("type")):
            enc_type = _cc_code(t)
            if enc_type:
                break
        return Encounter(enc_class if isinstance(enc_class, str) else None,
                         status if isinstance(status, str) else None, start, end, enc_type,
                         item.ref())

    def _map_imaging(self, item: _Item) -> ImagingStudyRef:
        r = item.resource
        study_uid = None
        for ident in _list(r.get("identifier")):
            if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
                continue
            value, system = ident["value"], ident.get("system")
            if system == "urn:dicom:uid" or (system == "urn:ietf:rfc:3986"
                                             and value.startswith("urn:oid:")):
                study_uid = value.removeprefix("urn:oid:")
                if system == "urn:dicom:uid":
                    break
        series: list[ImagingSeriesRef] = []
        for j, s in enumerate(_list(r.get("series"))):
            path = f"series[{j}]"
            if not isinstance(s, dict):
                self.issue(item, path, "structure", "must be an object", nullable=True)
                continue
            uid = s.get("uid")
            if not isinstance(uid, str) or not uid:
                self.issue(item, f"{path}.uid", "required",
                           "ImagingStudy.series.uid is required (R4 1..1) and missing",
                           nullable=True)
                continue
            modality = s.get("modality")
            if not isinstance(modality, dict) or not modality.get("code"):
                self.issue(item, f"{path}.modality", "required",
                           "ImagingStudy.series.modality is required (R4 1..1) and missing",
                           nullable=True)
                continue
            body = s.get("bodySite")
            n = s.get("numberOfInstances")
            series.append(ImagingSeriesRef(
                uid, str(modality["code"]),
                body.get("display") if isinstance(body, dict) else None,
                n if isinstance(n, int) and not isinstance(n, bool) else None,
            ))
        started = self.dt(item, "started", r.get("started"))
        return ImagingStudyRef(study_uid, started, tuple(series), item.ref())

    def _map_notes(self, item: _Item) -> list[Note]:
        r = item.resource
        notes: list[Note] = []
        if item.rt == "DocumentReference":
            note_type = _cc_code(r.get("type"), LOINC)
            time = self.dt(item, "date", r.get("date"))
            context = r.get("context")
            if time is None and isinstance(context, dict) and isinstance(context.get("period"),
                                                                         dict):
                time = self.dt(item, "context.period.start", context["period"].get("start"))
            attachments = [(f"content[{j}].attachment", c.get("attachment") if isinstance(
                c, dict) else None) for j, c in enumerate(_list(r.get("content")))]
            for path, att in attachments:
                if not isinstance(att, dict):
                    self.issue(item, path, "required", "DocumentReference.content.attachment is "
                               "required (R4 1..1) and missing", nullable=True)
        else:
            note_type = _cc_code(r.get("code"), LOINC)
            time = self._effective(item, r)
            issued = self.dt(item, "issued", r.get("issued"))
            time = time if time is not None else issued
            attachments = [(f"presentedForm[{j}]", a)
                           for j, a in enumerate(_list(r.get("presentedForm")))]
        for path, att in attachments:
            if isinstance(att, dict):
                text = self._attachment_text(item, path, att)
                if text:
                    notes.append(Note(text, note_type, time, item.ref()))
        conclusion = r.get("conclusion")
        if not notes and item.rt == "DiagnosticReport" and isinstance(conclusion, str) and (
                conclusion.strip()):
            # Without a text presentedForm the conclusion is the report's narrative.
            notes.append(Note(conclusion, note_type, time, item.ref()))
        return notes

    def _attachment_text(self, item: _Item, path: str, att: dict[str, Any]) -> str | None:
        """Decode inline text attachments; binary ones (PDF, images) carry no note text."""
        data = att.get("data")
        if data is None:
            return None  # by url only: fetching is not the adapter's job
        ctype = att.get("contentType")
        mime, charset = _parse_content_type(ctype if isinstance(ctype, str) else "text/plain")
        if not isinstance(data, str):
            self.issue(item, f"{path}.data", "structure", "must be base64 text (a JSON string)",
                       nullable=True)
            return None
        try:
            raw = base64.b64decode(_WS_RE.sub("", data), validate=True)
        except (binascii.Error, ValueError):
            self.issue(item, f"{path}.data", "value", "is not valid base64", nullable=True)
            return None
        if not mime.startswith("text/"):
            return None
        try:
            return raw.decode(charset or "utf-8")
        except LookupError:
            self.issue(item, f"{path}.contentType", "not-supported",
                       "names a charset Python does not know", nullable=True)
        except UnicodeDecodeError as e:
            self.issue(item, f"{path}.data", "value",
                       f"is not valid {charset or 'utf-8'} text (byte {e.start})", nullable=True)
        return None

    def _map_coverage(self, item: _Item) -> list[str]:
        r = item.resource
        names: list[str] = []
        for p in _list(r.get("payor")):
            if not isinstance(p, dict):
                continue
            name = None
            if isinstance(p.get("reference"), str):
                target = self.resolve(p["reference"], item)
                if target is not None and isinstance(target.resource.get("name"), str):
                    name = target.resource["name"]
            if name is None and isinstance(p.get("display"), str):
                name = p["display"]
            if name:
                names.append(name)
        if not names:
            for c in _list(r.get("class")):
                if isinstance(c, dict) and _cc_code(c.get("type")) == "plan":
                    name = c.get("name") or c.get("value")
                    if isinstance(name, str):
                        names.append(name)
        return names


# --------------------------------------------------------------------------- helpers


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _is_internal(ref: str) -> bool:
    return ref.startswith(("urn:uuid:", "urn:oid:", "#"))


def _base_of(full_url: str | None) -> str | None:
    """``http://x/fhir`` for ``http://x/fhir/Patient/1``; None for urn: fullUrls."""
    if not full_url or "://" not in full_url:
        return None
    parts = full_url.rstrip("/").split("/")
    return "/".join(parts[:-2]) if len(parts) > 4 else None


def _collect_refs(node: Any, out: list[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference":
                if isinstance(v, str):
                    out.append(v)
            elif k in ("contained", "text"):
                continue  # contained resources are items of their own; narrative has none
            elif isinstance(v, dict | list):
                _collect_refs(v, out)
    else:
        for v in node:
            if isinstance(v, dict | list):
                _collect_refs(v, out)


def _located_refs(node: Any, path: str) -> Iterable[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{path}.{k}" if path else k
            if k == "reference" and isinstance(v, str):
                yield sub, v
            elif k not in ("contained", "text") and isinstance(v, dict | list):
                yield from _located_refs(v, sub)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _located_refs(v, f"{path}[{i}]")


def _external_patient_slot(ref: str) -> tuple[Any, ...] | None:
    """Slot for a patient outside the unit: by reference, or by a conditional identifier."""
    if ref.startswith(("urn:", "#")):
        return None
    if "?" in ref:
        rtype, _, query = ref.partition("?")
        if rtype.rsplit("/", 1)[-1] != "Patient":
            return None
        for k, v in parse_qsl(query):
            if k == "identifier" and "|" in v:
                system, _, value = v.partition("|")
                if system and value:
                    return ("identifier", system, value)
        return None
    parts = ref.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return ("ref", parts[-1])
    return None


def _record_for_external(slot: tuple[Any, ...]) -> PatientRecord:
    if slot[0] == "identifier":
        key = PatientIdentifier(slot[1], slot[2])
        return PatientRecord(key=key, identifiers=(key,))
    return PatientRecord(key=None, resource_id=slot[1])


def _replace_payers(d: Demographics, payers: tuple[str, ...]) -> Demographics:
    return Demographics(d.sex, d.gender_identity, d.birth_date, d.race, d.race_text,
                        d.ethnicity, d.ethnicity_text, d.language, payers)


def _is_mrn(ident: dict[str, Any]) -> bool:
    t = ident.get("type")
    if not isinstance(t, dict):
        return False
    return any(isinstance(c, dict) and c.get("code") == "MR" for c in _list(t.get("coding")))


def _coding_of(cc: Any, prefer: str | None) -> tuple[str | None, str | None, str | None]:
    """(code, system, display) from a CodeableConcept, preferring codings from ``prefer``."""
    if not isinstance(cc, dict):
        return None, None, None
    codings = [c for c in _list(cc.get("coding")) if isinstance(c, dict)]
    chosen = None
    if prefer is not None:
        chosen = next((c for c in codings if c.get("system") == prefer), None)
    if chosen is None and codings:
        chosen = codings[0]
    text = cc.get("text") if isinstance(cc.get("text"), str) else None
    if chosen is None:
        return None, None, text
    code, system, display = chosen.get("code"), chosen.get("system"), chosen.get("display")
    return (code if isinstance(code, str) else None,
            system if isinstance(system, str) else None,
            display if isinstance(display, str) else text)


def _cc_code(cc: Any, prefer: str | None = None) -> str | None:
    """A CodeableConcept (or Coding) as one code, falling back to its text."""
    if not isinstance(cc, dict):
        return None
    if "code" in cc and isinstance(cc.get("code"), str):
        return str(cc["code"])
    code, _, display = _coding_of(cc, prefer)
    return code or display


def _omb_extension(r: dict[str, Any], url: str) -> tuple[tuple[Coding, ...], str | None]:
    """US Core race/ethnicity: ombCategory then detailed codings, and the text."""
    codings: list[Coding] = []
    detailed: list[Coding] = []
    text = None
    for ext in _list(r.get("extension")):
        if not isinstance(ext, dict) or ext.get("url") != url:
            continue
        for sub in _list(ext.get("extension")):
            if not isinstance(sub, dict):
                continue
            kind = sub.get("url")
            if kind in ("ombCategory", "detailed") and isinstance(sub.get("valueCoding"), dict):
                vc = sub["valueCoding"]
                coding = Coding(vc.get("system"), vc.get("code"), vc.get("display"))
                (codings if kind == "ombCategory" else detailed).append(coding)
            elif kind == "text" and isinstance(sub.get("valueString"), str):
                text = sub["valueString"]
    return tuple(codings + detailed), text


def _parse_content_type(value: str) -> tuple[str, str | None]:
    mime, *params = (p.strip() for p in value.split(";"))
    charset = None
    for p in params:
        name, _, val = p.partition("=")
        if name.strip().lower() == "charset":
            charset = val.strip().strip('"') or None
    return mime.lower(), charset
