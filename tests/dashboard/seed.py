"""A small seeded demo deployment for the dashboard tests and benchmark.

Synthetic cohort (8 slices of 32x32) -> a tiny signed model -> the service's own
ingest (FHIR Bundles, HL7 v2, DICOM into the store) -> predictions by the
service's :class:`PredictionService` at each patient's index time (a few patients
also earlier, for a trend) -> two local users. Everything lives under ``root``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pandas as pd
from sqlalchemy import delete, select

from pipelines.synth import generate_cohort
from pipelines.training import train
from services.auth.backend_services import add_user
from services.auth.principal import Role
from services.core.config import Settings
from services.db import make_engine, migrate, session_factory, session_scope
from services.dicom_store import DicomStore
from services.prediction import PredictionService
from services.record_store import ingest_bundle, ingest_hl7
from services.tables import JobRow, PatientRow
from tests.pipelines.training_config import small_training_config

CLINICIAN = ("dr.lee", "clinician-demo-pw")
COMPLIANCE = ("compliance.kim", "compliance-demo-pw")
ADMIN = ("admin.ops", "admin-demo-pw")


@dataclass
class SeededDemo:
    root: Path
    settings: Settings
    service: PredictionService
    #: Patients with a trend (several predictions), then the rest; opaque ids.
    featured: list[str]
    patients: list[str]
    timings_s: dict[str, float]


def seed_demo(root: Path, *, n_patients: int = 60, seed: int = 11, trend: int = 3,
              featured: int = 4) -> SeededDemo:
    """Build the demo deployment's data under ``root`` and return its settings."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cohort = root / "cohort"
    generate_cohort(n_patients, cohort, seed=seed, n_slices=8, size=32, workers=1)
    timings["cohort"] = time.perf_counter() - t0

    t = time.perf_counter()
    model = train(cohort / "manifest.csv", root / "model",
                  config=small_training_config(image_epochs=4), cache_dir=root / "train-cache")
    timings["train"] = time.perf_counter() - t

    assert model == root / "model"
    settings = _settings(root)
    engine = make_engine(settings.database_url)
    migrate(engine)
    sessions = session_factory(engine)

    t = time.perf_counter()
    with session_scope(sessions) as session:
        for path in sorted((cohort / "fhir").glob("*.json")):
            ingest_bundle(session, json.loads(path.read_text()))
        for path in sorted((cohort / "hl7").glob("*.hl7")):
            ingest_hl7(session, path.read_bytes())
        add_user(session, *CLINICIAN, Role.clinician, display_name="Dr Lee")
        add_user(session, *COMPLIANCE, Role.compliance, display_name="Kim (compliance)")
        add_user(session, *ADMIN, Role.admin)
    store = DicomStore(settings.dicom_storage_dir, sessions)
    store.store_many([p.read_bytes() for p in sorted((cohort / "dicom").rglob("*"))
                      if p.is_file()])
    timings["ingest"] = time.perf_counter() - t

    # Index times from the manifest: predictions "as of" each patient's index time, so
    # the outcomes after it are known and an audit can label them.
    manifest = pd.read_csv(cohort / "manifest.csv")
    index_of = {str(pid).split("|")[-1]: pd.Timestamp(ts).to_pydatetime()
                for pid, ts in zip(manifest["patient_id"], manifest["index_time"], strict=True)}
    service = PredictionService.from_settings(settings, store)
    assert service is not None
    t = time.perf_counter()
    with session_scope(sessions) as session:
        rows = session.execute(select(PatientRow.id, PatientRow.identifier_value)
                               .order_by(PatientRow.identifier_value)).all()
        ids = [pid for pid, mrn in rows if mrn in index_of]
        # Featured patients: the first with imaging, notes and labs all present.
        chosen: list[str] = []
        for pid, mrn in rows:
            if mrn not in index_of:
                continue
            at = index_of[mrn]
            row = service.predict_patient(session, pid, source="dashboard",
                                          requested_by="seed", index_time=at)
            if len(chosen) < featured:
                # The trend's later points follow the index time (72 h after admission):
                # the model's population rules refuse a score earlier in the stay.
                # Created in index-time order, so the newest is also the latest.
                for hours in range(24, 24 * trend, 24):
                    service.predict_patient(session, pid, source="dashboard",
                                            requested_by="seed",
                                            index_time=at + timedelta(hours=hours))
            if len(chosen) < featured and row.modalities == "image+ehr+note":
                chosen.append(pid)
        # Ingest queued background work (predict as of now); the seed already predicted.
        session.execute(delete(JobRow))
    timings["predict"] = time.perf_counter() - t
    engine.dispose()
    (root / "seed.json").write_text(json.dumps({"featured": chosen, "patients": ids,
                                                "timings_s": timings}))
    return SeededDemo(root=root, settings=settings, service=service, featured=chosen,
                      patients=ids, timings_s=timings)


def _settings(root: Path) -> Settings:
    return Settings(environment="demo", database_url=f"sqlite:///{root / 'clinfuse.db'}",
                    data_dir=root / "data", cache_dir=root / "cache",
                    model_path=root / "model", model_trusted_keys=[root / "model.key.pub"],
                    auth_builtin_issuer=True,
                    # Served on plain-http loopback, as the demo: cookies without Secure.
                    session_cookie_secure=False)


def copy_seeded(source: Path, root: Path) -> SeededDemo:
    """A fresh copy of a deployment :func:`seed_demo` built earlier (for quick reruns)."""
    shutil.copytree(source, root, dirs_exist_ok=True, symlinks=True)
    meta = json.loads((root / "seed.json").read_text())
    settings = _settings(root)
    engine = make_engine(settings.database_url)
    store = DicomStore(settings.dicom_storage_dir, session_factory(engine))
    service = PredictionService.from_settings(settings, store)
    assert service is not None
    return SeededDemo(root=root, settings=settings, service=service,
                      featured=meta["featured"], patients=meta["patients"],
                      timings_s=meta["timings_s"])
