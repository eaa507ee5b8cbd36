"""The demo: a synthetic cohort through every pipeline, then the service on loopback.

:func:`run_demo` is the offline pipeline: synthesise a cohort, read its FHIR and
HL7 v2 files, build the as-of feature table and check it against the cohort
manifest, train a signed demo model, score the cohort, explain one patient and
run a fairness audit. :func:`prepare_service` then loads the cohort into the
service's embedded SQLite store through the same ingest paths integration
engines use (FHIR transaction Bundles, HL7 v2, DICOM), creates the demo's local
users, and :func:`serve_demo` starts the API and dashboard on 127.0.0.1. The
service's job worker computes each patient's prediction in the background.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fhir_adapters.sources import read_sources
from pipelines.ehr_features import EHRFeatureBuilder
from pipelines.feature_spec import DEFAULT_SPEC
from pipelines.manifest import read_manifest
from pipelines.synth import generate_cohort
from services.auth.principal import Role
from services.core.config import Settings

log = logging.getLogger(__name__)


def run_demo(out: Path, *, patients: int = 300, seed: int = 7) -> pd.DataFrame:
    """Run the demo pipeline into ``out``; returns the feature table it built."""
    out.mkdir(parents=True, exist_ok=True)
    cohort = out / "cohort"
    started = time.perf_counter()
    if not (cohort / "manifest.csv").exists():
        summary = generate_cohort(patients, cohort, seed=seed, progress=True)
        log.info("synthetic cohort written\n%s", summary.to_text())
    else:
        log.info("reusing the synthetic cohort in %s", cohort)

    report = read_sources([cohort / "fhir", cohort / "hl7"])
    # A skipped file (a .DS_Store the desktop left) is fine; a rejected one is a bug.
    if report.rejected:
        raise ValueError(f"{len(report.rejected)} demo file(s) failed to ingest; first: "
                         f"{report.rejected[0]}")
    records = report.records
    log.info("read %d patient records from FHIR and HL7 v2 files", len(records))

    manifest = read_manifest(cohort / "manifest.csv")
    by_id = {r.patient_id: r for r in records}
    rows = manifest.frame
    views = [by_id[pid].as_of(t.to_pydatetime()) for pid, t in
             zip(rows["patient_id"], rows["index_time"], strict=True)]
    table = EHRFeatureBuilder(spec=DEFAULT_SPEC).fit(views).transform(views)
    table.insert(0, "patient_id", rows["patient_id"].to_numpy())
    table.to_csv(out / "features.csv", index=False)

    expected = rows[DEFAULT_SPEC.column_names()].to_numpy(dtype=float)
    got = table[DEFAULT_SPEC.column_names()].to_numpy(dtype=float)
    mismatches = sum(
        1 for a, b in zip(expected.ravel(), got.ravel(), strict=True)
        if not (math.isnan(a) and math.isnan(b)) and not math.isclose(a, b, rel_tol=1e-9,
                                                                      abs_tol=1e-9)
    )
    if mismatches:
        raise ValueError(f"{mismatches} feature value(s) differ between the manifest and the "
                         "FHIR feature builder")
    log.info("feature table (%d x %d) matches the manifest; written to %s", len(table),
             len(table.columns) - 1, out / "features.csv")
    _model_demo(out, cohort, records[0].patient_id if records else None)
    log.info("demo finished in %.1f s", time.perf_counter() - started)
    return table


def _model_demo(out: Path, cohort: Path, patient_id: str | None) -> None:
    """Train, score, explain one patient and audit, on the demo cohort (in-sample: a demo)."""
    from audits.cli import main_audit
    from pipelines.explain import main_explain
    from pipelines.scoring import main_score
    from pipelines.training import main_train

    manifest, model = cohort / "manifest.csv", out / "model"
    key = Path(f"{model}.key.pub")
    if not model.exists() and main_train(manifest, model, seed=0) != 0:
        raise ValueError("demo model training failed (see above)")
    scores = out / "scores.csv"
    if main_score(model, manifest, scores, trusted_keys=[key]) != 0:
        raise ValueError("demo scoring failed (see above)")
    if patient_id is not None and main_explain(model, manifest, out / "explanation",
                                               patient_id=patient_id,
                                               trusted_keys=[key]) != 0:
        raise ValueError("demo explanation failed (see above)")
    if main_audit(scores, None, out / "audits", manifest_sidecar=cohort / "manifest.yaml",
                  n_boot=200, threshold="threshold_high_risk") != 0:
        raise ValueError("demo audit failed (see above)")
    log.info("demo model %s, scores %s, explanation %s, audits %s (scores are in-sample: "
             "this shows the pipeline, not the model's performance; see docs/evaluation)",
             model, scores, out / "explanation", out / "audits")


# --------------------------------------------------------------------------- service

#: The demo's local users, one per role; passwords are generated per installation.
DEMO_USERS = {"clinician": Role.clinician, "compliance": Role.compliance,
              "integration": Role.integration, "admin": Role.admin}


@dataclass
class DemoService:
    """What the demo service runs on: its cohort, settings and the local users' passwords."""

    out: Path
    cohort: Path
    settings: Settings
    passwords: dict[str, str]


def _demo_settings(out: Path) -> Settings:
    model = out / "model"
    return Settings(environment="demo", database_url=f"sqlite:///{(out / 'clinfuse.db').resolve()}",
                    data_dir=(out / "service").resolve(), model_path=model.resolve(),
                    model_trusted_keys=[Path(f"{model}.key.pub").resolve()],
                    cache_dir=(out / "cache").resolve(), host="127.0.0.1",
                    # Served over plain http on loopback: a browser would not send a
                    # Secure cookie back, so the demo (and only it) says so explicitly.
                    session_cookie_secure=False)


def _passwords(out: Path) -> dict[str, str]:
    """The demo users' passwords: made once, kept in a file only the owner can read."""
    path = out / "demo-users.json"
    if path.exists():
        stored: dict[str, str] = json.loads(path.read_text())
        if set(stored) == set(DEMO_USERS):
            return stored
    passwords = {name: secrets.token_urlsafe(12) for name in DEMO_USERS}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(passwords, fh, indent=1)
    return passwords


def prepare_service(out: Path, *, patients: int = 300, seed: int = 7) -> DemoService:
    """Run the pipeline (reusing what exists), then load the cohort into the service store."""
    from services.auth.backend_services import add_user
    from services.db import make_engine, migrate, session_factory, session_scope
    from services.dicom_store import DicomStore
    from services.record_store import ingest_bundle

    run_demo(out, patients=patients, seed=seed)
    cohort = out / "cohort"
    settings = _demo_settings(out)
    started = time.perf_counter()
    engine = make_engine(settings.database_url)
    migrate(engine)
    sessions = session_factory(engine)
    # The same paths an integration engine uses; ingest is idempotent, so a rerun of the
    # demo changes nothing that is already stored.
    bundles = sorted((cohort / "fhir").glob("*.json"))
    for path in bundles:
        with session_scope(sessions) as session:
            ingest_bundle(session, json.loads(path.read_bytes()), raw=path.read_bytes())
    # The cohort's HL7 v2 files repeat the FHIR data of a fifth of the patients; a site
    # sends each fact once, so the demo store takes the FHIR copy (HL7 ingest is shown by
    # tests/services/test_hl7_service.py and `curl -X POST /hl7v2`).
    store = DicomStore(settings.dicom_storage_dir, sessions, limits=settings.dicom_limits())
    n_instances = 0
    for series in sorted(p for p in (cohort / "dicom").glob("*/*") if p.is_dir()):
        results = store.store_many([f.read_bytes() for f in sorted(series.iterdir())])
        n_instances += len(results)
    passwords = _passwords(out)
    with session_scope(sessions) as session:
        for name, role in DEMO_USERS.items():
            add_user(session, name, passwords[name], role, display_name=f"Demo {name}")
    engine.dispose()
    log.info("service store: %d FHIR Bundles and %d DICOM instances in %.1f s",
             len(bundles), n_instances, time.perf_counter() - started)
    return DemoService(out, cohort, settings, passwords)


def service_environment(demo: DemoService) -> dict[str, str]:
    """The demo settings as CLINFUSE_* variables, for a server in another process."""
    s = demo.settings
    return {"CLINFUSE_ENVIRONMENT": s.environment, "CLINFUSE_DATABASE_URL": s.database_url,
            "CLINFUSE_DATA_DIR": str(s.data_dir), "CLINFUSE_MODEL_PATH": str(s.model_path),
            "CLINFUSE_MODEL_TRUSTED_KEYS": json.dumps([str(k) for k in s.model_trusted_keys]),
            "CLINFUSE_CACHE_DIR": str(s.cache_dir),
            "CLINFUSE_SESSION_COOKIE_SECURE": str(s.session_cookie_secure).lower()}


def serve_demo(demo: DemoService, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start the API and dashboard; blocks until interrupted."""
    import uvicorn

    from services.app import create_app
    from services.http_protocol import protocol_with_header_deadline
    from services.observability import configure_logging

    settings = demo.settings.model_copy(update={"host": host, "port": port})
    configure_logging(settings.log_level)
    banner = [f"clinfuse demo: http://{host}:{port}/dashboard  (API docs: /docs)",
              f"  local users (passwords also in {demo.out / 'demo-users.json'}):"]
    banner += [f"    {name:<12} {demo.passwords[name]}" for name in DEMO_USERS]
    banner.append("  predictions are computed in the background; the worklist fills as "
                  "they finish. Not validated for clinical use.")
    # The banner is the one place a password is shown: on the operator's terminal, not
    # in the JSON log.
    sys.stderr.write("\n".join(banner) + "\n")
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None,
                http=protocol_with_header_deadline(settings.request_header_timeout_s),
                access_log=False)
