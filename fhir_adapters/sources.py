"""Read patient records from files and folders: FHIR JSON, NDJSON bulk exports, HL7 v2.

A folder is read file by file. Its ``*.ndjson`` (and ``*.ndjson.gz``) files that hold FHIR
resources are one FHIR Bulk Data export (one resource type per file) and are read together
so references link across them. Files that hold no patient data (a bulk-data client's
``log.ndjson``, a README, ``.DS_Store``, an empty file, JSON that is not FHIR) are skipped
with the reason (:mod:`fhir_adapters.file_kinds`); gzip is read with a cap on its
decompressed size (:mod:`fhir_adapters.bounded_gzip`).

Within a file the smallest bad element is dropped with a located warning
(:mod:`fhir_adapters.fhir_lenient`); a file that gives nothing usable is rejected with its
issues, and the others are still read. ``strict=True`` keeps the all-or-nothing reading:
every resource is validated with ``fhir.resources`` and any problem rejects its file (or the
whole bulk export).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from fhir_adapters.bounded_gzip import MAX_DECOMPRESSED_BYTES, read_bytes
from fhir_adapters.errors import IngestError, Issue, NotPatientData
from fhir_adapters.fhir_json import records_from_json, records_from_ndjson
from fhir_adapters.fhir_lenient import LenientRead, read_document, read_ndjson
from fhir_adapters.file_kinds import hidden_reason, json_reason, ndjson_reason
from fhir_adapters.ingest_report import FileResult, IngestReport
from fhir_adapters.record import PatientRecord, merge_records

__all__ = ["detect_format", "iter_records", "iter_results", "read_bulk_export", "read_file",
           "read_file_result", "read_records", "read_sources"]

Format = Literal["json", "ndjson", "hl7"]

_BY_SUFFIX: dict[str, Format] = {
    ".json": "json", ".ndjson": "ndjson", ".jsonl": "ndjson",
    ".hl7": "hl7", ".hl7v2": "hl7", ".er7": "hl7",
}
_HL7_STARTS = (b"MSH", b"\x0bMSH", b"FHS", b"BHS")
#: Suffixes of the files a bulk export folder reads together.
_BULK_SUFFIXES = (".ndjson", ".ndjson.gz")


def detect_format(path: Path, head: bytes) -> Format | None:
    """The format of a file, from its suffix or else its first bytes; None if unknown."""
    by_suffix = _BY_SUFFIX.get(path.suffix.lower())
    if by_suffix is not None:
        return by_suffix
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if start.startswith(_HL7_STARTS):
        return "hl7"
    if start.startswith(b"{"):
        lines = [ln for ln in start.splitlines() if ln.strip()]
        # One object per line (and more than one line) is NDJSON; else a JSON document.
        if len(lines) > 1 and all(ln.lstrip().startswith(b"{") and ln.rstrip().endswith(b"}")
                                  for ln in lines[:-1]):
            return "ndjson"
        return "json"
    return None


def read_file(path: Path, *, strict: bool = False,
              max_decompressed: int = MAX_DECOMPRESSED_BYTES) -> list[PatientRecord]:
    """Records from one file, each carrying the warnings about its patient's data.

    Raises
    ------
    IngestError
        The file is malformed, unreadable, of an unknown format, or nothing in it is usable.
    NotPatientData
        The file holds no patient data (not FHIR, or FHIR without patients); skip it.
    """
    result = read_file_result(path, strict=strict, max_decompressed=max_decompressed)
    if result.error is not None:
        raise result.error
    return result.records


def read_file_result(path: Path, *, strict: bool = False,
                     max_decompressed: int = MAX_DECOMPRESSED_BYTES) -> FileResult:
    """What one file gave: records and notices, or the error that skipped or rejected it."""
    source = str(path)
    try:
        data, suffix = read_bytes(path, max_decompressed=max_decompressed)
        if not data.strip():
            raise NotPatientData(Issue("not-supported", "empty file: no patient data"))
        logical = path if suffix == path.suffix.lower() else path.with_suffix("")
        fmt = detect_format(logical, data[:4096])
        if fmt == "json":
            return _json_file(data, source, strict)
        if fmt == "ndjson":
            reason = ndjson_reason(data)
            if reason is not None:
                raise NotPatientData(Issue("not-supported", reason))
            if strict:
                return FileResult(source, records_from_ndjson(data, source, strict=True))
            return _result(source, read_ndjson({source: data}, source))
        if fmt == "hl7":
            return _hl7_file(data, source, strict)
        raise NotPatientData(Issue("not-supported", "not a FHIR JSON, NDJSON or HL7 v2 file "
                                   f"(suffix {path.suffix or 'none'!r}, content not recognised)"))
    except IngestError as e:
        return FileResult(source, error=_with_source(e, source))


def read_bulk_export(folder: Path, *, strict: bool = False) -> list[PatientRecord]:
    """Records from the FHIR NDJSON files of one Bulk Data export folder, linked."""
    for result in _iter_folder(folder, strict, MAX_DECOMPRESSED_BYTES, recurse=False):
        if result.source == str(folder):
            if result.error is not None:
                raise result.error
            return result.records
    raise NotPatientData(Issue("not-found", "no FHIR NDJSON files in the folder"),
                         source=str(folder))


def iter_results(paths: Iterable[Path], *, strict: bool = False,
                 max_decompressed: int = MAX_DECOMPRESSED_BYTES) -> Iterator[FileResult]:
    """What each file gave, for files and folders (recursively)."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            yield from _iter_folder(path, strict, max_decompressed)
        elif path.is_file():
            yield read_file_result(path, strict=strict, max_decompressed=max_decompressed)
        else:
            yield FileResult(str(path), error=IngestError(
                Issue("not-found", "no such file or folder"), source=str(path)))


def iter_records(
    paths: Iterable[Path], *, strict: bool = False
) -> Iterator[PatientRecord | IngestError]:
    """Records, or the error that skipped or rejected a file, for files and folders.

    Records are not merged: the same patient may come from several files.
    """
    for result in iter_results(paths, strict=strict):
        if result.error is not None:
            yield result.error
        yield from result.records


def read_sources(paths: Iterable[Path], *, strict: bool = False,
                 link_by_resource_id: bool = True,
                 max_decompressed: int = MAX_DECOMPRESSED_BYTES) -> IngestReport:
    """Everything under ``paths``: records merged per patient, skipped and rejected files,
    and the warnings that belong to no patient. See :func:`read_records` for the linking."""
    report = IngestReport()
    records: list[PatientRecord] = []
    for result in iter_results(paths, strict=strict, max_decompressed=max_decompressed):
        if isinstance(result.error, NotPatientData):
            report.skipped.append(result.error)
        elif result.error is not None:
            report.rejected.append(result.error)
        else:
            report.files_read += result.files
            records.extend(result.records)
            report.notices.extend(result.notices)
    report.records = merge_records(records)
    if link_by_resource_id:
        report.records = _link_by_resource_id(report.records)
    return report


def read_records(
    paths: Iterable[Path], *, strict: bool = False, link_by_resource_id: bool = True
) -> tuple[list[PatientRecord], list[IngestError]]:
    """All records under ``paths``, merged per patient, and the files that were not ingested
    (skipped as not patient data, or rejected).

    Parameters
    ----------
    link_by_resource_id
        Also fold a record known only by a reference (``Patient/example`` from a
        lone Observation) into the one record whose Patient resource has that
        id. Right when the files come from one server; turn it off when mixing
        servers whose resource ids may collide.
    """
    report = read_sources(paths, strict=strict, link_by_resource_id=link_by_resource_id)
    return report.records, report.errors


def _iter_folder(folder: Path, strict: bool, max_decompressed: int, *,
                 recurse: bool = True) -> Iterator[FileResult]:
    bulk: dict[str, bytes] = {}
    for path in sorted(folder.iterdir()):
        reason = hidden_reason(path)
        if reason is not None:
            yield _skipped(path, reason)
        elif path.is_dir():
            if recurse:
                yield from _iter_folder(path, strict, max_decompressed)
        elif not path.name.lower().endswith(_BULK_SUFFIXES):
            if recurse:
                yield read_file_result(path, strict=strict, max_decompressed=max_decompressed)
        else:
            # Read now to tell FHIR from a client's log; the FHIR ones are linked below.
            try:
                data, _ = read_bytes(path, max_decompressed=max_decompressed)
            except IngestError as e:
                yield FileResult(str(path), error=e)
                continue
            reason = ndjson_reason(data) if data.strip() else "empty file: no patient data"
            if reason is not None:
                yield _skipped(path, reason)
            else:
                bulk[str(path)] = data
    if bulk:
        yield _bulk_result(bulk, str(folder), strict)


def _bulk_result(files: dict[str, bytes], source: str, strict: bool) -> FileResult:
    try:
        if strict:
            result = FileResult(source, records_from_ndjson(
                dict[str, bytes | str](files), source, strict=True))
        else:
            result = _result(source, read_ndjson(dict[str, bytes | str](files), source))
    except IngestError as e:
        result = FileResult(source, error=_with_source(e, source))
    result.files = len(files)
    return result


def _json_file(data: bytes, source: str, strict: bool) -> FileResult:
    if not strict:
        return _result(source, read_document(data, source))
    try:
        return FileResult(source, records_from_json(data, source, strict=True))
    except IngestError:
        # Rejected or not FHIR at all? Only a rejection pays for the second parse.
        try:
            reason = json_reason(json.loads(data))
        except (ValueError, RecursionError):
            reason = None
        if reason is not None:
            raise NotPatientData(Issue("not-supported", reason)) from None
        raise


def _result(source: str, read: LenientRead) -> FileResult:
    return FileResult(source, read.records, read.notices)


def _skipped(path: Path, reason: str) -> FileResult:
    return FileResult(str(path), error=NotPatientData(Issue("not-supported", reason),
                                                      source=str(path)))


def _with_source(error: IngestError, source: str) -> IngestError:
    if error.source is not None:
        return error
    return type(error)(error.issues, source=source)


def _hl7_file(data: bytes, source: str, strict: bool) -> FileResult:
    """An HL7 v2 file: a message that cannot be read is dropped alone, as a file notice.

    Under ``strict`` anything nulled or dropped rejects the whole file instead.
    """
    try:
        from fhir_adapters.hl7v2 import records_from_hl7
    except ImportError:
        raise IngestError(Issue("not-supported", "HL7 v2 input needs fhir_adapters.hl7v2, which "
                                "is not available in this installation"), source=source) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # HL7 v2's default character set (MSH-18 empty) is ASCII, commonly sent as Latin-1.
        text = data.decode("latin-1")
    dropped: list[IngestError] = []
    records = records_from_hl7(text, source, errors=dropped)
    for record in records:
        record.warnings = [_in_file(w, source) for w in record.warnings]
    notices = [_in_file(dataclasses.replace(issue, severity="warning"), source)
               for error in dropped for issue in error.issues]
    if strict:
        issues = [dataclasses.replace(i, severity="error")
                  for i in [*notices, *(w for r in records for w in r.warnings)]]
        if issues:
            raise IngestError(issues, source=source)
    return FileResult(source, records, notices)


def _in_file(issue: Issue, source: str) -> Issue:
    """The issue with its file in the text, as FHIR warnings have: records merge across files."""
    return dataclasses.replace(issue, diagnostics=f"{source}, {issue.where()}: {issue.diagnostics}")


def _link_by_resource_id(records: list[PatientRecord]) -> list[PatientRecord]:
    keyed: dict[str, list[PatientRecord]] = {}
    for r in records:
        if r.identifiers and r.resource_id:
            keyed.setdefault(r.resource_id, []).append(r)
    out: list[PatientRecord] = []
    for r in records:
        if r.key is None and not r.identifiers and r.resource_id:
            targets = keyed.get(r.resource_id, [])
            if len(targets) == 1:  # ambiguous ids stay apart rather than mislink patients
                targets[0].merge(r)
                continue
        out.append(r)
    return out
