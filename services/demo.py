"""The demo job: a synthetic cohort, ingested into the embedded store, turned into features.

Until the service exists this is the whole pipeline that does: synthesise,
ingest FHIR and HL7 v2 into SQLite, build the as-of feature table and check it
against the cohort manifest.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pandas as pd

from fhir_adapters.sources import read_records
from pipelines.ehr_features import EHRFeatureBuilder
from pipelines.feature_spec import DEFAULT_SPEC
from pipelines.manifest import read_manifest
from pipelines.synth import generate_cohort
from services.db import make_engine, migrate, session_factory, session_scope
from services.patient_store import save_record

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

    records, errors = read_records([cohort / "fhir", cohort / "hl7"])
    if errors:
        raise ValueError(f"{len(errors)} demo file(s) failed to ingest; first: {errors[0]}")
    engine = make_engine(f"sqlite:///{(out / 'clinfuse.db').resolve()}")
    migrate(engine)
    with session_scope(session_factory(engine)) as session:
        for record in records:
            save_record(session, record)
    log.info("ingested %d patient records into %s", len(records), out / "clinfuse.db")

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
    log.info("demo finished in %.1f s", time.perf_counter() - started)
    return table
