"""The service as a real process: kill -9 mid-ingest and mid-job, and no PHI in any log.

``clinfuse serve`` runs in a subprocess on loopback (HTTP, MLLP and the C-STORE
SCP), configured only through CLINFUSE_* variables, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select, text

from scripts.pg_cluster import free_port
from services.auth.principal import Role
from services.auth.scopes import default_scopes
from services.auth.tokens import LocalIssuer
from services.dicomweb import build_multipart
from services.dimse import Peer, send_instances
from services.mllp import frame
from services.tables import FhirResourceRow, JobRow, PredictionRow
from tests.service_model import SynthModel

pytestmark = pytest.mark.integration
FHIR = {"Content-Type": "application/fhir+json"}


class ServerProcess:
    """`python -m services.cli serve` with its own log file; restartable, killable."""

    def __init__(self, root: Path, engine: Engine, model: SynthModel, **env: str) -> None:
        self.root = root
        self.port, self.mllp_port, self.dicom_port = free_port(), free_port(), free_port()
        self.log = root / "server.log"
        self.env = {**os.environ,
                    "CLINFUSE_DATABASE_URL": engine.url.render_as_string(hide_password=False),
                    "CLINFUSE_DATA_DIR": str(root / "data"),
                    "CLINFUSE_MODEL_PATH": str(model.model),
                    "CLINFUSE_MODEL_TRUSTED_KEYS": json.dumps([str(model.key)]),
                    "CLINFUSE_CACHE_DIR": str(model.root / "service-cache"),
                    "CLINFUSE_DICOM_ALLOWED_AETS": json.dumps(["PROCTEST"]),
                    "CLINFUSE_LOG_LEVEL": "DEBUG", **env}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--mllp-port", str(self.mllp_port),
                 "--dicom-port", str(self.dicom_port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("the server did not start:\n" + self.log.read_text()[-3000:])

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def headers(self, role: Role) -> dict[str, str]:
        # The built-in issuer's key lives in the data folder; the test signs with it as
        # an identity provider would.
        issuer = LocalIssuer(self.root / "data" / "keys" / "builtin-issuer-es384.pem",
                             "urn:clinfuse:builtin-issuer", "clinfuse")
        token = issuer.issue(f"proc-{role.value}", role,
                             scope=default_scopes(role, system=False))
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def server(db_engine: Engine, service_model: SynthModel, tmp_path: Path
           ) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path, db_engine, service_model, CLINFUSE_JOB_LEASE_S="3")
    yield process
    process.stop()


def _count(engine: Engine, model: Any, *where: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(model).where(*where))
                   .scalar_one())


def _ndjson(model: SynthModel, rows: list[int]) -> bytes:
    """The rows' Bundles as bulk-data NDJSON: urn:uuid references become Type/id."""
    lines = []
    for row in rows:
        entries = model.bundle(row)["entry"]
        local = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
                 for e in entries}
        for entry in entries:
            line = json.dumps(entry["resource"], separators=(",", ":"))
            for full_url, relative in local.items():
                line = line.replace(f'"{full_url}"', f'"{relative}"')
            lines.append(line)
    return ("\n".join(lines) + "\n").encode()


def test_kill_9_during_bulk_ingest_leaves_nothing_half_written(server: ServerProcess,
                                                               db_engine: Engine,
                                                               service_model: SynthModel
                                                               ) -> None:
    # Every patient of the cohort: an ingest of many seconds even on an idle machine.
    body = _ndjson(service_model, list(range(len(service_model.frame()))))
    n_lines = body.count(b"\n")
    server.start()
    headers = {**server.headers(Role.integration), "Content-Type": "application/fhir+ndjson"}
    outcome: dict[str, Any] = {}

    def post() -> None:
        try:
            outcome["response"] = httpx.post(f"{server.url}/fhir/$import", content=body,
                                             headers=headers, timeout=300)
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=post)
    sender.start()
    # Kill once the server is inside the ingest (the body is on loopback within ms; the
    # unit takes tens of seconds).
    time.sleep(1.5)
    server.kill9()
    sender.join(timeout=60)
    assert "error" in outcome, f"the ingest finished before the kill: {outcome}"
    assert _count(db_engine, FhirResourceRow) == 0, "a killed bulk ingest left rows behind"

    server.start()
    first = httpx.post(f"{server.url}/fhir/$import", content=body, headers=headers, timeout=300)
    assert first.status_code == 200, first.text
    stored = _count(db_engine, FhirResourceRow)
    assert 0 < stored <= n_lines
    again = httpx.post(f"{server.url}/fhir/$import", content=body, headers=headers, timeout=300)
    assert again.status_code == 200, again.text
    assert _count(db_engine, FhirResourceRow) == stored, "re-ingest after a crash is idempotent"


def test_kill_9_during_an_imaging_job_loses_no_job(server: ServerProcess, db_engine: Engine,
                                                   service_model: SynthModel) -> None:
    row = service_model.rows()[0]
    server.start()
    headers = server.headers(Role.integration)
    ingest = httpx.post(f"{server.url}/fhir", json=service_model.bundle(row),
                        headers={**headers, **FHIR}, timeout=120)
    assert ingest.status_code == 200, ingest.text
    content_type, chunks = build_multipart(service_model.series(row))
    stow = httpx.post(f"{server.url}/dicomweb/studies", content=b"".join(chunks),
                      headers={**headers, "Content-Type": content_type}, timeout=120)
    assert stow.status_code == 200, stow.text
    # The first prediction in a process loads the model's explainers (seconds): the
    # window in which the job is running.
    deadline = time.monotonic() + 120
    while _count(db_engine, JobRow, JobRow.status == "running") == 0:
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.05)
    server.kill9()
    with db_engine.connect() as connection:
        stuck = connection.execute(select(JobRow.id, JobRow.kind).where(
            JobRow.status == "running")).all()
    assert stuck, "the job finished before the kill"

    server.start()
    deadline = time.monotonic() + 240
    while True:
        with db_engine.connect() as connection:
            states = dict(connection.execute(select(JobRow.id, JobRow.status).where(
                JobRow.id.in_([job_id for job_id, _ in stuck]))).all())
        if all(s == "done" for s in states.values()):
            break
        assert time.monotonic() < deadline, f"jobs not re-run after the restart: {states}"
        time.sleep(0.5)
    assert _count(db_engine, PredictionRow, PredictionRow.source == "job") >= 1


def _phi(model: SynthModel, rows: list[int]) -> set[str]:
    """Names, birth dates and identifiers of the patients sent to the server."""
    values: set[str] = set()
    for row in rows:
        for entry in model.bundle(row)["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] != "Patient":
                continue
            for name in resource.get("name", []):
                values.update(n for n in name.get("given", []) if len(n) > 3)
                if len(name.get("family", "")) > 3:
                    values.add(name["family"])
            values.add(resource["birthDate"])
            values.update(i["value"] for i in resource.get("identifier", []))
    return values


def test_no_phi_in_any_log_after_every_entry_point(server: ServerProcess, db_engine: Engine,
                                                   service_model: SynthModel) -> None:
    rows = service_model.rows()[:6]
    server.start()
    integration = server.headers(Role.integration)
    clinician = server.headers(Role.clinician)
    base = server.url
    # FHIR transaction Bundle, NDJSON, $predict with a Bundle, a malformed Bundle
    assert httpx.post(f"{base}/fhir", json=service_model.bundle(rows[0]),
                      headers={**integration, **FHIR}, timeout=120).status_code == 200
    assert httpx.post(f"{base}/fhir/$import", content=_ndjson(service_model, rows[1:2]),
                      headers={**integration, "Content-Type": "application/fhir+ndjson"},
                      timeout=120).status_code == 200
    predicted = httpx.post(f"{base}/fhir/$predict", json=service_model.bundle(rows[2]),
                           headers={**clinician, **FHIR}, timeout=180)
    assert predicted.status_code == 200, predicted.text
    broken = json.dumps(service_model.bundle(rows[3]))[:-40]
    assert httpx.post(f"{base}/fhir", content=broken, headers={**integration, **FHIR},
                      timeout=60).status_code == 400
    # HL7 v2 over HTTP and over MLLP
    hl7_files = sorted((service_model.cohort / "hl7").glob("*.hl7"))
    assert hl7_files, "the synth cohort has HL7 v2 files"
    assert httpx.post(f"{base}/hl7v2", content=hl7_files[0].read_bytes(),
                      headers={**integration, "Content-Type": "x-application/hl7-v2+er7"},
                      timeout=120).status_code == 200
    with socket.create_connection(("127.0.0.1", server.mllp_port), timeout=60) as sock:
        sock.sendall(b"".join(frame(m) for m in _messages(hl7_files[1].read_text())))
        sock.settimeout(60)
        assert sock.recv(65536).startswith(b"\x0b")
    # DICOMweb STOW-RS and DIMSE C-STORE
    content_type, chunks = build_multipart(service_model.series(rows[0]))
    assert httpx.post(f"{base}/dicomweb/studies", content=b"".join(chunks),
                      headers={**integration, "Content-Type": content_type},
                      timeout=120).status_code == 200
    statuses = send_instances(Peer("127.0.0.1", server.dicom_port, "CLINFUSE"),
                              service_model.series(rows[4]), calling_aet="PROCTEST")
    assert set(statuses) == {0}
    # CDS Hooks with prefetch
    bundle = service_model.bundle(rows[5])
    patient = next(e["resource"] for e in bundle["entry"]
                   if e["resource"]["resourceType"] == "Patient")
    services = httpx.get(f"{base}/cds-services", headers=integration).json()["services"]
    hook = {"hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "hook": "patient-view",
            "context": {"userId": "Practitioner/1", "patientId": patient["id"]},
            "prefetch": _prefetch(bundle, services[0]["prefetch"])}
    answer = httpx.post(f"{base}/cds-services/{services[0]['id']}", json=hook,
                        headers=integration, timeout=180)
    assert answer.status_code == 200, answer.text
    time.sleep(1.0)
    server.stop()

    texts = {"application/uvicorn log": server.log.read_text(errors="replace")}
    with db_engine.connect() as connection:
        texts["access log"] = "\n".join(str(tuple(r)) for r in connection.execute(
            text("SELECT * FROM access_log")))
        texts["job errors"] = "\n".join(str(r[0]) for r in connection.execute(
            text("SELECT last_error FROM jobs WHERE last_error IS NOT NULL")))
    assert "POST /fhir" in texts["application/uvicorn log"], "the log was captured"
    for value in sorted(_phi(service_model, rows)):
        for name, content in texts.items():
            assert not re.search(rf"\b{re.escape(value)}\b", content), \
                f"a patient value appears in the {name}"


def _messages(text_: str) -> list[str]:
    parts = re.split(r"(?=MSH\|)", text_.replace("\r\n", "\r").replace("\n", "\r"))
    return [p for p in parts if p.startswith("MSH|")]


def _prefetch(bundle: dict[str, Any], templates: dict[str, str]) -> dict[str, Any]:
    from benchmarks.load_cds import prefetch_from_bundle

    return prefetch_from_bundle(bundle, templates)
