"""The HL7 v2 edge: messages in, FHIR R4 resources and PatientRecords out, ACK/NAK back.

>>> records = records_from_hl7(text, source="feed.hl7")       # doctest: +SKIP
>>> records[0].warnings          # what was nulled or dropped, located  # doctest: +SKIP
>>> resources = hl7_to_fhir_resources(text)                    # doctest: +SKIP
>>> ack = build_ack(text, "AE", error=exc.issues[0])           # doctest: +SKIP
>>> ack = build_ack(segments, "AA", mapped.warnings)  # AA, ERR-4 W each  # doctest: +SKIP

``parser="fast"`` (the default) uses the hand-written splitter in
:mod:`fhir_adapters.hl7v2_parse`; ``parser="hl7apy"`` reads the message with
hl7apy (TOLERANT validation, groups resolved). Both feed the same mapping, and
the test suite holds them to the same output on every shared sample.

See Also
--------
fhir_adapters.hl7v2_parse : splitting and reading segments.
fhir_adapters.hl7v2_to_fhir : the segment -> FHIR mapping.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any, Literal

from fhir_adapters.errors import IngestError, Issue, NotPatientData
from fhir_adapters.fhir_json import records_from_resources
from fhir_adapters.hl7v2_parse import (
    SUPPORTED_VERSIONS,
    Message,
    Parser,
    SegmentView,
    parse_fast,
    parse_hl7apy,
    read_messages,
    split_messages,
)
from fhir_adapters.hl7v2_to_fhir import MappedMessage, map_message
from fhir_adapters.record import PatientRecord

__all__ = ["ack_code_for", "build_ack", "hl7_to_fhir_resources", "map_hl7", "records_from_hl7"]

AckCode = Literal["AA", "AE", "AR"]
_PARSERS = ("fast", "hl7apy")
_INVALID_PARSER = "Unrecognised HL7 v2 parser: {0!r}; use 'fast' or 'hl7apy'"


def hl7_to_fhir_resources(
    message_text: str | bytes, *, parser: Parser = "fast", today: date | None = None
) -> list[dict[str, Any]]:
    """FHIR R4 resources (JSON dicts with ids) for every message in ``message_text``.

    References between them use ``Patient/<id>``. A batch (FHS/BHS) or a file of
    several messages gives the resources of all of them, in order. Fields that
    were nulled or results dropped on the way are left out silently here; use
    :func:`records_from_hl7` (PatientRecord.warnings) or :func:`map_hl7` to see them.

    Raises
    ------
    IngestError
        A message that cannot be read at all, located at the segment and field
        (and message, in a batch); never carries patient values. ``NotPatientData``
        for a message without PID.
    """
    resources: list[dict[str, Any]] = []
    for mapped in map_hl7(message_text, parser=parser, today=today):
        if isinstance(mapped, IngestError):
            raise mapped
        resources.extend(mapped.resources)
    return resources


def map_hl7(
    text: str | bytes, *, parser: Parser = "fast", today: date | None = None
) -> list[MappedMessage | IngestError]:
    """Each message of ``text`` mapped on its own: its resources and warnings, or its error.

    The line-joining warnings of :func:`~fhir_adapters.hl7v2_parse.read_messages`
    come first in each message's warnings. In a file of several messages every
    issue says which message (``message 2: ...``).

    Raises
    ------
    IngestError
        When the input as a whole is not HL7 v2 (empty, binary, no MSH).
    """
    if parser not in _PARSERS:
        raise ValueError(_INVALID_PARSER.format(parser))
    messages = read_messages(text)
    several = len(messages) > 1
    return [_map_one(message, number if several else None, parser, today)
            for number, message in enumerate(messages, start=1)]


def _map_one(message: Message, number: int | None, parser: Parser, today: date | None
             ) -> MappedMessage | IngestError:
    read = parse_fast if parser == "fast" else parse_hl7apy
    try:
        mapped = map_message(read(message.text), message_index=number or 1, today=today)
    except IngestError as exc:
        return type(exc)([_numbered(i, number) for i in exc.issues], source=exc.source)
    return MappedMessage(
        mapped.resources,
        [_numbered(i, number) for i in (*message.warnings, *mapped.warnings)],
        [*(None for _ in message.warnings), *mapped.owners],
    )


def _numbered(issue: Issue, number: int | None) -> Issue:
    if number is None:
        return issue
    return replace(issue, diagnostics=f"message {number}: {issue.diagnostics}")


def records_from_hl7(
    text: str | bytes, source: str | None = None, *, parser: Parser = "fast",
    errors: list[IngestError] | None = None,
) -> list[PatientRecord]:
    """One PatientRecord per PID segment, in message order, each with its warnings.

    Each record carries, in ``warnings``, what was nulled or dropped from its
    message (a bad date, an unreadable result, a joined line), located and
    value-free. A message that cannot be read at all is dropped on its own: its
    error goes to ``errors`` when given, else onto every record of the file as a
    warning, so it is never silent. Records of the same patient are not merged
    here; use :func:`fhir_adapters.record.merge_records` for that.

    Raises
    ------
    IngestError
        When no message of ``text`` gives a record (all the messages' issues).
    """
    records: list[PatientRecord] = []
    failed: list[IngestError] = []
    try:
        messages = map_hl7(text, parser=parser)
        several = len(messages) > 1
        for number, mapped in enumerate(messages, start=1):
            if isinstance(mapped, MappedMessage):
                try:
                    made = records_from_resources(mapped.resources)
                except IngestError as exc:
                    failed.append(type(exc)([_numbered(i, number if several else None)
                                             for i in exc.issues]))
                    continue
                for record in made:
                    record.warnings.extend(mapped.warnings_for(record.resource_id))
                records.extend(made)
            else:
                failed.append(mapped)
    except IngestError as exc:
        failed.append(exc)
    failed = [type(e)(e.issues, source=e.source or source) for e in failed]
    if not records and failed:
        if len(failed) == 1:
            raise failed[0]
        kind = NotPatientData if all(isinstance(e, NotPatientData) for e in failed) \
            else IngestError
        raise kind([i for e in failed for i in e.issues], source=source)
    if errors is not None:
        errors.extend(failed)
    else:
        dropped = [replace(i, severity="warning", diagnostics=f"{i.diagnostics} "
                           "(that message was not ingested)") for e in failed for i in e.issues]
        for record in records:
            record.warnings.extend(dropped)
    return records


# --- ACK / NAK ---------------------------------------------------------------------------

#: FHIR issue code -> HL7 table 0357 message error condition code.
_ERROR_CODES = {
    "structure": ("100", "Segment sequence error"),
    "required": ("101", "Required field missing"),
    "value": ("102", "Data type error"),
    "invalid": ("102", "Data type error"),
    "invariant": ("102", "Data type error"),
    "too-long": ("102", "Data type error"),
    "not-found": ("200", "Unsupported message type"),
    "not-supported": ("200", "Unsupported message type"),
}
_SEVERITY = {"fatal": "E", "error": "E", "warning": "W", "information": "I"}
_REJECT_CODES = {"structure", "invalid", "not-supported", "not-found", "required"}


def ack_code_for(error: IngestError) -> AckCode:
    """AR when the message as a whole cannot be taken, AE for an error in its content."""
    if isinstance(error, NotPatientData):
        return "AR"
    if any(i.segment not in (None, "MSH") and i.code == "value" for i in error.issues):
        return "AE"
    return "AR" if all(i.code in _REJECT_CODES for i in error.issues) else "AE"


def build_ack(
    message: str | bytes | Sequence[SegmentView],
    code: AckCode = "AA",
    error: Issue | IngestError | Sequence[Issue] | None = None,
    *,
    control_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """An HL7 v2 ACK (AA) or NAK (AE/AR) for ``message``, segments joined by CR.

    MSA-2 echoes the message's MSH-10. One ERR per issue: ERR-2 (v2.5+) or ERR-1
    (earlier) locates the segment and field, ERR-3 gives the HL7 table 0357 code
    and ERR-4 the severity. An AA may carry warnings (ERR-4 ``W``), one per
    element that was nulled or dropped, so an interface engine sees what was
    left out without resending. Only the issue's diagnostics are sent, never
    values from the message. Input that cannot be read gets a NAK with empty MSA-2.
    """
    if code not in ("AA", "AE", "AR"):
        raise ValueError(f"ACK code must be AA, AE or AR, got {code!r}")
    msh = _header(message)
    version = msh.value(12) if msh is not None else ""
    if version[:3] not in SUPPORTED_VERSIONS:
        version = "2.5"

    def take(field: int, comp: int = 1) -> str:
        # Only plain components travel, re-escaped in the default encoding.
        return "" if msh is None else _escape(msh.value(field, comp=comp))

    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S%z")
    trigger = take(9, 2)
    header = [
        "MSH", "^~\\&", take(5), take(6), take(3), take(4), stamp, "",
        f"ACK^{trigger}^ACK" if trigger else "ACK", control_id or uuid.uuid4().hex[:20],
        take(11) or "P", version,
    ]
    segments = ["|".join(header), f"MSA|{code}|{take(10)}"]
    issues: list[Issue] = []
    if isinstance(error, IngestError):
        issues = error.issues
    elif isinstance(error, Issue):
        issues = [error]
    elif error is not None:
        issues = list(error)
    if code != "AA" and not issues:
        issues = [Issue("exception", "application error")]
    modern = version[:3] >= "2.5"
    for issue in issues:
        segments.append(_err(issue, modern))
    return "\r".join(segments)


def _header(message: str | bytes | Sequence[SegmentView]) -> SegmentView | None:
    if not isinstance(message, str | bytes):
        return message[0] if message else None
    try:
        first = split_messages(message)[0]
        return parse_fast(first, check_version=False)[0]
    except IngestError:
        return None


def _err(issue: Issue, modern: bool) -> str:
    number, text = _ERROR_CODES.get(issue.code, ("207", "Application internal error"))
    if issue.segment == "MSH" and issue.field == 12:
        number, text = "203", "Unsupported version id"
    elif issue.code == "not-supported" and issue.segment not in (None, "MSH", "PID"):
        # A value type (OBX-2, table 0125) or encoding this receiver does not take.
        number, text = "103", "Table value not found"
    location = ""
    if issue.segment and len(issue.segment) == 3:
        location = "^".join(str(p) if p is not None else "" for p in (
            issue.segment, issue.segment_index or 1, issue.field)).rstrip("^")
    if modern:
        fields = ["ERR", "", location, f"{number}^{text}^HL70357",
                  _SEVERITY[issue.severity], "", "", "", _escape(issue.diagnostics)]
        return "|".join(fields)
    return f"ERR|{location}^{number}&{text}&HL70357" if location else \
        f"ERR|^^^{number}&{text}&HL70357"


def _escape(text: str) -> str:
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("&", "\\T\\").replace("~", "\\R\\")
    return " ".join(out.split())
