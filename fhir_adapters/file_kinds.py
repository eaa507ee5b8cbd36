"""Files that hold no patient data, and why: a folder lists them as skipped, never rejected.

A real export folder carries more than FHIR: the bulk-data client's ``log.ndjson``
(``{"exportId": ..., "eventId": "kickoff", "eventDetail": {...}}`` per line), a README,
Finder's ``.DS_Store``, empty files, a package manifest. Each check here returns the reason a
file is not patient data, or None when the file should be read; what is merely broken FHIR
is left to the readers, which drop the bad element or reject the file with its location.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["hidden_reason", "json_reason", "ndjson_reason"]

#: Keys of the smart-on-fhir bulk-data-client's log events.
_BULK_LOG_KEYS = frozenset({"exportId", "eventId"})
#: Lines looked at before an NDJSON file without any FHIR resource is called not FHIR.
_SCAN_LINES = 1000


def hidden_reason(path: Path) -> str | None:
    """Hidden files (``.DS_Store``, AppleDouble ``._x.json``) and folders (``.git``)."""
    if path.name.startswith("."):
        kind = "folder" if path.is_dir() else "file"
        return f"hidden {kind} (a name starting with '.', e.g. .DS_Store): not patient data"
    return None


def json_reason(obj: Any) -> str | None:
    """A parsed JSON document that is not a FHIR resource (no resourceType)."""
    if isinstance(obj, dict):
        if "resourceType" in obj:
            return None
        return "JSON that is not FHIR: the top-level object has no resourceType"
    kind = "an array" if isinstance(obj, list) else f"a JSON {type(obj).__name__}"
    return f"JSON that is not FHIR: the document is {kind}, not a resource"


def ndjson_reason(data: bytes) -> str | None:
    """NDJSON none of whose lines is a FHIR resource, e.g. a bulk-data client's log.

    A file with at least one line that has a resourceType is FHIR: its bad lines are the
    reader's business (dropped with their line numbers). A file none of whose lines is even
    a JSON object is not recognisably anything, so it is read too, and rejected.
    """
    objects = 0
    log_events = 0
    for n, line in enumerate(data.split(b"\n")):
        if n >= _SCAN_LINES:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(obj, dict):
            continue
        if "resourceType" in obj:
            return None
        objects += 1
        log_events += bool(_BULK_LOG_KEYS & obj.keys())
    if not objects:
        return None
    if log_events == objects:
        return ("a bulk-data client's log (exportId/eventId events), not FHIR resources: "
                "no line has a resourceType")
    return "NDJSON that is not FHIR: no line has a resourceType"
