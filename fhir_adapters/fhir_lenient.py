"""FHIR JSON and NDJSON read element by element: what is bad is dropped with a located warning.

The fast reader (:mod:`fhir_adapters.fhir_json`) rejects a unit whole on any problem,
which is what a FHIR transaction needs. Files and bulk exports are not transactions, so
here the smallest bad element goes and everything else is kept:

- a time the resource can live without (``effective[x]``, ``issued``, ``onset[x]``,
  ``period``, ``authoredOn``, ``birthDate``, ``deceasedDateTime``...) that is malformed or
  in the future is **nulled**: the resource reads as if it had none (an Observation then
  takes ``issued``, as it would if the time were missing). So are a bad reference range,
  an Observation component without a code, an ImagingStudy series without uid or modality,
  an attachment that does not decode, a malformed identifier, and a reference that does
  not resolve, other than the subject;
- any other problem **drops the resource**: a missing required element, a value or code of
  the wrong type, a subject that does not resolve. Resources whose patient was dropped go
  with it, rather than attach to a patient known only by reference;
- an NDJSON **line** that is not JSON, not an object, has no or an unknown resourceType, or
  is a Bundle is dropped; so is a Bundle **entry** that is not a resource. A problem with the
  Bundle itself (its type) rejects the file.

Every nulled or dropped element is one warning (severity ``warning``) that names the file,
the NDJSON line or the Bundle entry, and the element's FHIRPath, never a value. A warning
about a patient's resource goes to that patient's ``PatientRecord.warnings``; the others (a
bad line, a dropped Patient) are the unit's notices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir_adapters.errors import IngestError, Issue, NotPatientData
from fhir_adapters.fhir_json import (
    _SUBJECT,
    _as_text,
    _check_resource_type,
    _Ingest,
    _Item,
    _items_from_document,
    _load_json,
)
from fhir_adapters.file_kinds import json_reason
from fhir_adapters.record import PatientRecord

__all__ = ["MAX_WARNINGS", "LenientRead", "read_document", "read_ndjson"]

#: Warnings listed per unit; past it one notice counts the rest, so a systematically broken
#: export stays readable.
MAX_WARNINGS = 1000

NULLED = "ignored, read as absent"
DROPPED = "the resource was dropped"


@dataclass
class LenientRead:
    """What one unit (a document, or a bulk export's NDJSON files) gave."""

    records: list[PatientRecord]
    #: Warnings that belong to no patient that was kept (a bad line, a dropped Patient).
    notices: list[Issue] = field(default_factory=list)
    #: (file name, line, resource) of each NDJSON line that was kept, in order.
    kept: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    #: Resources, entries and lines dropped.
    dropped: int = 0
    #: Why no record came out, when none did.
    no_patient_reason: str | None = None

    @property
    def warnings(self) -> list[Issue]:
        """Every warning: the records' and the notices."""
        return [w for r in self.records for w in r.warnings] + self.notices


def read_document(data: bytes | str, source: str | None = None) -> LenientRead:
    """Records from one FHIR JSON document (a Bundle or one resource), element by element.

    Raises
    ------
    NotPatientData
        JSON that is not FHIR (no resourceType), or FHIR without patient data.
    IngestError
        The document as a whole is unusable (not UTF-8, malformed JSON, a bad Bundle.type),
        or every patient in it was dropped.
    """
    try:
        raw = _as_text(data)
        obj = _load_json(raw)
        reason = json_reason(obj)
        if reason is not None:
            raise NotPatientData(Issue("not-supported", reason))
        items, issues = _items_from_document(obj)
        bundle_level = [i for i in issues if not (i.expression or "").startswith("Bundle.entry[")]
        if bundle_level:
            raise IngestError(issues)
        where = source or "input"
        read = _Unit(items, str(obj["resourceType"]), raw, lambda item: where).run()
        read.dropped += len(issues)
        entry_warnings = [_warning(i, where, None, "the entry was dropped") for i in issues]
        return _finish(read, entry_warnings, source)
    except IngestError as e:
        raise e if e.source is not None or source is None else type(e)(
            e.issues, source=source) from None


def read_ndjson(files: Mapping[str, bytes | str], source: str | None = None, *,
                drop_nullable: bool = False, require_patients: bool = True) -> LenientRead:
    """Records from NDJSON files read together (a bulk export links across files), by line.

    ``files`` maps a file name (shown in warnings: ``Observation.ndjson line 7``; "" for one
    unnamed file) to its content. With ``drop_nullable`` a problem that would null an
    element drops the resource instead (a store keeps resources as sent, so it cannot keep
    one with an element it would ignore). Without ``require_patients`` no patient data is
    not an error (a store takes Organizations too).

    Raises
    ------
    IngestError
        No line could be used; its issues are the dropped lines.
    NotPatientData
        With ``require_patients``, when the resources hold no patient data.
    """
    items: list[_Item] = []
    line_of: dict[int, tuple[str, int]] = {}
    dropped_lines: list[Issue] = []
    for name, content in files.items():
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            label = f"{name} line {lineno}" if name else f"line {lineno}"
            item, issue = _line_item(line, label)
            if item is None:
                assert issue is not None
                dropped_lines.append(_warning(issue, label, None, "the line was dropped"))
                continue
            items.append(item)
            line_of[id(item)] = (name, lineno)
    if not items:
        if dropped_lines:
            raise IngestError([_as_error(w) for w in dropped_lines[:MAX_WARNINGS]],
                              source=source)
        raise IngestError(Issue("structure", "empty input: no resources in the NDJSON"),
                          source=source)
    unit = _Unit(items, "NDJSON", None, lambda item: item.label or "input",
                 drop_nullable=drop_nullable)
    read = unit.run()
    read.dropped += len(dropped_lines)
    read.kept = [(*line_of[id(i)], i.resource) for i in unit.kept]
    if not require_patients and not read.records:
        read.notices = dropped_lines + read.notices
        _cap(read)
        return read
    return _finish(read, dropped_lines, source)


# --------------------------------------------------------------------------- the unit


class _Unit:
    """Run the fast reader over items, dropping what its issues condemn, until none does."""

    def __init__(self, items: list[_Item], what: str, raw: str | None, locate: Any, *,
                 drop_nullable: bool = False) -> None:
        self.items = items
        self.what = what
        self.raw = raw
        self.locate = locate  # item -> "file" or "file line N", the warning's prefix
        self.drop_nullable = drop_nullable
        self.dropped: dict[int, _Item] = {}
        self.drop_warnings: list[tuple[_Item, Issue]] = []
        self.kept: list[_Item] = []

    def run(self) -> LenientRead:
        raw = self.raw
        while True:
            nulled: list[tuple[_Item | None, Issue]] = []
            condemned: list[tuple[_Item, Issue]] = []

            def sink(item: _Item | None, issue: Issue, nullable: bool,
                     nulled: list[tuple[_Item | None, Issue]] = nulled,
                     condemned: list[tuple[_Item, Issue]] = condemned) -> None:
                root = (item.container or item) if item is not None else None
                if root is None or (nullable and not self.drop_nullable):
                    nulled.append((root, issue))
                else:
                    condemned.append((root, issue))

            self.kept = [i for i in self.items if id(i) not in self.dropped]
            ingest = _Ingest(self.kept, self.what, raw, on_issue=sink)
            records = ingest.map_records()
            if not condemned:
                break
            for root, issue in condemned:
                self.dropped[id(root)] = root
                self.drop_warnings.append((root, self._warning(root, issue, DROPPED)))
            self._drop_dependents(ingest)
            # The text scan of references counts every resource in the raw text; with some
            # dropped it can only fail, so skip it.
            raw = None
        return self._attribute(ingest, records, nulled)

    def _drop_dependents(self, ingest: _Ingest) -> None:
        """Drop what belongs to a dropped resource (its subject), so it is not misfiled."""
        for item in self.items:
            elem = _SUBJECT.get(item.rt)
            if id(item) in self.dropped or elem is None:
                continue
            subject = item.resource.get(elem)
            ref = subject.get("reference") if isinstance(subject, dict) else None
            target = ingest.resolve(ref, item) if isinstance(ref, str) and ref else None
            if target is not None and id(target.container or target) in self.dropped:
                self.dropped[id(item)] = item
                issue = Issue("not-found", f"its {elem} was dropped", f"{item.expr}.{elem}")
                self.drop_warnings.append((item, self._warning(item, issue, DROPPED)))

    def _warning(self, item: _Item | None, issue: Issue, action: str) -> Issue:
        where = self.locate(item) if item is not None else self.what
        return _warning(issue, where, item.label if item is not None else None, action)

    def _attribute(self, ingest: _Ingest, records: dict[tuple[Any, ...], PatientRecord],
                   nulled: list[tuple[_Item | None, Issue]]) -> LenientRead:
        """Each warning to the record of the patient its resource belongs to, else a notice."""
        read = LenientRead(list(records.values()), dropped=len(self.dropped))
        found = [(item, self._warning(item, issue, NULLED)) for item, issue in nulled]
        for item, warning in self.drop_warnings + found:
            record = None
            if item is not None:
                slot = (("item", id(item)) if item.rt == "Patient"
                        else ingest.patient_slot(item))
                record = records.get(slot) if slot is not None else None
            if record is not None:
                record.warnings.append(warning)
            else:
                read.notices.append(warning)
        if not records:
            read.no_patient_reason = ingest._no_patient_reason()
        return read


# --------------------------------------------------------------------------- helpers


def _line_item(line: bytes, label: str) -> tuple[_Item | None, Issue | None]:
    """The resource on one NDJSON line, or the issue that drops the line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, Issue("structure", f"not UTF-8 text (invalid byte at offset {e.start}); "
                           "NDJSON must be UTF-8")
    try:
        obj = _load_json(text)
    except IngestError as e:
        return None, e.issues[0]
    bad = _check_resource_type(obj, "", None)
    if bad is not None:
        return None, bad
    if obj["resourceType"] == "Bundle":
        return None, Issue("not-supported", "a Bundle inside NDJSON is not ingested; NDJSON "
                           "carries one resource per line", "Bundle")
    return _Item(obj, obj["resourceType"], None, label), None


def _warning(issue: Issue, where: str, label: str | None, action: str) -> Issue:
    """The issue as a warning whose text says where (file, line) and what was done."""
    text = issue.diagnostics
    if label:
        text = text.removeprefix(f"{label}: ")
    loc = f"{where}, {issue.expression}" if issue.expression else where
    return Issue(issue.code, f"{loc}: {text}; {action}", issue.expression, "warning")


def _as_error(warning: Issue) -> Issue:
    return Issue(warning.code, warning.diagnostics, warning.expression)


def _finish(read: LenientRead, more: list[Issue], source: str | None) -> LenientRead:
    read.notices = more + read.notices
    _cap(read)
    if read.records:
        return read
    if read.dropped:
        # Nothing usable: what was dropped is why, and the unit is rejected.
        raise IngestError([_as_error(w) for w in read.notices[:MAX_WARNINGS]], source=source)
    what = read.no_patient_reason or "no patient data"
    raise NotPatientData(Issue("not-supported", what), source=source)


def _cap(read: LenientRead) -> None:
    total = len(read.warnings)
    if total <= MAX_WARNINGS:
        return
    room = MAX_WARNINGS
    for record in read.records:
        record.warnings = record.warnings[:room]
        room -= len(record.warnings)
    read.notices = read.notices[:room]
    read.notices.append(Issue("too-long", f"{total - MAX_WARNINGS} more warnings of this "
                              "input are not listed", None, "warning"))

