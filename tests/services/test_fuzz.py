"""Schemathesis against the running server's OpenAPI document, with an admin token.

One module-scoped server (``clinfuse serve`` in a subprocess, SQLite, the session's
small signed model) is seeded with a patient, a study, a prediction and the CDS
service's id, so that path parameters name things that exist; schemathesis then
runs all its phases (examples, coverage, fuzzing, stateful) with a fixed seed. The
HAR report is the ground truth for what was sent and answered.

Left out of the OpenAPI document, hence of the run: the dashboard's pages and the
two ``/auth/authorize`` pages (browser HTML forms with CSRF tokens, not API).

``positive_data_acceptance`` (ST202) is switched off only where a schema-valid
request is rightly refused for reasons the OpenAPI schema cannot state; each such
operation says why in ``_NOT_SCHEMA_DECIDABLE``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from services.auth.principal import Role
from services.dicomweb import build_multipart
from tests.service_model import SynthModel
from tests.services.test_service_process import ServerProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261126
MAX_EXAMPLES = 50
FHIR = {"Content-Type": "application/fhir+json"}

#: Operations given fewer fuzzing examples than the rest, to keep the run short.
_FEWER_EXAMPLES: dict[tuple[str, str], tuple[int, str]] = {
    ("POST", "/audits"): (8, "each audit bootstraps its metrics (n_boot up to 5000) over "
                             "every stored prediction: seconds a case"),
}
#: Operations whose schema-valid requests may be refused by rules no OpenAPI schema states.
_NOT_SCHEMA_DECIDABLE: dict[tuple[str, str], str] = {
    ("POST", "/fhir"): "a Bundle is checked against FHIR R4's rules (references, codes, "
                       "one patient per MRN), not only its JSON shape",
    ("POST", "/fhir/$import"): "at least one NDJSON line must be a storable FHIR resource",
    ("POST", "/fhir/$predict"): "the Bundle must hold exactly one patient's valid record",
    ("POST", "/dicomweb/studies"): "only multipart/related bodies of real DICOM parts store",
    ("POST", "/dicomweb/studies/{study}"): "only multipart/related bodies of real DICOM "
                                           "parts store",
    ("POST", "/auth/token"): "which fields a grant needs depends on grant_type (RFC 6749 "
                             "answers 400 invalid_request); a form schema cannot say so",
    ("POST", "/audits"): "422 when the window holds no predictions: the stored data decide",
    ("GET", "/fhir/RiskAssessment"): "subject or patient: one of the two is required",
    ("POST", "/cds-services/{service_id}"): "the hook's context and prefetch are checked "
                                           "against CDS Hooks and FHIR",
    ("POST", "/cds-services/{service_id}/feedback"): "feedback must name a card of a "
                                                    "stored prediction",
    ("POST", "/admin/models/activate"): "the path must hold a signed model artifact",
}
#: Operations whose schema-violating requests are rightly answered 200.
_ACCEPTS_ANYTHING: dict[tuple[str, str], str] = {
    ("POST", "/hl7v2"): "HL7 over HTTP answers 200 with a NAK (MSA-1 AE/AR) for any body",
}
#: The conformance checks this suite holds the API to (ST codes as schemathesis prints them).
CHECKED = {"ST101": "server error", "ST103": "undocumented status code",
           "ST105": "undocumented Content-Type", "ST108": "response violates schema",
           "ST202": "schema-valid request rejected", "ST205": "Allow header mismatch",
           "ST104": "missing Content-Type header", "ST106": "malformed media type"}


def _seed(server: ServerProcess, model: SynthModel, root: Path) -> dict[str, str]:
    """A patient with a study and a prediction; the ids for the path parameters.

    The study's STOW-RS body is kept in ``root`` for the hooks' positive STOW cases.
    """
    admin = server.headers(Role.admin)
    row = model.rows()[0]
    client = httpx.Client(base_url=server.url, headers=admin, timeout=300)
    ingest = client.post("/fhir", json=model.bundle(row), headers=FHIR)
    assert ingest.status_code == 200, ingest.text
    locations = [e["response"].get("location") or "" for e in ingest.json()["entry"]]
    patient = next(loc.split("/")[1] for loc in locations if loc.startswith("Patient/"))
    content_type, chunks = build_multipart(model.series(row))
    body = b"".join(chunks)
    (root / "stow.bin").write_bytes(body)
    (root / "stow.type").write_text(content_type)
    stow = client.post("/dicomweb/studies", content=body,
                       headers={"Content-Type": content_type})
    assert stow.status_code == 200, stow.text
    instance = client.get("/dicomweb/instances").json()[0]
    study, series, sop = (instance[tag]["Value"][0]
                          for tag in ("0020000D", "0020000E", "00080018"))
    predicted = client.post(f"/fhir/Patient/{patient}/$predict")
    assert predicted.status_code == 200, predicted.text
    prediction = next(p["valueId"] for p in predicted.json()["parameter"]
                      if p["name"] == "prediction")
    service = client.get("/cds-services").json()["services"][0]["id"]
    client.close()
    return {"path.id": patient, "path.patient_id": patient, "path.prediction_id": prediction,
            "path.study": study, "path.series": series, "path.instance": sop,
            "path.service_id": service, "query.subject": f"Patient/{patient}"}


def _config(parameters: dict[str, str]) -> str:
    # The coverage phase sends the boundary and schema-violating cases, each operation
    # methodically; the fuzzing phase then goes deep with schema-valid data.
    lines = ["[phases.fuzzing.generation]", 'mode = "positive"', "", "[parameters]"]
    lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in parameters.items()]
    for (method, path), _why in _NOT_SCHEMA_DECIDABLE.items():
        lines += ["", "[[operations]]", f"include-path = {json.dumps(path)}",
                  f"include-method = {json.dumps(method)}",
                  "checks.positive_data_acceptance.enabled = false"]
    for (method, path), (examples, _why) in _FEWER_EXAMPLES.items():
        lines += ["", "[[operations]]", f"include-path = {json.dumps(path)}",
                  f"include-method = {json.dumps(method)}",
                  f"generation.max-examples = {examples}"]
    for (method, path), _why in _ACCEPTS_ANYTHING.items():
        lines += ["", "[[operations]]", f"include-path = {json.dumps(path)}",
                  f"include-method = {json.dumps(method)}",
                  "checks.negative_data_rejection.enabled = false"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def fuzz_run(service_model: SynthModel, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("fuzz")
    engine = create_engine(f"sqlite:///{root / 'clinfuse.sqlite'}")
    server = ServerProcess(root, engine, service_model, CLINFUSE_LOG_LEVEL="INFO").start()
    try:
        config = root / "schemathesis.toml"
        config.write_text(_config(_seed(server, service_model, root)))
        har = root / "fuzz.har"
        token = server.headers(Role.admin)["Authorization"]
        result = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config),
             "run", f"{server.url}/openapi.json", "-H", f"Authorization: {token}",
             "--seed", str(SEED), "-n", str(MAX_EXAMPLES), "--request-timeout", "60",
             "--report", "har", "--report-har-path", str(har), "--no-color"],
            # cwd: schemathesis keeps a .schemathesis/ cache there; PYTHONPATH finds the hooks.
            cwd=root, env={**os.environ, "PYTHONPATH": str(ROOT),
                           "SCHEMATHESIS_HOOKS": "tests.services.fuzz_hooks",
                           "CLINFUSE_FUZZ_STOW_BODY": str(root / "stow.bin"),
                           "CLINFUSE_FUZZ_STOW_TYPE": (root / "stow.type").read_text()},
            capture_output=True, text=True, timeout=600)
        (root / "schemathesis.log").write_text(result.stdout + result.stderr)
        entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
        yield result, entries
    finally:
        server.stop()
        engine.dispose()


def _failures(output: str) -> dict[str, int]:
    section = output.split("Failures:", 1)[1].split("\n\n", 1)[0] if "Failures:" in output \
        else ""
    return {code: int(n) for code, n in re.findall(r"(ST\d{3}) [^:\n]*: (\d+)", section)}


def test_the_fuzzer_runs_a_thousand_cases_without_a_server_error(
        fuzz_run: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]) -> None:
    result, entries = fuzz_run
    tail = result.stdout[-6000:]
    statuses = Counter(int(e["response"]["status"]) for e in entries)
    assert len(entries) >= 1000, (len(entries), tail)
    assert not [s for s in statuses if s >= 500], (statuses, tail)
    share = sum(n for s, n in statuses.items() if 200 <= s < 300) / len(entries)
    assert share >= 0.30, (f"{share:.0%} of the cases reached a 2xx", statuses)


def test_the_fuzzer_finds_no_conformance_failure(
        fuzz_run: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]) -> None:
    result, _ = fuzz_run
    found = {code: n for code, n in _failures(result.stdout).items() if code in CHECKED}
    assert not found, ({CHECKED[c]: n for c, n in found.items()},
                       result.stdout[-12000:])
    assert "Errors:" not in result.stdout, result.stdout[-6000:]


def test_a_405_lists_every_method_the_path_serves(tmp_path: Path) -> None:
    """Each route serves one method: ``Allow`` must still name all of the path's."""
    from fastapi.testclient import TestClient

    from services.app import create_app
    from services.core.config import Settings
    from tests.services.service_support import bearer

    app = create_app(Settings(data_dir=tmp_path / "data",
                              database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    with TestClient(app) as client:
        admin = bearer(app, Role.admin)
        for method, path, allow in [("OPTIONS", "/audits", "GET, POST"),
                                    ("DELETE", "/dicomweb/studies/1.2.3", "GET, POST"),
                                    ("PUT", "/fhir", "POST"), ("POST", "/healthz", "GET")]:
            response = client.request(method, path, headers=admin)
            assert (response.status_code, response.headers.get("allow")) == (405, allow), path
