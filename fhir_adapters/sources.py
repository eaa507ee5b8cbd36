"""Read patient records from files and folders: FHIR JSON, NDJSON bulk exports, HL7 v2.

A folder is read file by file, except that its ``*.ndjson`` files are one FHIR
Bulk Data export (one resource type per file) and are ingested together so
references link across them. Every file either yields records or an
:class:`~fhir_adapters.errors.IngestError` naming the file and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from fhir_adapters.errors import IngestError, Issue, NotPatientData
from fhir_adapters.fhir_json import records_from_json, records_from_ndjson
from fhir_adapters.record import PatientRecord, merge_records

__all__ = ["detect_format", "iter_records", "read_bulk_export", "read_file", "read_records"]

Format = Literal["json", "ndjson", "hl7"]

_BY_SUFFIX: dict[str, Format] = {
    ".json": "json", ".ndjson": "ndjson", ".jsonl": "ndjson",
    ".hl7": "hl7", ".hl7v2": "hl7", ".er7": "hl7",
}
_HL7_STARTS = (b"MSH", b"\x0bMSH", b"FHS", b"BHS")


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


def read_file(path: Path, *, strict: bool = False) -> list[PatientRecord]:
    """Records from one file.

    Raises
    ------
    IngestError
        The file is malformed, unreadable or of an unknown format.
    NotPatientData
        The file is well formed but holds no patient data.
    """
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IngestError(Issue("exception", f"cannot read the file ({e.strerror})"),
                          source=source) from None
    fmt = detect_format(path, data[:4096])
    if fmt == "json":
        return records_from_json(data, source, strict=strict)
    if fmt == "ndjson":
        return records_from_ndjson(data, source, strict=strict)
    if fmt == "hl7":
        return _records_from_hl7(data, source)
    raise NotPatientData(Issue("not-supported", "not a FHIR JSON, NDJSON or HL7 v2 file "
                               f"(suffix {path.suffix or 'none'!r}, content not recognised)"),
                         source=source)


def read_bulk_export(folder: Path, *, strict: bool = False) -> list[PatientRecord]:
    """Records from the ``*.ndjson`` files of one FHIR Bulk Data export folder, linked."""
    files: dict[str, bytes | str] = {}
    for path in sorted(folder.glob("*.ndjson")):
        try:
            files[path.name] = path.read_bytes()
        except OSError as e:
            raise IngestError(Issue("exception", f"cannot read {path.name} ({e.strerror})"),
                              source=str(folder)) from None
    return records_from_ndjson(files, str(folder), strict=strict)


def iter_records(
    paths: Iterable[Path], *, strict: bool = False
) -> Iterator[PatientRecord | IngestError]:
    """Records, or the error that rejected a file, for files and folders (recursively).

    Records are not merged: the same patient may come from several files.
    """
    for path in paths:
        path = Path(path)
        if path.is_dir():
            yield from _iter_folder(path, strict)
        elif path.is_file():
            yield from _try(read_file, path, strict)
        else:
            yield IngestError(Issue("not-found", "no such file or folder"), source=str(path))


def read_records(
    paths: Iterable[Path], *, strict: bool = False, link_by_resource_id: bool = True
) -> tuple[list[PatientRecord], list[IngestError]]:
    """All records under ``paths``, merged per patient, and the files that were not ingested.

    Parameters
    ----------
    link_by_resource_id
        Also fold a record known only by a reference (``Patient/example`` from a
        lone Observation) into the one record whose Patient resource has that
        id. Right when the files come from one server; turn it off when mixing
        servers whose resource ids may collide.
    """
    records: list[PatientRecord] = []
    errors: list[IngestError] = []
    for item in iter_records(paths, strict=strict):
        if isinstance(item, IngestError):
            errors.append(item)
        else:
            records.append(item)
    merged = merge_records(records)
    if link_by_resource_id:
        merged = _link_by_resource_id(merged)
    return merged, errors


def _iter_folder(folder: Path, strict: bool) -> Iterator[PatientRecord | IngestError]:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if any(p.suffix.lower() == ".ndjson" and p.is_file() for p in entries):
        yield from _try(read_bulk_export, folder, strict)
    for path in entries:
        if path.is_dir():
            yield from _iter_folder(path, strict)
        elif path.is_file() and path.suffix.lower() != ".ndjson":
            yield from _try(read_file, path, strict)


def _try(
    read: Callable[..., list[PatientRecord]], path: Path, strict: bool
) -> Iterator[PatientRecord | IngestError]:
    try:
        records = read(path, strict=strict)
    except IngestError as e:
        yield e
        return
    yield from records


def _records_from_hl7(data: bytes, source: str) -> list[PatientRecord]:
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
    result: list[PatientRecord] = records_from_hl7(text, source)
    return result


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
