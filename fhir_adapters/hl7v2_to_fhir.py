"""Mapping HL7 v2 segments to FHIR R4 resources, as an interface engine does.

Works over :class:`~fhir_adapters.hl7v2_parse.SegmentView`, so the fast reader
and hl7apy give the same resources. Every PID starts a patient; the segments
after it (PV1, OBR, OBX, TXA) belong to that patient until the next PID.

- PID -> Patient; PV1 -> Encounter.
- MRG (ADT^A40 and the other merges) -> ``Patient.link`` of type ``replaces`` naming each
  prior identifier (MRG-1) on the surviving PID's Patient; the store performs the merge.
- OBX of value type NM, SN, ST, ID, IS, coded (CWE, CE, CNE, CF), date or time ->
  Observation (valueQuantity, with its comparator for ``<2.22``; valueRange or valueRatio
  for SN ``^10^-^20`` and ``^1^:^128``; valueString; valueCodeableConcept; valueDateTime;
  valueTime).
- TXA and the OBX after it, and runs of OBX TX/FT outside a TXA -> DocumentReference.
- OBX of any other type (XTN telecom numbers, ED and RP outside a TXA, HD, XCN, DR ...) carries
  no note or measurement the record can hold: dropped, with a warning.

Tolerance (docs/ingest-policy.md): a field the resource can live without is nulled with a
located, value-free warning when it cannot be read (an impossible or malformed date, a
future birth date); a missing or bad OBX-14 falls back to OBR-7. Only an empty OBX-3 or a
bad OBX-5 drops its observation, again with one warning. The warnings come back with the
resources in :class:`MappedMessage`.

Times without a UTC offset are taken as UTC ("Z"), the PatientRecord convention.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from fhir_adapters.errors import Issue, IssueCode, NotPatientData
from fhir_adapters.hl7v2_parse import Encoding, SegmentView, message_version, unescape
from fhir_adapters.units import canonical_unit, is_known_unit

__all__ = ["LOINC", "UCUM", "MappedMessage", "map_message", "message_to_resources", "parse_dtm"]

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
_OMB = "urn:oid:2.16.840.1.113883.6.238"
_US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition"
_V2 = "http://terminology.hl7.org/CodeSystem/v2-"
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
# Fixed namespace so resource ids are stable across runs and across the two parsers.
_ID_NAMESPACE = uuid.UUID("6f1f4d1e-2a51-4c8e-9a57-0c1f1b7f0e2a")

#: HL7 v2 coding-system names (table 0396) -> FHIR system URIs.
CODE_SYSTEMS = {
    "LN": LOINC,
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9CDX": "http://hl7.org/fhir/sid/icd-9-cm",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "CVX": "http://hl7.org/fhir/sid/cvx",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "UCUM": UCUM,
    "CDCREC": _OMB,
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}

_SEX = {"M": "male", "F": "female", "O": "other", "U": "unknown", "A": "other", "N": "unknown"}
_OBX_STATUS = {
    "F": "final", "C": "corrected", "P": "preliminary", "S": "preliminary", "R": "registered",
    "I": "registered", "O": "registered", "X": "cancelled", "D": "entered-in-error",
    "W": "entered-in-error", "A": "amended", "U": "final",
}
_PATIENT_CLASS = {
    "E": ("EMER", "emergency"), "I": ("IMP", "inpatient encounter"),
    "O": ("AMB", "ambulatory"), "P": ("PRENC", "pre-admission"),
    "R": ("AMB", "ambulatory"), "B": ("IMP", "inpatient encounter"),
}
_DOC_STATUS = {"AU": "final", "LA": "final", "DI": "preliminary", "DO": "preliminary",
               "IN": "preliminary", "IP": "preliminary", "PA": "preliminary"}
_RACE_OMB = {"1002-5", "2028-9", "2054-5", "2076-8", "2106-3"}
_ETHNICITY_OMB = {"2135-2": "Hispanic or Latino", "2186-5": "Not Hispanic or Latino"}
_ETHNICITY_V2 = {"H": "2135-2", "N": "2186-5"}
_VALUE_TYPES = {"NM", "SN", "ST", "CWE", "CE", "CNE", "CF", "DT", "DTM", "TS", "TM", "ID", "IS"}
_NOTE_TYPES = {"TX", "FT"}
_NOT_A_DTM = "is not a valid HL7 date/time (expected YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])"
_EXPECTED = {"NM": "a number (optionally after <, <=, > or >=)",
             "SN": "a structured numeric ([comparator]^number[^separator^number])",
             "DT": "a valid HL7 date", "DTM": "a valid HL7 date/time",
             "TS": "a valid HL7 date/time", "TM": "a valid HL7 time (HH[MM[SS]])"}
#: Why an OBX of a type with no FHIR home here is not kept (the default: _unkept()).
_UNKEPT = {
    "XTN": "a telecom number: contact data, not a clinical result",
    "ED": "encapsulated data (a PDF or image) outside a TXA document",
    "RP": "a pointer to content held elsewhere, which ingest does not fetch",
}


def _unkept(kind: str) -> str:
    why = _UNKEPT.get(kind, "a value type that maps to no observation or note")
    return f"OBX-2 {kind} is {why}; result not kept"

_DTM = re.compile(
    r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,4})?([+-]\d{4})?\Z"
)
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")
_RANGE = re.compile(r"\s*([+-]?[\d.]+)\s*(?:-|to|–)\s*([+-]?[\d.]+)\s*\Z")
_BOUND = re.compile(r"\s*([<>])=?\s*([+-]?[\d.]+)\s*\Z")
# A numeric result with a comparator, as labs send it in NM: "<2.22", ">=10", "< 5".
_COMPARED = re.compile(r"\s*(<=|>=|<|>)\s*(\S+)\s*\Z")
_BCP47 = re.compile(r"[a-z]{2}(-[A-Z]{2})?\Z")


class _BadDate(ValueError):
    pass


class _Dropped(Exception):
    """The OBX being mapped cannot become an observation; carries the located reason."""

    def __init__(self, issue: Issue) -> None:
        super().__init__(issue.diagnostics)
        self.issue = issue


@dataclass(frozen=True)
class MappedMessage:
    """One message's FHIR resources and the warnings for what mapping nulled or dropped."""

    resources: list[dict[str, Any]]
    warnings: list[Issue] = dataclasses.field(default_factory=list)
    #: The ``Patient`` id each warning belongs to (None: before any PID, the whole message).
    owners: list[str | None] = dataclasses.field(default_factory=list)

    def warnings_for(self, patient_id: str | None) -> list[Issue]:
        """The warnings about ``patient_id``'s data, and those about the whole message."""
        return [w for w, owner in zip(self.warnings, self.owners, strict=True)
                if owner is None or owner == patient_id]


def parse_dtm(text: str) -> tuple[str, datetime, bool]:
    """An HL7 DTM/TS/DT as (FHIR dateTime string, aware UTC datetime, has time of day).

    Raises ``ValueError`` for a malformed or impossible date; callers locate it.
    """
    m = _DTM.match(text.strip())
    if not m:
        raise _BadDate("not an HL7 DTM")
    year, month, day, hour, minute, second, frac, offset = m.groups()
    if hour is not None and day is None:
        raise _BadDate("time without a full date")
    tz = UTC
    if offset:
        sign = -1 if offset[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
    try:
        when = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0),
                        int(minute or 0), int(second or 0),
                        round(float(frac) * 1e6) if frac else 0, tzinfo=tz)
    except ValueError:
        raise _BadDate("impossible date") from None
    if hour is None:
        fhir = "-".join(p for p in (year, month, day) if p)
        return fhir, when.astimezone(UTC), False
    zone = "Z" if not offset else f"{offset[:3]}:{offset[3:]}"
    fhir = f"{year}-{month}-{day}T{hour}:{minute or '00'}:{second or '00'}{frac or ''}{zone}"
    return fhir, when.astimezone(UTC), True


class _Mapper:
    """Walks one message's segments and collects resources."""

    def __init__(self, segments: Sequence[SegmentView], message_index: int,
                 today: date | None) -> None:
        self.segments = segments
        self.msh = segments[0]
        self.enc = _encoding(self.msh)
        self.today = today or datetime.now(UTC).date()
        self.control_id = self.msh.value(10)
        self.message_index = message_index
        self.event = self.msh.value(9, comp=2)
        self.resources: list[dict[str, Any]] = []
        self.patient_ref: str | None = None
        self.patient_resource: dict[str, Any] | None = None
        self.obr_time: tuple[str, datetime, bool] | None = None  # OBR-7, OBX-14's fallback
        self.patient_id: str | None = None
        self.warnings: list[Issue] = []
        self.owners: list[str | None] = []
        self.document: dict[str, Any] | None = None
        self.note_run: tuple[dict[str, Any], str] | None = None  # (resource, OBX-3 code)

    # helpers ---------------------------------------------------------------------------

    def text(self, seg: SegmentView, field: int, rep: int = 1, comp: int = 1,
             sub: int = 1) -> str:
        return unescape(seg.value(field, rep, comp, sub), self.enc).strip()

    def new_id(self, kind: str, seg: SegmentView) -> str:
        seed = f"{self.message_index}|{self.control_id}|{kind}|{seg.name}|{seg.index}"
        return str(uuid.uuid5(_ID_NAMESPACE, seed))

    def issue(self, seg: SegmentView, field: int | None, code: IssueCode, what: str) -> Issue:
        return Issue(code, what, severity="warning", segment=seg.name,
                     segment_index=seg.index, field=field)

    def warn(self, seg: SegmentView, field: int | None, code: IssueCode, what: str) -> None:
        """Record a nulled or dropped element, for the patient being mapped."""
        self.warnings.append(self.issue(seg, field, code, what))
        self.owners.append(self.patient_id)

    def when(self, seg: SegmentView, field: int, comp: int = 1) -> tuple[str, datetime,
                                                                          bool] | None:
        """The date/time in ``seg``-``field``; None, with a warning, when it cannot be one."""
        raw = seg.value(field, comp=comp).strip()
        if not raw:
            return None
        try:
            return parse_dtm(raw)
        except ValueError:
            self.warn(seg, field, "value", f"{seg.name}-{field} {_NOT_A_DTM}; left out")
            return None

    def coding(self, seg: SegmentView, field: int, rep: int = 1, first: int = 1
               ) -> dict[str, Any] | None:
        code = self.text(seg, field, rep, first)
        display = self.text(seg, field, rep, first + 1)
        system_name = self.text(seg, field, rep, first + 2)
        if not code and not display:
            return None
        coding: dict[str, Any] = {}
        system = _system_uri(system_name)
        if system:
            coding["system"] = system
        if code:
            coding["code"] = code
        if display:
            coding["display"] = display
        return coding

    def concept(self, seg: SegmentView, field: int, rep: int = 1) -> dict[str, Any] | None:
        codings = [c for c in (self.coding(seg, field, rep, 1), self.coding(seg, field, rep, 4))
                   if c and "code" in c]
        # CWE-9 (original text) is past the end of CE, so readers disagree on it: not used.
        text = self.text(seg, field, rep, 2)
        if not codings and not text:
            return None
        concept: dict[str, Any] = {}
        if codings:
            concept["coding"] = codings
        if text:
            concept["text"] = text
        return concept

    # walk -----------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        for seg in self.segments[1:]:
            name = seg.name
            if name == "PID":
                self.patient(seg)
            elif self.patient_ref is None:
                continue
            elif name == "PV1":
                self.encounter(seg)
            elif name == "MRG":
                self.merge(seg)
            elif name in ("OBR", "ORC"):
                if name == "OBR":
                    self.obr_time = self.when(seg, 7)
                self.document = None
                self.note_run = None
            elif name == "TXA":
                self.txa(seg)
            elif name == "OBX":
                self.obx(seg)
            elif name not in ("NTE", "PRT"):
                self.note_run = None
        if self.patient_ref is None:
            raise NotPatientData(Issue(
                "not-found", f"message type {self.msh.value(9)}^{self.event} has no PID "
                "segment, so it carries no patient data", segment="PID",
            ))
        # A DocumentReference needs content (1..*): a TXA with no text or data is dropped.
        self.resources = [r for r in self.resources
                          if r["resourceType"] != "DocumentReference" or r["content"]]
        return self.resources

    # PID ------------------------------------------------------------------------------

    def patient(self, pid: SegmentView) -> None:
        self.obr_time = None
        self.document = None
        self.note_run = None
        pid_id = self.new_id("Patient", pid)
        self.patient_id = pid_id
        self.patient_ref = f"Patient/{pid_id}"
        patient: dict[str, Any] = {"resourceType": "Patient", "id": pid_id}
        identifiers = [i for r in range(1, pid.repetitions(3) + 1)
                       if (i := self.identifier(pid, 3, r))]
        if identifiers:
            patient["identifier"] = identifiers
        names = [n for r in range(1, pid.repetitions(5) + 1) if (n := self.name(pid, 5, r))]
        if names:
            patient["name"] = names
        sex = self.text(pid, 8).upper()
        if sex:
            patient["gender"] = _SEX.get(sex, "unknown")
        birth = self.when(pid, 7)
        if birth is not None:
            local = birth[0].split("T")[0]  # the sender's calendar date, not shifted to UTC
            if date.fromisoformat((local + "-01-01")[:10]) > self.today:
                self.warn(pid, 7, "value", "PID-7 (date of birth) is in the future; left out")
            else:
                patient["birthDate"] = local
        death = self.when(pid, 29)
        if death is not None:
            patient["deceasedDateTime"] = death[0]
        elif (flag := self.text(pid, 30).upper()) in ("Y", "N"):
            patient["deceasedBoolean"] = flag == "Y"
        extensions = [e for e in (self.race(pid), self.ethnicity(pid)) if e]
        if extensions:
            patient["extension"] = extensions
        language = self.coding(pid, 15)
        if language and "code" in language:
            if _BCP47.match(language["code"]):
                language["system"] = "urn:ietf:bcp:47"
            else:
                language.pop("system", None)
            patient["communication"] = [{"language": {"coding": [language]}}]
        self.patient_resource = patient
        self.resources.append(patient)

    def merge(self, mrg: SegmentView) -> None:
        """MRG-1: the prior identifiers the current PID's patient replaces (v2-to-FHIR IG)."""
        assert self.patient_resource is not None
        links = [{"other": {"identifier": ident}, "type": "replaces"}
                 for r in range(1, mrg.repetitions(1) + 1) if (ident := self.identifier(mrg, 1, r))]
        if links:
            self.patient_resource.setdefault("link", []).extend(links)

    def identifier(self, seg: SegmentView, field: int, rep: int) -> dict[str, Any] | None:
        value = self.text(seg, field, rep, 1)
        if not value:
            return None
        ident: dict[str, Any] = {"system": self.authority(seg, field, rep), "value": value}
        kind = self.text(seg, field, rep, 5)
        if kind:
            ident["type"] = {"coding": [{"system": _V2 + "0203", "code": kind}]}
        return ident

    def authority(self, seg: SegmentView, field: int, rep: int) -> str:
        """CX-4 as a system: urn:oid for ISO, the namespace otherwise, else the sender."""
        namespace = self.text(seg, field, rep, 4, 1)
        universal = self.text(seg, field, rep, 4, 2)
        kind = self.text(seg, field, rep, 4, 3).upper()
        if universal and kind == "ISO":
            return f"urn:oid:{universal}"
        if universal and kind in ("UUID", "GUID"):
            return f"urn:uuid:{universal.lower()}"
        if universal and kind == "URI":
            return universal
        if namespace:
            return namespace
        if universal:
            return universal
        # No authority: identifiers are scoped to the sending facility (MSH-4), else app.
        sender = self.text(self.msh, 4) or self.text(self.msh, 3) or "unknown"
        return f"urn:hl7v2:sender:{sender}"

    def name(self, seg: SegmentView, field: int, rep: int) -> dict[str, Any] | None:
        family = self.text(seg, field, rep, 1, 1)
        given = [g for g in (self.text(seg, field, rep, 2), self.text(seg, field, rep, 3)) if g]
        if not family and not given:
            return None
        name: dict[str, Any] = {}
        if family:
            name["family"] = family
        if given:
            name["given"] = given
        use = self.text(seg, field, rep, 7)
        if use in ("L", "D"):
            name["use"] = "official" if use == "L" else "usual"
        return name

    def race(self, pid: SegmentView) -> dict[str, Any] | None:
        parts: list[dict[str, Any]] = []
        texts = []
        for rep in range(1, pid.repetitions(10) + 1):
            code, display = self.text(pid, 10, rep, 1), self.text(pid, 10, rep, 2)
            if re.fullmatch(r"\d{4}-\d", code):
                slot = "ombCategory" if code in _RACE_OMB else "detailed"
                coding = {"system": _OMB, "code": code, **({"display": display} if display else {})}
                parts.append({"url": slot, "valueCoding": coding})
            if display or code:
                texts.append(display or code)
        if not texts:
            return None
        parts.append({"url": "text", "valueString": ", ".join(texts)})
        return {"url": f"{_US_CORE}/us-core-race", "extension": parts}

    def ethnicity(self, pid: SegmentView) -> dict[str, Any] | None:
        code, display = self.text(pid, 22, 1, 1), self.text(pid, 22, 1, 2)
        if not code and not display:
            return None
        parts: list[dict[str, Any]] = []
        cdc = _ETHNICITY_V2.get(code, code)
        if cdc in _ETHNICITY_OMB:
            parts.append({"url": "ombCategory", "valueCoding": {
                "system": _OMB, "code": cdc, "display": _ETHNICITY_OMB[cdc]}})
        parts.append({"url": "text", "valueString": display or code})
        return {"url": f"{_US_CORE}/us-core-ethnicity", "extension": parts}

    # PV1 ------------------------------------------------------------------------------

    def encounter(self, pv1: SegmentView) -> None:
        klass = self.text(pv1, 2).upper()
        if klass in _PATIENT_CLASS:
            code, display = _PATIENT_CLASS[klass]
            coding = {"system": _ACT_CODE, "code": code, "display": display}
        elif klass:
            coding = {"system": _V2 + "0004", "code": klass}
        else:
            coding = {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
                      "code": "UNK"}
        start, end = self.when(pv1, 44), self.when(pv1, 45)
        if end is not None or self.event == "A03":
            status = "finished"
        elif self.event == "A11":
            status = "cancelled"
        elif self.event in ("A05", "A14") or klass == "P":
            status = "planned"
        else:
            status = "in-progress"
        enc: dict[str, Any] = {
            "resourceType": "Encounter", "id": self.new_id("Encounter", pv1),
            "status": status, "class": coding, "subject": {"reference": self.patient_ref},
        }
        visit = self.identifier(pv1, 19, 1)
        if visit:
            enc["identifier"] = [visit]
        period = {k: v[0] for k, v in (("start", start), ("end", end)) if v is not None}
        if period:
            enc["period"] = period
        self.resources.append(enc)

    # OBX ------------------------------------------------------------------------------

    def obx(self, obx: SegmentView) -> None:
        kind = self.text(obx, 2).upper()
        if self.document is not None:
            self.document_content(obx, kind)
            return
        if kind in _NOTE_TYPES:
            self.note(obx)
            return
        self.note_run = None
        if not kind and obx.repetitions(5):
            # OBX-2 is required when OBX-5 is valued; read the value as the text it is.
            self.warn(obx, 2, "required", "OBX-2 (value type) is empty; OBX-5 read as text (ST)")
            kind = "ST"
        if not kind:
            return  # no type and no value: nothing was sent to keep
        try:
            if kind in _VALUE_TYPES:
                self.observation(obx, kind)
            elif obx.repetitions(5) and (kind != "ED" or self.text(obx, 5, 1, 5)):
                # (An ED that only names its type, without ED-5 data, carries nothing.)
                raise _Dropped(self.issue(obx, 2, "not-supported", _unkept(kind)))
        except _Dropped as dropped:
            self.warnings.append(dropped.issue)
            self.owners.append(self.patient_id)

    def observation(self, obx: SegmentView, kind: str) -> None:
        code = self.concept(obx, 3)
        if code is None:
            raise _Dropped(self.issue(obx, 3, "required", "OBX-3 (observation identifier) is "
                                      "empty, so the result names nothing; result dropped"))
        # OBX-5 before OBX-14: a result dropped for its value gets that one warning only.
        value = self.value(obx, kind)
        obs: dict[str, Any] = {
            "resourceType": "Observation", "id": self.new_id("Observation", obx),
            "status": _OBX_STATUS.get(self.text(obx, 11).upper(), "unknown"),
            "code": code, "subject": {"reference": self.patient_ref},
        }
        effective = self.when(obx, 14) or self.obr_time
        if effective is not None:
            obs["effectiveDateTime"] = effective[0]
        if value:
            obs.update(value)
        ref = self.reference_range(obx)
        if ref:
            obs["referenceRange"] = [ref]
        interpretation = self.text(obx, 8)
        if interpretation:
            obs["interpretation"] = [{"coding": [{"system": _V2 + "0078",
                                                  "code": interpretation}]}]
        self.resources.append(obs)

    def quantity(self, number: str, obx: SegmentView, comparator: str = "") -> dict[str, Any]:
        quantity: dict[str, Any] = {"value": _number(number)}
        if comparator:
            quantity["comparator"] = comparator
        unit = self.text(obx, 6, 1, 1)
        if unit:
            quantity["unit"] = unit
            system = self.text(obx, 6, 1, 3).upper()
            if system == "UCUM":
                quantity |= {"system": UCUM, "code": unit}
            elif is_known_unit(unit):
                quantity |= {"system": UCUM, "code": canonical_unit(unit)}
        return quantity

    def bad_value(self, obx: SegmentView, kind: str) -> _Dropped:
        expected = _EXPECTED.get(kind, f"a {kind} value")
        return _Dropped(self.issue(obx, 5, "value", f"OBX-5 is not {expected} as OBX-2 "
                                   f"{kind} declares; result dropped"))

    def value(self, obx: SegmentView, kind: str) -> dict[str, Any] | None:
        """OBX-5 as a FHIR value[x]; raises :class:`_Dropped` when it is not of its type."""
        if kind == "SN":
            return self.structured_numeric(obx)
        if kind in ("CWE", "CE", "CNE", "CF"):
            concept = self.concept(obx, 5)
            return {"valueCodeableConcept": concept} if concept else None
        raw = self.text(obx, 5)
        if not raw:
            return None
        if kind == "NM":
            if _NUMBER.match(raw):
                return {"valueQuantity": self.quantity(raw, obx)}
            # "<2.22" is a bound the lab measured, not an error: keep the comparator.
            if (m := _COMPARED.match(raw)) and _NUMBER.match(m[2]):
                return {"valueQuantity": self.quantity(m[2], obx, m[1])}
            raise self.bad_value(obx, kind)
        if kind in ("DT", "DTM", "TS"):
            try:
                return {"valueDateTime": parse_dtm(obx.value(5).strip())[0]}
            except ValueError:
                raise self.bad_value(obx, kind) from None
        if kind == "TM":
            m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,4})?([+-]\d{4})?", raw)
            if not m or int(m[1]) > 23 or int(m[2] or 0) > 59 or int(m[3] or 0) > 59:
                raise self.bad_value(obx, kind)
            return {"valueTime": f"{m[1]}:{m[2] or '00'}:{m[3] or '00'}"}
        return {"valueString": raw}

    def structured_numeric(self, obx: SegmentView) -> dict[str, Any] | None:
        """SN: ``<^2.22`` a bounded quantity, ``^10^-^20`` a range, ``^1^:^128`` a ratio."""
        comparator, num1 = self.text(obx, 5, 1, 1), self.text(obx, 5, 1, 2)
        sep, num2 = self.text(obx, 5, 1, 3), self.text(obx, 5, 1, 4)
        if not (comparator or num1 or sep or num2):
            return None
        if comparator not in ("", "=", "<", "<=", ">", ">=", "<>") or not _NUMBER.match(num1):
            raise self.bad_value(obx, "SN")
        if not sep and not num2:
            if comparator == "<>":
                raise self.bad_value(obx, "SN")
            return {"valueQuantity": self.quantity(num1, obx, "" if comparator == "=" else
                                                   comparator)}
        if comparator in ("", "=") and sep == "+" and not num2:
            return {"valueString": f"{num1}+"}  # a category: "2+"
        if comparator not in ("", "=") or not _NUMBER.match(num2):
            raise self.bad_value(obx, "SN")
        if sep == "-":
            return {"valueRange": {"low": self.quantity(num1, obx),
                                   "high": self.quantity(num2, obx)}}
        if sep in (":", "/"):
            return {"valueRatio": {"numerator": {"value": _number(num1)},
                                   "denominator": {"value": _number(num2)}}}
        raise self.bad_value(obx, "SN")

    def reference_range(self, obx: SegmentView) -> dict[str, Any] | None:
        raw = self.text(obx, 7)
        if not raw:
            return None
        unit = {k: v for k, v in self.quantity("0", obx).items() if k != "value"}
        if (m := _RANGE.match(raw)) and _NUMBER.match(m[1]) and _NUMBER.match(m[2]):
            return {"low": {"value": _number(m[1]), **unit},
                    "high": {"value": _number(m[2]), **unit}}
        if (m := _BOUND.match(raw)) and _NUMBER.match(m[2]):
            side = "high" if m[1] == "<" else "low"
            return {side: {"value": _number(m[2]), **unit}}
        return {"text": raw}

    # notes ----------------------------------------------------------------------------

    def txa(self, txa: SegmentView) -> None:
        self.note_run = None
        doc = self.document_reference(txa)
        kind = self.text(txa, 2)
        if kind:
            doc["type"] = {"coding": [{"system": _V2 + "0270", "code": kind}]}
        status = _DOC_STATUS.get(self.text(txa, 17).upper())
        if status:
            doc["docStatus"] = status
        number = self.text(txa, 12)
        if number:
            doc["masterIdentifier"] = {"value": number}
        when = self.when(txa, 4) or self.when(txa, 6)
        if when is not None:
            _set_document_time(doc, when)
        self.document = doc
        self.resources.append(doc)

    def document_reference(self, seg: SegmentView) -> dict[str, Any]:
        return {
            "resourceType": "DocumentReference", "id": self.new_id("DocumentReference", seg),
            "status": "current", "subject": {"reference": self.patient_ref}, "content": [],
        }

    def document_content(self, obx: SegmentView, kind: str) -> None:
        """An OBX of a TXA's document: text lines and base64 ED attachments are its content."""
        assert self.document is not None
        if kind in _NOTE_TYPES:
            _append_text(self.document, self.obx_text(obx))
            return
        if kind == "ED":
            data = self.text(obx, 5, 1, 5)
            if not data:
                return  # an ED that only names its type carries nothing
            if self.text(obx, 5, 1, 4).upper() == "BASE64":
                main, sub = self.text(obx, 5, 1, 2), self.text(obx, 5, 1, 3)
                content_type = _mime(main, sub)
                self.document["content"].append(
                    {"attachment": {"contentType": content_type, "data": data}})
                return
            self.warn(obx, 5, "not-supported", "OBX-5 ED data is not Base64 encoded (ED-4); "
                      "not kept with the document")
        elif obx.repetitions(5):
            self.warn(obx, 2, "not-supported", f"OBX-2 {kind or 'empty'} within a TXA "
                      "document is not note text (TX, FT) or an attachment (ED); not kept")

    def obx_text(self, obx: SegmentView) -> str:
        return "\n".join(self.text(obx, 5, r) for r in range(1, obx.repetitions(5) + 1))

    def note(self, obx: SegmentView) -> None:
        code = obx.value(3)
        if self.note_run is not None and self.note_run[1] == code:
            _append_text(self.note_run[0], self.obx_text(obx))
            return
        doc = self.document_reference(obx)
        concept = self.concept(obx, 3)
        if concept:
            doc["type"] = concept
        when = self.when(obx, 14) or self.obr_time
        if when is not None:
            _set_document_time(doc, when)
        _append_text(doc, self.obx_text(obx))
        self.note_run = (doc, code)
        self.resources.append(doc)


def _append_text(doc: dict[str, Any], text: str) -> None:
    """Add a line to the document's text/plain attachment (base64, as R4 requires)."""
    if not text:
        return
    for content in doc["content"]:
        attachment = content["attachment"]
        if attachment["contentType"].startswith("text/plain"):
            old = base64.b64decode(attachment["data"]).decode("utf-8")
            attachment["data"] = _b64(old + "\n" + text)
            return
    doc["content"].append({"attachment": {"contentType": "text/plain; charset=utf-8",
                                          "data": _b64(text)}})


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _set_document_time(doc: dict[str, Any], when: tuple[str, datetime, bool]) -> None:
    fhir, _, has_time = when
    doc["context"] = {"period": {"start": fhir}}
    if has_time:
        # DocumentReference.date is an instant: full seconds and a zone.
        doc["date"] = fhir


def _mime(main: str, sub: str) -> str:
    main, sub = main.lower(), sub.lower()
    if main == "im":
        main = "image"
    elif main in ("", "ap", "application"):
        main = "application"
    elif main == "tx":
        main = "text"
    return f"{main}/{sub or 'octet-stream'}"


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() \
        else value


def _system_uri(name: str) -> str | None:
    name = name.strip()
    if not name:
        return None
    if name.upper() in CODE_SYSTEMS:
        return CODE_SYSTEMS[name.upper()]
    if re.fullmatch(r"HL7\d{4}", name.upper()):
        return _V2 + name[3:]
    return None  # a local code system (L, 99zzz): keep the code, claim no system


def _encoding(msh: SegmentView) -> Encoding:
    chars = msh.value(2)
    return Encoding(msh.value(1) or "|", *(chars + "^~\\&"[len(chars):])[:4])


def map_message(
    segments: Sequence[SegmentView], *, message_index: int = 1, today: date | None = None
) -> MappedMessage:
    """FHIR R4 resources (JSON dicts) for one parsed message, and what was left out.

    Parameters
    ----------
    segments
        The message's segments, MSH first, from either reader.
    message_index
        Position of the message in its batch; part of the resource ids.
    today
        The date a birth date may not be after (default: today, UTC).

    Raises
    ------
    IngestError
        The message as a whole cannot be read (its MSH-12 version); located, value-free.
    NotPatientData
        When the message has no PID.
    """
    message_version(segments)
    mapper = _Mapper(segments, message_index, today)
    resources = mapper.run()
    return MappedMessage(resources, mapper.warnings, mapper.owners)


def message_to_resources(
    segments: Sequence[SegmentView], *, message_index: int = 1, today: date | None = None
) -> list[dict[str, Any]]:
    """The resources of :func:`map_message`, without its warnings."""
    return map_message(segments, message_index=message_index, today=today).resources
