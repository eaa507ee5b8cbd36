"""The demo job: a synthetic cohort through every pipeline that exists so far.

Until the service exists this is the whole pipeline: synthesise, ingest FHIR and
HL7 v2 into SQLite, build the as-of feature table and check it against the cohort
manifest, then train a signed demo model, score the cohort, explain one patient
and run a fairness audit.
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
