"""Reading HL7 v2 text into segment views: a fast splitter and an hl7apy adapter.

Both readers expose the same :class:`SegmentView` protocol, so the mapping in
:mod:`fhir_adapters.hl7v2_to_fhir` runs unchanged over either, and the tests can
check that they agree field by field. Values come back *escaped*, exactly as
they stand in the message (hl7apy does not unescape either); the mapping
unescapes the text it keeps with :func:`unescape`.

Field numbers follow the standard: for MSH, MSH-1 is the field separator and
MSH-2 the encoding characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Protocol

from fhir_adapters.errors import IngestError, Issue

__all__ = [
    "MAPPED_FIELDS",
    "SUPPORTED_VERSIONS",
    "Encoding",
    "FastSegment",
    "Hl7apySegment",
    "Message",
    "SegmentView",
    "disagreements",
    "hl7apy_version",
    "normalise_text",
    "parse_fast",
    "parse_hl7apy",
    "read_messages",
    "split_messages",
    "unescape",
]

Parser = Literal["fast", "hl7apy"]

#: MSH-12 versions accepted, by major.minor (sub-versions such as 2.5.1 and 2.3.1 included).
SUPPORTED_VERSIONS = ("2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8")

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
# Control characters that never occur in HL7 v2 text (tab, LF, CR and MLLP framing excepted).
_BINARY = re.compile(r"[\x00-\x08\x0e-\x1b\x1d-\x1f\x7f]")
_BATCH_SEGMENTS = frozenset({"FHS", "BHS", "BTS", "FTS"})
# MLLP frames a message as <VT> message <FS><CR>; feeds sometimes leave the framing in files.
_MLLP = str.maketrans("", "", "\x0b\x1c")


class SegmentView(Protocol):
    """One segment, read-only, with 1-based field/repetition/component numbers."""

    @property
    def name(self) -> str: ...

    @property
    def index(self) -> int:
        """1-based occurrence of this segment ID in its message (PID[1], OBX[3])."""
        ...

    def value(self, field: int, rep: int = 1, comp: int = 1, sub: int = 1) -> str:
        """The escaped leaf value, or "" when absent."""
        ...

    def repetitions(self, field: int) -> int:
        """How many repetitions ``field`` has (0 when empty)."""
        ...


@dataclass(frozen=True)
class Encoding:
    """The five delimiters that MSH-1 and MSH-2 declare."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @classmethod
    def from_msh(cls, msh: str) -> Encoding:
        if len(msh) < 8:
            raise IngestError(
                Issue("structure", "MSH is too short to declare its encoding characters",
                      segment="MSH", segment_index=1, field=2)
            )
        chars = msh[4:9]
        field, component, repetition, escape = msh[3], chars[0], chars[1], chars[2]
        subcomponent = chars[3] if len(chars) > 3 and chars[3] != field else "&"
        return cls(field, component, repetition, escape, subcomponent)


def normalise_text(data: str | bytes) -> str:
    """Decode, drop a BOM and MLLP framing, and refuse binary input.

    Raises
    ------
    IngestError
        When the input is empty, not UTF-8, or binary.
    """
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IngestError(
                Issue("invalid", f"input is not UTF-8 text (bad byte at offset {exc.start}); "
                      "HL7 v2 feeds must be decoded to text before ingest")
            ) from None
    text = data.lstrip("\ufeff").translate(_MLLP)
    if not text.strip():
        raise IngestError(Issue("required", "input is empty; expected an HL7 v2 message "
                                "starting with MSH", segment="MSH"))
    if _BINARY.search(text):
        raise IngestError(Issue("invalid", "input contains binary control characters; "
                                "it is not HL7 v2 text", segment="MSH"))
    return text


def split_messages(data: str | bytes) -> list[str]:
    """Split input into messages, each a CR-joined string that starts with MSH.

    Accepts CR, LF or CRLF segment separators, a UTF-8 BOM and FHS/BHS batch
    wrappers (whose header and trailer segments are dropped). A line that does
    not start a segment continues the one before it (see :func:`read_messages`).
    """
    return [m.text for m in read_messages(data)]


@dataclass(frozen=True)
class Message:
    """One message's text (segments joined by CR) and what reading it had to repair."""

    text: str
    warnings: tuple[Issue, ...] = ()


def read_messages(data: str | bytes) -> list[Message]:
    """Split input into messages, joining wrapped lines, each repair a located warning.

    Files on disk often separate segments with LF or CRLF, and a line break typed
    into a text field (OBR-4, NTE-3, OBX-5) then splits a segment in two. As
    interface engines do, a line that does not start with a segment ID (three
    uppercase letters or digits and the field separator; a bare known ID) is
    read as part of the segment before it, joined with one space (none where the
    break falls next to a delimiter), whatever the separator (CR, LF or CRLF).

    Raises
    ------
    IngestError
        Empty, binary or non-UTF-8 input, or text before the first MSH.
    """
    text = normalise_text(data)
    messages: list[_Building] = []
    in_batch_header = False
    for number, line in enumerate(_LINE_BREAK.split(text), start=1):
        # Trailing blanks are not data; hl7apy drops them too.
        line = line.strip()
        if not line:
            continue
        head = line[:3]
        current = messages[-1] if messages else None
        starts = _starts_segment(line, current.delimiters[0] if current else "|")
        wrapped = not starts and head != "MSH"
        # A batch header declares its own separators, so any non-word character follows it.
        batch = head in _BATCH_SEGMENTS and not line[3:4].isalnum() and line[3:4] != " "
        if batch or (in_batch_header and wrapped):
            # Batch wrappers are dropped, and with them any line wrapped out of one.
            in_batch_header = True
            continue
        in_batch_header = False
        if head == "MSH":
            messages.append(_Building(line))
        elif current is None:
            raise IngestError(Issue(
                "structure",
                f"line {number} comes before any MSH segment; every HL7 v2 message must "
                "start with MSH", segment="MSH", segment_index=1,
            ))
        elif wrapped:
            current.join(line, number)
        else:
            current.segments.append(line)
    if not messages:
        raise IngestError(Issue("structure", "no MSH segment found; this is not an HL7 v2 "
                                "message", segment="MSH", segment_index=1))
    return [Message("\r".join(m.segments), tuple(m.warnings)) for m in messages]


class _Building:
    """A message being split: its segments so far and the lines joined into them."""

    def __init__(self, msh: str) -> None:
        self.segments = [msh]
        self.warnings: list[Issue] = []
        # Field, component, repetition and subcomponent separators, as MSH-1/2 declare them.
        encoding = msh[4:8]
        self.delimiters = (msh[3:4] or "|") + encoding[:2] + encoding[3:4]

    def join(self, line: str, number: int) -> None:
        previous = self.segments[-1]
        name = previous[:3]
        field_sep = self.delimiters[0]
        # The field the break fell in: MSH counts its separator as MSH-1.
        field = previous.count(field_sep) + (1 if name == "MSH" else 0)
        index = sum(1 for s in self.segments if s[:3] == name)
        glue = "" if previous[-1] in self.delimiters or line[0] in self.delimiters else " "
        self.segments[-1] = previous + glue + line
        self.warnings.append(Issue(
            "structure", f"line {number} does not start with a segment ID; read as a line "
            f"break inside {name}-{field} and joined to it", severity="warning",
            segment=name, segment_index=index, field=field,
        ))


def _starts_segment(line: str, field_sep: str) -> bool:
    """Whether ``line`` starts a segment: an ID then the field separator, or a bare known ID."""
    if not _SEGMENT_ID.match(line[:3]):
        return False
    if len(line) > 3:
        return line[3] == field_sep
    return _known_id(line)


@cache
def _known_id(name: str) -> bool:
    """A segment ID that HL7 v2.8 defines, or a local Z-segment (a bare word in text is not)."""
    if name.startswith("Z"):
        return True
    from hl7apy import load_library

    return name in load_library("2.8").SEGMENTS


def message_version(segments: Sequence[SegmentView]) -> str:
    """MSH-12 version id, checked against :data:`SUPPORTED_VERSIONS`."""
    version = segments[0].value(12).strip()
    if version[:3] not in SUPPORTED_VERSIONS or version[3:4] not in ("", "."):
        raise IngestError(Issue(
            "not-supported",
            f"HL7 v2 version in MSH-12 is not supported (supported: "
            f"{SUPPORTED_VERSIONS[0]} to {SUPPORTED_VERSIONS[-1]}.x)",
            segment="MSH", segment_index=1, field=12,
        ))
    return version


# --- fast path ---------------------------------------------------------------------------


class FastSegment:
    """A segment split lazily: fields once, components only when asked for."""

    __slots__ = ("_enc", "_fields", "index", "name")

    def __init__(self, raw: str, index: int, enc: Encoding) -> None:
        parts = raw.split(enc.field)
        self.name = parts[0]
        self.index = index
        self._enc = enc
        # Keep list position == field number; MSH-1 is the separator itself.
        self._fields = [parts[0], enc.field, *parts[1:]] if self.name == "MSH" else parts

    def raw_field(self, field: int) -> str:
        return self._fields[field] if field < len(self._fields) else ""

    def repetitions(self, field: int) -> int:
        raw = self.raw_field(field)
        if not raw:
            return 0
        if self.name == "MSH" and field <= 2:
            return 1
        return raw.count(self._enc.repetition) + 1

    def value(self, field: int, rep: int = 1, comp: int = 1, sub: int = 1) -> str:
        raw = self.raw_field(field)
        if not raw or (self.name == "MSH" and field <= 2):
            return raw if rep == comp == sub == 1 else ""
        enc = self._enc
        return _pick(_pick(_pick(raw, enc.repetition, rep), enc.component, comp),
                     enc.subcomponent, sub)


def _pick(text: str, sep: str, n: int) -> str:
    if sep not in text:
        return text if n == 1 else ""
    parts = text.split(sep)
    return parts[n - 1] if n <= len(parts) else ""


def parse_fast(message: str, *, check_version: bool = True) -> list[FastSegment]:
    """Split one message (as from :func:`split_messages`) into segment views."""
    lines = message.split("\r")
    enc = Encoding.from_msh(lines[0])
    seen: dict[str, int] = {}
    segments = []
    for position, line in enumerate(lines, start=1):
        name = line[:3]
        if not _SEGMENT_ID.match(name) or (len(line) > 3 and line[3] != enc.field):
            raise IngestError(Issue(
                "structure", f"segment {position} has no valid segment ID",
                expression=f"segment[{position}]",
            ))
        seen[name] = seen.get(name, 0) + 1
        segments.append(FastSegment(line, seen[name], enc))
    if check_version:
        message_version(segments)
    return segments


# --- hl7apy path -------------------------------------------------------------------------


class Hl7apySegment:
    """The :class:`SegmentView` of a segment that hl7apy parsed."""

    __slots__ = ("_segment", "index", "name")

    def __init__(self, segment: Any, index: int) -> None:
        self._segment = segment
        self.name: str = segment.name
        self.index = index

    def _reps(self, field: int) -> list[Any]:
        wanted = f"{self.name}_{field}"
        return [f for f in self._segment.children if f.name == wanted]

    def repetitions(self, field: int) -> int:
        return len(self._reps(field))

    def value(self, field: int, rep: int = 1, comp: int = 1, sub: int = 1) -> str:
        reps = self._reps(field)
        if rep > len(reps):
            return ""
        element = reps[rep - 1]
        if self.name == "MSH" and field <= 2:
            return str(element.to_er7()) if comp == sub == 1 else ""
        component = _child_at(element, comp)
        if component is None:
            return ""
        leaf = _child_at(component, sub)
        return "" if leaf is None else str(leaf.to_er7())


def _position(name: str | None) -> int | None:
    """The number in an hl7apy child name (CX_4 -> 4); None for primitive names (ST)."""
    if name and "_" in name:
        tail = name.rsplit("_", 1)[1]
        if tail.isdigit():
            return int(tail)
    return None


def _child_at(element: Any, n: int) -> Any | None:
    children = list(element.children)
    numbered = [(_position(c.name), c) for c in children]
    if any(p is not None for p, _ in numbered):
        # Components past the datatype's end come back unnamed and unplaced: unreadable.
        return next((c for p, c in numbered if p == n), None)
    # A primitive has a single unnumbered child; withdrawn (WD) types list children in order.
    return children[n - 1] if n <= len(children) else None


def hl7apy_version(version: str) -> str:
    """The hl7apy library version that reads ``version`` (2.3.1 kept, 2.5.2 -> 2.5)."""
    from hl7apy import SUPPORTED_LIBRARIES

    return version if version in SUPPORTED_LIBRARIES else version[:3]


def parse_hl7apy(message: str) -> list[Hl7apySegment]:
    """Parse one message with hl7apy (TOLERANT, with groups) into segment views."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    # Check the version (and the segment IDs) the same way as the fast path.
    fast = parse_fast(message)
    version = fast[0].value(12)
    wanted = hl7apy_version(version)
    if wanted != version:
        message = _replace_msh12(message, fast[0], wanted)
    expected = [s.name for s in fast]
    found: list[Any] = []
    try:
        # Groups first; hl7apy silently drops segments that fit no group of the structure.
        found = list(_walk(parse_message(message, validation_level=VALIDATION_LEVEL.TOLERANT,
                                         find_groups=True)))
        if [s.name for s in found] != expected:
            # Flat parsing keeps them, but rejects segment IDs the version does not define.
            unknown = {n for n in expected if not _known_segment(n, wanted)}
            if unknown & _MAPPED_SEGMENTS:
                raise IngestError(Issue(
                    "structure", f"hl7apy does not know segment(s) {sorted(unknown)} in "
                    f"version {wanted}", segment="MSH", segment_index=1, field=12))
            kept = "\r".join(line for line in message.split("\r") if line[:3] not in unknown)
            found = list(_walk(parse_message(kept, validation_level=VALIDATION_LEVEL.TOLERANT,
                                             find_groups=False)))
    except IngestError:
        raise
    except Exception as exc:  # hl7apy raises many unrelated types; messages may echo values
        raise IngestError(Issue(
            "structure", f"hl7apy could not parse the message ({type(exc).__name__})",
            segment="MSH", segment_index=1,
        )) from None
    seen: dict[str, int] = {}
    segments = []
    for seg in found:
        seen[seg.name] = seen.get(seg.name, 0) + 1
        segments.append(Hl7apySegment(seg, seen[seg.name]))
    return segments


_MAPPED_SEGMENTS = frozenset({"MSH", "PID", "PV1", "ORC", "OBR", "OBX", "TXA"})
_KNOWN: dict[tuple[str, str], bool] = {}


def _known_segment(name: str, version: str) -> bool:
    """Whether hl7apy defines segment ``name`` in ``version`` (Z-segments always are)."""
    if (name, version) not in _KNOWN:
        from hl7apy.consts import VALIDATION_LEVEL
        from hl7apy.exceptions import InvalidName
        from hl7apy.parser import parse_segment

        try:
            parse_segment(f"{name}|", version=version,
                          validation_level=VALIDATION_LEVEL.TOLERANT)
            _KNOWN[name, version] = True
        except InvalidName:
            _KNOWN[name, version] = False
    return _KNOWN[name, version]


def _replace_msh12(message: str, msh: FastSegment, version: str) -> str:
    field = msh._enc.field
    head, _, rest = message.partition("\r")
    parts = head.split(field)
    msh12 = msh._enc.component.join([version, *parts[11].split(msh._enc.component)[1:]])
    parts[11] = msh12
    return field.join(parts) + ("\r" + rest if rest else "")


def _walk(node: Any) -> Any:
    for child in node.children:
        if child.classname == "Segment":
            yield child
        else:
            yield from _walk(child)


# --- escapes -----------------------------------------------------------------------------

_ESCAPE_CACHE: dict[Encoding, re.Pattern[str]] = {}


def unescape(value: str, enc: Encoding) -> str:
    r"""Resolve HL7 escape sequences: \F\ \S\ \T\ \R\ \E\, \.br\, \Xhh\; drop formatting."""
    if enc.escape not in value:
        return value
    pattern = _ESCAPE_CACHE.get(enc)
    if pattern is None:
        e = re.escape(enc.escape)
        pattern = re.compile(f"{e}([^{e}]*){e}")
        _ESCAPE_CACHE[enc] = pattern
    simple = {"F": enc.field, "S": enc.component, "T": enc.subcomponent,
              "R": enc.repetition, "E": enc.escape, ".br": "\n"}

    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        if code in simple:
            return simple[code]
        if code[:1] == "X":
            try:
                return bytes.fromhex(code[1:]).decode("utf-8")
            except ValueError:
                return ""
        # \H\ \N\ highlighting, \.sp\ \.in\ formatting, \C..\ \M..\ charsets, \Z..\ local.
        return "\n" if code.startswith(".sp") else ""

    return pattern.sub(replace, value)


# --- agreement check ---------------------------------------------------------------------

#: Every (segment, field) the FHIR mapping reads, with the components it reads.
MAPPED_FIELDS: dict[str, dict[int, tuple[int, ...]]] = {
    "MSH": {1: (1,), 2: (1,), 3: (1,), 4: (1,), 5: (1,), 6: (1,), 9: (1, 2), 10: (1,),
            11: (1,), 12: (1,)},
    "PID": {3: (1, 4, 5), 5: (1, 2, 3, 7), 7: (1,), 8: (1,), 10: (1, 2), 15: (1, 2, 3),
            22: (1, 2), 29: (1,), 30: (1,)},
    "PV1": {2: (1,), 19: (1, 4, 5), 44: (1,), 45: (1,)},
    "OBR": {7: (1,)},
    "OBX": {2: (1,), 3: (1, 2, 3, 4, 5, 6), 5: (1, 2, 3, 4, 5, 6), 6: (1, 3), 7: (1,),
            8: (1,), 11: (1,), 14: (1,)},
    "TXA": {2: (1,), 4: (1,), 6: (1,), 12: (1,), 17: (1,)},
}


def disagreements(message: str) -> list[str]:
    """Where the fast reader and hl7apy differ on a mapped field of ``message``.

    Compares every repetition, mapped component and subcomponent (1-3) of every
    mapped field. Returns locations only (``"OBX[2]-5 rep 1 comp 3 sub 1"``), never values.
    """
    slow = parse_hl7apy(message)
    kept = {s.name for s in slow}
    fast = [s for s in parse_fast(message) if s.name in kept or s.name in _MAPPED_SEGMENTS]
    if [s.name for s in fast] != [s.name for s in slow]:
        return ["segment order"]
    found = []
    for a, b in zip(fast, slow, strict=True):
        for field, comps in MAPPED_FIELDS.get(a.name, {}).items():
            where = f"{a.name}[{a.index}]-{field}"
            reps = a.repetitions(field)
            if reps != b.repetitions(field):
                found.append(f"{where} repetitions")
                continue
            for rep in range(1, reps + 1):
                for comp in comps:
                    for sub in (1, 2, 3):
                        if a.value(field, rep, comp, sub) != b.value(field, rep, comp, sub):
                            found.append(f"{where} rep {rep} comp {comp} sub {sub}")
    return found
