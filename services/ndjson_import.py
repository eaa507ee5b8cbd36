"""A bulk-data NDJSON file stored line by line (``POST /fhir/$import``).

A bad line is dropped and named; the good lines are stored together, as one unit, so
references between them resolve. Lines go for two kinds of reason:

- what the reader finds (:func:`fhir_adapters.fhir_lenient.read_ndjson`): not JSON, not a
  resource, a missing required element, a value of the wrong type, an impossible date. The
  store keeps resources as sent, so a line with an element ``clinfuse records`` would null
  is dropped here rather than stored altered; and a line whose patient was dropped goes too;
- what the store refuses (a Patient without a business identifier, a subject that is
  neither in the file nor stored): those lines are dropped and the rest stored again.

Each dropped line is one or more warnings, ``line N, <FHIRPath>: <rule>; ...``, never a value.
Only when no line can be stored is the file refused (an :class:`IngestError`, nothing stored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from fhir_adapters.errors import IngestError, Issue
from fhir_adapters.fhir_lenient import read_ndjson
from services.record_store import Incoming, IngestResult, ingest

__all__ = ["NdjsonImport", "import_ndjson"]

_STORE_EXPR = re.compile(r"line (\d+)(?:\.(.*))?")


@dataclass
class NdjsonImport:
    """What was stored, and a warning for each problem of the lines that were dropped."""

    result: IngestResult
    warnings: list[Issue] = field(default_factory=list)
    dropped_lines: int = 0


def import_ndjson(session: Session, data: bytes | str) -> NdjsonImport:
    """Store every good line of ``data``; drop and name the bad ones.

    Raises
    ------
    IngestError
        No line could be stored (the file is empty, or every line is bad); nothing is stored.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    lines = sum(1 for line in raw.split(b"\n") if line.strip())
    read = read_ndjson({"": raw}, drop_nullable=True, require_patients=False)
    warnings = read.warnings
    kept: dict[int, dict[str, Any]] = {line: resource for _, line, resource in read.kept}
    while True:
        items = [Incoming(resource, f"line {line}") for line, resource in kept.items()]
        try:
            result = ingest(session, items, source="ndjson")
        except IngestError as exc:
            refused = _refused_lines(exc, kept)
            if refused is None:
                raise
            for line, warning in refused:
                warnings.append(warning)
                kept.pop(line, None)
            if kept:
                continue
            raise IngestError([Issue(w.code, w.diagnostics, w.expression) for w in warnings]
                              ) from None
        return NdjsonImport(result, warnings, lines - len(kept))


def _refused_lines(exc: IngestError, kept: dict[int, dict[str, Any]]
                   ) -> list[tuple[int, Issue]] | None:
    """The store's issues as (line, warning); None when one is not about a line."""
    out: list[tuple[int, Issue]] = []
    for issue in exc.issues:
        m = _STORE_EXPR.fullmatch(issue.expression or "")
        if m is None or int(m.group(1)) not in kept:
            return None
        line, path = int(m.group(1)), m.group(2)
        expr = f"{kept[line]['resourceType']}.{path}" if path else None
        where = f"line {line}, {expr}" if expr else f"line {line}"
        out.append((line, Issue(issue.code, f"{where}: {issue.diagnostics}; the resource was "
                                "dropped", expr, "warning")))
    return out
