"""A FHIR Bulk Data export folder as a bulk-data client leaves it, built in the tests.

Patient, Condition, DocumentReference and (gzipped) Observation NDJSON for 13 synthetic
patients, linked by ``Patient/<id>`` references across files, plus what is not patient data:
the smart-on-fhir bulk-data-client's ``log.ndjson``, a README, a ``.DS_Store`` and an empty
file.
"""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path
from typing import Any

SECRET_NAME = "Zebulon-Quixotic"
PATIENTS = 13


def patient(i: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"p{i}",
            "identifier": [{"system": "urn:mrn", "value": f"MRN{i:03d}"}],
            "name": [{"family": SECRET_NAME}], "gender": "female", "birthDate": "1950-02-03"}


def observation(i: int, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": f"o{i}", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "subject": {"reference": f"Patient/p{i}"},
            "effectiveDateTime": "2019-01-01T08:00:00Z",
            "valueQuantity": {"value": 5.0 + i, "code": "mmol/L"}, **extra}


def condition(i: int) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": f"c{i}",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            "subject": {"reference": f"Patient/p{i}"}, "onsetDateTime": "2015-06-01"}


def document(i: int) -> dict[str, Any]:
    text = base64.b64encode(f"Seen in clinic, visit {i}.".encode()).decode()
    return {"resourceType": "DocumentReference", "id": f"d{i}", "status": "current",
            "subject": {"reference": f"Patient/p{i}"}, "date": "2019-01-02T09:00:00Z",
            "content": [{"attachment": {"contentType": "text/plain", "data": text}}]}


def ndjson(resources: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in resources)


def client_log() -> str:
    """The smart-on-fhir bulk-data-client's log.ndjson: one event per line, no FHIR."""
    export = "https://bulk.example.org/fhir/$export?_type=Patient,Condition"
    events = [
        {"eventId": "kickoff", "eventDetail": {"exportUrl": export, "errorCode": None,
                                               "softwareName": "Example FHIR Server"}},
        {"eventId": "status_progress", "eventDetail": {"body": None, "xProgress": "50%",
                                                       "retryAfter": "5"}},
        {"eventId": "status_complete", "eventDetail": {"transactionTime":
                                                       "2024-05-01T10:00:00Z"}},
        {"eventId": "manifest_complete", "eventDetail": {"outputFileCount": 4,
                                                         "errorFileCount": 0}},
        {"eventId": "download_complete", "eventDetail": {"fileUrl": "https://bulk.example.org/"
                                                         "files/Patient.ndjson",
                                                         "resourceCount": PATIENTS}},
        {"eventId": "export_complete", "eventDetail": {"files": 4, "resources": 52,
                                                       "duration": 6012}},
    ]
    return "".join(json.dumps({"exportId": "0f4c6c8e", "timestamp": "2024-05-01T10:00:0"
                                f"{n}Z", **e}) + "\n" for n, e in enumerate(events))


def export_folder(folder: Path) -> Path:
    """A bulk export of 13 patients as a client leaves it, with the non-patient files."""
    folder.mkdir()
    n = range(1, PATIENTS + 1)
    (folder / "Patient.ndjson").write_text(ndjson([patient(i) for i in n]))
    (folder / "Condition.ndjson").write_text(ndjson([condition(i) for i in n]))
    (folder / "DocumentReference.ndjson").write_text(ndjson([document(i) for i in n]))
    (folder / "Observation.ndjson.gz").write_bytes(
        gzip.compress(ndjson([observation(i) for i in n]).encode(), mtime=0))
    (folder / "log.ndjson").write_text(client_log())
    (folder / "README.md").write_text("# Export of 2024-05-01\nRun by the bulk-data client.\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (folder / "Encounter.ndjson").write_bytes(b"")
    return folder
