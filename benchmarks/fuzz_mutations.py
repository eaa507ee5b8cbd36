"""Seeded mutations for parser fuzzing: byte-level, and structure-aware for JSON, HL7 v2, CSV/YAML.

Every mutator draws only from the ``random.Random`` it is given, so one seed replays the
same input exactly; the isolated runner seeds one generator per input from
``(format, seed, index)``, and the test suite hands hypothesis' ``st.randoms()`` in so that
a failure shrinks. Each returns the mutated input and a short description of what was done
(used to report and replay a failure), never raising on odd input: a structure-aware
mutation that finds no structure falls back to a byte mutation.

DICOM and NIfTI header mutations live in :mod:`benchmarks.fuzz_image_mutations`.
"""

from __future__ import annotations

import csv
import io
import json
import random
from typing import Any

__all__ = ["MARKER", "mutate_bytes", "mutate_csv", "mutate_hl7", "mutate_json", "mutate_ndjson",
           "mutate_yaml", "stacked"]

#: Planted in patient-name fields of every seed; it must never appear in an error or warning.
MARKER = "ZZFUZZMARKER"

_INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x0D, 0x22, 0x5C, 0x7C, 0x5E)
_INTERESTING_32 = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
                   0xFFFFFFFF, 0x10000)


def _pos(rng: random.Random, data: bytes | bytearray, head: int | None = None) -> int:
    """An offset, half the time within the first ``head`` bytes (where headers live)."""
    n = len(data)
    if n == 0:
        return 0
    if head and rng.random() < 0.5:
        return rng.randrange(min(n, head))
    return rng.randrange(n)


def mutate_bytes(data: bytes, rng: random.Random, other: bytes | None = None,
                 head: int | None = None) -> tuple[bytes, str]:
    """One byte-level mutation: flip, set, insert, delete, duplicate, splice or truncate.

    ``other`` is a second sample of the same format for splicing; ``head`` biases offsets
    toward the start of binary formats.
    """
    buf = bytearray(data)
    op = rng.choice(("flip", "set", "int32", "insert", "delete", "duplicate", "splice",
                     "truncate"))
    if not buf and op not in ("insert", "splice"):
        op = "insert"
    if op == "flip":
        count = rng.randint(1, 8)
        for _ in range(count):
            i = _pos(rng, buf, head)
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flip {count} bit(s)"
    if op == "set":
        i = _pos(rng, buf, head)
        buf[i] = rng.choice(_INTERESTING_8) if rng.random() < 0.7 else rng.randrange(256)
        return bytes(buf), f"set byte at {i}"
    if op == "int32":
        i = _pos(rng, buf, head)
        width = rng.choice((2, 4))
        value = rng.choice(_INTERESTING_32) & ((1 << (8 * width)) - 1)
        buf[i:i + width] = value.to_bytes(width, rng.choice(("little", "big")))
        return bytes(buf), f"set {width}-byte integer {value:#x} at {i}"
    if op == "insert":
        i = _pos(rng, buf, head) if buf else 0
        size = rng.choice((1, 2, 4, 16, 256))
        chunk = bytes(rng.randrange(256) for _ in range(size)) if rng.random() < 0.5 else \
            bytes([rng.choice(_INTERESTING_8)]) * size
        buf[i:i] = chunk
        return bytes(buf), f"insert {size} byte(s) at {i}"
    if op == "delete":
        i = _pos(rng, buf, head)
        size = min(len(buf) - i, rng.choice((1, 2, 4, 16, 256, 4096)))
        del buf[i:i + size]
        return bytes(buf), f"delete {size} byte(s) at {i}"
    if op == "duplicate":
        i = _pos(rng, buf, head)
        size = min(len(buf) - i, rng.choice((1, 4, 16, 256, 4096)))
        j = _pos(rng, buf, head)
        buf[j:j] = buf[i:i + size]
        return bytes(buf), f"duplicate {size} byte(s) from {i} to {j}"
    if op == "splice":
        donor = other if other else bytes(buf)
        cut_a = _pos(rng, buf, head) if buf else 0
        cut_b = rng.randrange(len(donor)) if donor else 0
        return bytes(buf[:cut_a]) + donor[cut_b:], f"splice at {cut_a} with another sample"
    cut = _pos(rng, buf, head)
    return bytes(buf[:cut]), f"truncate to {cut} byte(s)"


def stacked(data: bytes, rng: random.Random, other: bytes | None = None,
            head: int | None = None) -> tuple[bytes, str]:
    """One to four byte mutations in a row (havoc)."""
    steps = []
    for _ in range(rng.choice((1, 1, 2, 4))):
        data, what = mutate_bytes(data, rng, other, head)
        steps.append(what)
    return data, "; ".join(steps)


# --------------------------------------------------------------------------- JSON

_ODD_VALUES: tuple[Any, ...] = (None, 0, -1, 1.5, True, False, "", " ", "0", [], {}, [None],
                                {"": None}, "\u0000", "\ud800", "x" * 70_000, -0.0,
                                2**63, -(2**63) - 1, 1e308, "NaN", "2017-02-29")
_BAD_DATES = ("2017-02-29", "20170229", "2017-13-01", "2017-00-10", "0000-01-01",
              "2017-02-29T12:52:00-05:00", "2017-01-01T25:61:99Z", "2017-01-01T10:00:00+99:00",
              "9999-12-31T23:59:60Z", "2017", "2017-1-1", "-2017-01-01", "2017-01-01T10:00",
              "yesterday", "")
_RESOURCE_TYPES = ("Patient", "Observation", "Bundle", "ValueSet", "OperationOutcome",
                   "Condition", "Encounter", "", "patient", "Observation ", "Binary",
                   "DocumentReference", "MedicationRequest", "Practitioner", "Parameters")
_ODD_REFS = ("Patient/", "Patient", "urn:uuid:", "#", "#missing", "Patient/../x",
             "http://other.example/fhir/Patient/1", "Observation/1", "Patient/1/_history/",
             "urn:uuid:00000000-0000-0000-0000-000000000000", "?", "Patient?identifier=x|y")
_NEST = "\u0000FUZZNEST\u0000"
_HUGE = "\u0000FUZZHUGE\u0000"


def _slots(obj: Any, limit: int = 20_000) -> list[tuple[Any, Any]]:
    """(container, key) for every value in a parsed JSON document, breadth-first."""
    out: list[tuple[Any, Any]] = []
    queue = [obj]
    while queue and len(out) < limit:
        node = queue.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                out.append((node, k))
                queue.append(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                out.append((node, i))
                queue.append(v)
    return out


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else f"[{key}]"


def _json_tree_mutation(obj: Any, rng: random.Random) -> str:
    """Mutate a parsed document in place; returns what was done."""
    slots = _slots(obj)
    if not slots:
        raise ValueError("no JSON structure")
    op = rng.choice(("type", "type", "drop", "dup", "date", "resourceType", "ref", "nest",
                     "huge", "number", "swap", "extra", "code"))
    if op == "resourceType":
        typed = [(c, k) for c, k in slots if k == "resourceType"]
        if typed:
            container, key = rng.choice(typed)
            container[key] = rng.choice((*_RESOURCE_TYPES, None, 5, ["Patient"]))
            return "resourceType replaced"
    if op == "date":
        dated = [(c, k) for c, k in slots if isinstance(k, str) and (
            "date" in k.lower() or "time" in k.lower() or k in ("issued", "start", "end"))]
        if dated:
            container, key = rng.choice(dated)
            container[key] = rng.choice(_BAD_DATES)
            return f"{key} set to an impossible or malformed date"
    if op == "ref":
        refs = [(c, k) for c, k in slots if k == "reference"]
        if refs:
            container, key = rng.choice(refs)
            container[key] = rng.choice(_ODD_REFS)
            return "reference replaced"
    if op == "code":
        codes = [(c, k) for c, k in slots if k in ("code", "system", "unit", "status", "gender",
                                                   "type", "use", "value")]
        if codes:
            container, key = rng.choice(codes)
            container[key] = rng.choice(("", " ", "x" * 300, None, 1, ["a"], {"code": 1},
                                         "http://unitsofmeasure.org", "mg/dL{", "%", "[degF]",
                                         "unknown", "1e999"))
            return f"{key} replaced"
    container, key = rng.choice(slots)
    name = _key_name(key)
    if op == "drop":
        del container[key]
        return f"{name} dropped"
    if op == "dup" and isinstance(container, list):
        container.insert(key, json.loads(json.dumps(container[key])))
        return f"array element {name} duplicated"
    if op == "nest":
        container[key] = _NEST
        return f"{name} replaced by deep nesting"
    if op == "huge":
        container[key] = _HUGE
        return f"{name} replaced by a huge number"
    if op == "number":
        container[key] = rng.choice((1e308, -1e308, 5e-324, 2**64, -(2**70), 0.1, -1, 0))
        return f"{name} replaced by an extreme number"
    if op == "swap":
        other_container, other_key = rng.choice(slots)
        container[key], other_container[other_key] = other_container[other_key], container[key]
        return f"{name} swapped with {_key_name(other_key)}"
    if op == "extra" and isinstance(container, dict):
        container[rng.choice(("_" + name, "extension", "contained", "modifierExtension",
                              "resourceType", "id", "\u00e9"))] = rng.choice(_ODD_VALUES)
        return f"unexpected key beside {name}"
    container[key] = rng.choice(_ODD_VALUES)
    return f"{name} replaced by another type"


def _dump(obj: Any, rng: random.Random) -> str:
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    depth = rng.choice((64, 900, 1_000, 20_000, 200_000))
    opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
    text = text.replace(json.dumps(_NEST), opener * depth + "1" + closer * depth)
    huge = rng.choice(("1" + "0" * 5_000, "1e400", "-1e400", "1" * 400 + ".5", "1E-400"))
    return text.replace(json.dumps(_HUGE), huge)


def mutate_json(data: bytes, rng: random.Random, other: bytes | None = None
                ) -> tuple[bytes, str]:
    """A FHIR JSON document mutated in its structure (60%) or its bytes (40%)."""
    if rng.random() < 0.6:
        try:
            obj = json.loads(data)
            steps = [_json_tree_mutation(obj, rng) for _ in range(rng.choice((1, 1, 2, 3)))]
            return _dump(obj, rng).encode("utf-8", "surrogatepass"), "json: " + "; ".join(steps)
        except (ValueError, RecursionError):
            pass
    mutated, what = stacked(data, rng, other)
    return mutated, "bytes: " + what


def mutate_ndjson(data: bytes, rng: random.Random, other: bytes | None = None
                  ) -> tuple[bytes, str]:
    """NDJSON: one line's structure, whole lines (drop, repeat, join, log lines), or bytes."""
    lines = data.split(b"\n")
    roll = rng.random()
    if roll < 0.45 and lines:
        i = rng.randrange(len(lines))
        mutated, what = mutate_json(lines[i], rng)
        lines[i] = mutated.replace(b"\n", b" ") if rng.random() < 0.8 else mutated
        return b"\n".join(lines), f"line {i + 1}: {what}"
    if roll < 0.75 and lines:
        i = rng.randrange(len(lines))
        op = rng.choice(("drop", "repeat", "join", "blank", "log", "crlf", "bundle"))
        if op == "drop":
            del lines[i]
        elif op == "repeat":
            lines.insert(i, lines[i])
        elif op == "join" and i + 1 < len(lines):
            lines[i:i + 2] = [lines[i] + lines[i + 1]]
        elif op == "blank":
            lines.insert(i, rng.choice((b"", b"   ", b"\r", b"\x00")))
        elif op == "log":
            lines.insert(i, b'{"exportId":"x","eventId":"kickoff","eventDetail":{}}')
        elif op == "crlf":
            return data.replace(b"\n", b"\r\n"), "line endings CRLF"
        else:
            lines.insert(i, b'{"resourceType":"Bundle","type":"collection","entry":[]}')
        return b"\n".join(lines), f"line {i + 1}: {op}"
    mutated, what = stacked(data, rng, other)
    return mutated, "bytes: " + what


# --------------------------------------------------------------------------- HL7 v2

_HL7_BAD_DATES = ("20170229", "201702291252-0500", "2017022", "20171301", "20170100",
                  "99999999", "2017", "201702281261", "20170228126", "20170228125960",
                  "20170228+0500", "2017-02-28", "0", "-1", "20170228.123456789", "2017^02",
                  "19000101000000.0000-2400", "")
_HL7_NUMBERS = ("<2.22", ">=5", "1.2.3", "1e999", "nan", "--1", "", "+", ".", "1,5", "^",
                "1" * 400, "-0", "5 mg")
_VALUE_TYPES = ("TX", "FT", "XTN", "CWE", "CE", "NM", "SN", "DT", "TS", "DTM", "ST", "ED",
                "RP", "", "ZZ", "CX", "XPN", "TM", "NA")
_DATE_FIELDS = {"PID": (7, 29, 33), "OBX": (12, 14, 19), "OBR": (6, 7, 8, 14, 22),
                "MSH": (7,), "EVN": (2, 6), "PV1": (44, 45), "ORC": (9, 15), "SPM": (17, 18)}


def _split_segments(text: str) -> list[str]:
    return [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r")]


def _hl7_structure(text: str, rng: random.Random) -> tuple[str, str]:
    segments = _split_segments(text)
    real = [i for i, s in enumerate(segments) if len(s) >= 3]
    if not real:
        raise ValueError("no segments")
    i = rng.choice(real)
    fields = segments[i].split("|")
    seg = fields[0]
    op = rng.choice(("clear", "swap", "date", "date", "obx", "nm", "break", "separators",
                     "no_msh", "segment", "segment_id", "escape", "repeat", "version",
                     "framing", "endings", "long", "batch", "bytes_in_field"))
    where = f"{seg}[{i}]"
    if op == "clear" and len(fields) > 1:
        k = rng.randrange(1, len(fields))
        fields[k] = rng.choice(("", '""', "^", "~", "&"))
        where += f"-{k}"
    elif op == "swap" and len(fields) > 2:
        a, b = rng.sample(range(1, len(fields)), 2)
        fields[a], fields[b] = fields[b], fields[a]
        where += f"-{a}<->{b}"
    elif op == "date":
        choices = [(j, s) for j, s in enumerate(segments) if s[:3] in _DATE_FIELDS]
        if choices:
            i, line = rng.choice(choices)
            fields = line.split("|")
            seg = line[:3]  # MSH's own field separator may have been mutated
            k = rng.choice(_DATE_FIELDS[seg])
            k_idx = k - 1 if seg == "MSH" else k
            while len(fields) <= k_idx:
                fields.append("")
            fields[k_idx] = rng.choice(_HL7_BAD_DATES)
            where = f"{seg}[{i}]-{k}"
    elif op in ("obx", "nm"):
        obx = [j for j, s in enumerate(segments) if s.startswith("OBX")]
        if obx:
            i = rng.choice(obx)
            fields = segments[i].split("|")
            while len(fields) < 12:
                fields.append("")
            if op == "obx":
                fields[2] = rng.choice(_VALUE_TYPES)
            fields[5] = rng.choice((*_HL7_NUMBERS, *_HL7_BAD_DATES, "^^^^", "a~b~c",
                                    "(555)555-1212^PRN^PH", "text\\.br\\more"))
            where = f"OBX[{i}]-2/5"
    elif op == "break":
        line = segments[i]
        cut = rng.randrange(len(line) + 1)
        segments[i] = line[:cut] + rng.choice(("\n", "\r", "\r\n", "\n\n", "\n ")) + line[cut:]
        return "\r".join(segments), f"{where}: stray line break at {cut}"
    elif op == "separators" and segments[0].startswith("MSH") and len(segments[0]) > 8:
        msh = segments[0]
        kind = rng.choice(("field", "encoding", "empty_encoding", "all_pipes"))
        if kind == "field":
            new = rng.choice("#!^\\\x00 ")
            segments[0] = "MSH" + new + msh[4:]
        elif kind == "encoding":
            segments[0] = msh[:4] + rng.choice(("^~\\&#", "^^^^", "~", "|", "^~&\\", "abcd",
                                                "^~\\", "")) + msh[8:]
        elif kind == "empty_encoding":
            segments[0] = msh[:4] + msh[8:]
        else:
            return text.replace("|", rng.choice(("#", "^", "||"))), "separators replaced"
        return "\r".join(segments), f"MSH separators: {kind}"
    elif op == "no_msh":
        kept = [s for s in segments if not s.startswith("MSH")]
        return "\r".join(kept), "MSH removed"
    elif op == "segment":
        what = rng.choice(("delete", "duplicate", "move", "many"))
        if what == "delete":
            del segments[i]
        elif what == "duplicate":
            segments.insert(i, segments[i])
        elif what == "move":
            segments.insert(rng.randrange(len(segments) + 1), segments.pop(i))
        else:
            segments[i:i + 1] = [segments[i]] * rng.choice((50, 2_000))
        return "\r".join(segments), f"{where}: segment {what}"
    elif op == "segment_id":
        fields[0] = rng.choice((seg.lower(), seg[:2], seg + "X", "ZZZ", "", "P1D", "MSH", "1PI",
                                "\ufeffPID", " " + seg))
    elif op == "escape" and len(fields) > 1:
        k = rng.randrange(1, len(fields))
        fields[k] += rng.choice(("\\", "\\X0D\\", "\\H\\", "\\.br\\", "\\Zxx\\", "\\X\\",
                                 "\\XZZ\\", "\\E", "\\F\\\\S\\", "\\C2842\\"))
        where += f"-{k}"
    elif op == "repeat" and len(fields) > 1:
        k = rng.randrange(1, len(fields))
        fields[k] = rng.choice(("a~b~c", "~~~~", "^" * 300, "&&&", "a^b&c~d^e", fields[k] * 50))
        where += f"-{k}"
    elif op == "version":
        if segments[0].startswith("MSH"):
            header = segments[0].split("|")
            while len(header) < 12:
                header.append("")
            header[11] = rng.choice(("2.9", "", "3.0", "2.5.1^XX", "1", "2.3.1", "2.8.2", "x"))
            segments[0] = "|".join(header)
            return "\r".join(segments), "MSH-12 replaced"
    elif op == "framing":
        return rng.choice(("\x0b" + text + "\x1c\r", "\x0b" + text, text + "\x1c",
                           "\x1c\r" + text)), "MLLP framing bytes"
    elif op == "endings":
        sep = rng.choice(("\n", "\r\n", "\n\r", "\r\r"))
        return sep.join(segments), f"segments separated by {sep!r}"
    elif op == "long" and len(fields) > 1:
        k = rng.randrange(1, len(fields))
        fields[k] = "A" * rng.choice((10_000, 200_000))
        where += f"-{k}"
    elif op == "batch":
        return (f"FHS|^~\\&\rBHS|^~\\&\r{text}\r{text}\rBTS|2\rFTS|1",
                "wrapped in a batch of two")
    elif op == "bytes_in_field" and len(fields) > 1:
        k = rng.randrange(1, len(fields))
        fields[k] += rng.choice(("\x00", "\x1a", "\u00e9", "\udcff", "\u2028", "\x0b", "\x1c"))
        where += f"-{k}"
    segments[i] = "|".join(fields)
    return "\r".join(segments), f"{where}: {op}"


def mutate_hl7(data: bytes, rng: random.Random, other: bytes | None = None
               ) -> tuple[bytes, str]:
    """An HL7 v2 message mutated in its fields and segments (65%) or its bytes (35%)."""
    if rng.random() < 0.65:
        text = data.decode("utf-8", "surrogateescape")
        try:
            steps = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                text, what = _hl7_structure(text, rng)
                steps.append(what)
            encoding = rng.choice(("utf-8", "utf-8", "latin-1"))
            return (text.encode(encoding, "surrogateescape" if encoding == "utf-8" else "replace"),
                    "hl7: " + "; ".join(steps) + f" ({encoding})")
        except ValueError:
            pass
    mutated, what = stacked(data, rng, other)
    return mutated, "bytes: " + what


# --------------------------------------------------------------------------- manifests

_CELLS = ("", " ", "nan", "NaN", "NA", "1e400", "-1e400", "-", "2", "-1", "0.5", "yes", "True",
          "1.0", "\u00e9\u00e8", "x" * 5_000, "../../../../etc", ".", "/", "images", "\x00",
          "2017-02-29", "2017-02-29T10:00:00Z", "not a time", "99999-01-01", "0001-01-01",
          "1e999", "0x10", "inf", "1,5", '"', "\n", MARKER)


def mutate_csv(data: bytes, rng: random.Random, other: bytes | None = None
               ) -> tuple[bytes, str]:
    """A manifest CSV mutated in its cells, columns and rows (60%) or its bytes (40%)."""
    if rng.random() < 0.6:
        try:
            rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
        except (UnicodeDecodeError, csv.Error):
            rows = []
        if rows and rows[0]:
            what = _csv_structure(rows, rng)
            out = io.StringIO()
            delimiter = "," if rng.random() < 0.95 else rng.choice(";\t|")
            csv.writer(out, delimiter=delimiter, lineterminator=rng.choice(("\n", "\r\n"))
                       ).writerows(rows)
            prefix = "\ufeff" if rng.random() < 0.05 else ""
            return (prefix + out.getvalue()).encode("utf-8", "surrogatepass"), "csv: " + what
    mutated, what = stacked(data, rng, other)
    return mutated, "bytes: " + what


def _csv_structure(rows: list[list[str]], rng: random.Random) -> str:
    header = rows[0]
    op = rng.choice(("cell", "cell", "cell", "drop_column", "duplicate_column", "rename",
                     "duplicate_row", "ragged", "only_header", "extra_column", "swap_columns"))
    if op == "cell" and len(rows) > 1:
        r = rng.randrange(1, len(rows))
        if rows[r]:
            c = rng.randrange(len(rows[r]))
            rows[r][c] = rng.choice(_CELLS)
            name = header[c] if c < len(header) else f"#{c}"
            return f"row {r + 1} column {name!r} replaced"
    if op == "drop_column":
        c = rng.randrange(len(header))
        name = header[c]
        for row in rows:
            if c < len(row):
                del row[c]
        return f"column {name!r} dropped"
    if op == "duplicate_column":
        c = rng.randrange(len(header))
        for row in rows:
            if c < len(row):
                row.append(row[c])
        return f"column {header[c]!r} duplicated"
    if op == "rename":
        c = rng.randrange(len(header))
        header[c] = rng.choice(("", "label", "patient_id", "image", "note_path", "Unnamed: 0",
                                " label", "LABEL", "index_time", "sex", "example_id"))
        return f"header {c} renamed"
    if op == "duplicate_row" and len(rows) > 1:
        r = rng.randrange(1, len(rows))
        rows.insert(r, list(rows[r]))
        return f"row {r + 1} duplicated"
    if op == "ragged" and len(rows) > 1:
        r = rng.randrange(1, len(rows))
        rows[r] = rows[r][:rng.randrange(len(rows[r]) + 1)] if rng.random() < 0.5 else \
            rows[r] + ["extra"] * rng.randint(1, 3)
        return f"row {r + 1} ragged"
    if op == "only_header":
        del rows[1:]
        return "rows removed"
    if op == "swap_columns" and len(header) > 1:
        a, b = rng.sample(range(len(header)), 2)
        header[a], header[b] = header[b], header[a]
        return f"headers {a} and {b} swapped"
    header.append(rng.choice(("extra", "age", "", "note")))
    for row in rows[1:]:
        row.append(rng.choice(_CELLS))
    return "column added"


_YAML_VALUES: tuple[Any, ...] = (None, 5, "sex", ["sex", "sex"], {"a": 1}, [None], [5], True,
                                 "no", [], ["missing"], [["sex"]], 1.5, "", [""])


def mutate_yaml(data: bytes, rng: random.Random, other: bytes | None = None
                ) -> tuple[bytes, str]:
    """A manifest sidecar mutated in its keys and value types (60%) or its text (40%)."""
    import yaml

    if rng.random() < 0.6:
        try:
            doc = yaml.safe_load(data)
        except yaml.YAMLError:
            doc = None
        if isinstance(doc, dict):
            key = rng.choice((*doc.keys(), "outcome", "include_sensitive", "sensitive",
                              "categorical"))
            op = rng.choice(("type", "type", "drop", "top"))
            if op == "drop":
                doc.pop(key, None)
                return yaml.safe_dump(doc).encode(), f"yaml: {key} dropped"
            if op == "top":
                return yaml.safe_dump(rng.choice(([1, 2], "text", 5, None))).encode(), \
                    "yaml: top level replaced"
            doc[key] = rng.choice(_YAML_VALUES)
            return yaml.safe_dump(doc).encode(), f"yaml: {key} replaced"
    if rng.random() < 0.3:
        snippet = rng.choice((b"a: &a [1]\nb: [*a, *a, *a]\n", b"sensitive: !!python/object:x {}\n",
                              b"\t- bad indent\n", b"key: [unclosed\n", b"? complex\n: key\n",
                              b"sensitive: *undefined\n"))
        return data + snippet, "yaml: odd text appended"
    mutated, what = stacked(data, rng, other)
    return mutated, "bytes: " + what

