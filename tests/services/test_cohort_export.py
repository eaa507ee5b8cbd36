"""``clinfuse cohort export``: a manifest from the store that reproduces the synthetic
cohort's own manifest (labels, index times, features, notes, images) and that
``read_manifest`` and the training image loader accept.

A full ``clinfuse train`` on an export is not run here: it needs enough events to
split off a validation set (about 150 synthetic patients: ~90 s to generate and ~80 s
to train on two cores), too slow for this file; a 150-patient export was trained by
hand and gave a signed artifact."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sqlalchemy import Engine

from fhir_adapters.record import Encounter, Outcome, PatientIdentifier, PatientRecord
from fhir_adapters.sources import read_records
from pipelines.feature_spec import DEFAULT_SPEC
from pipelines.imaging.convert import load_image
from pipelines.manifest import read_manifest
from pipelines.synth import generate_cohort
from services.cohort_export import OutcomeDefinition, export_cohort, index_time_for
from services.db import session_factory, session_scope
from services.dicom_store import DicomStore
from services.patient_store import save_record

N_PATIENTS = 40


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_cohort(N_PATIENTS, root, seed=5, n_slices=8, size=32, workers=1, progress=False)
    return root


def _ingest(engine: Engine, cohort: Path, data_dir: Path) -> DicomStore:
    sessions = session_factory(engine)
    records, errors = read_records([cohort / "fhir", cohort / "hl7"])
    assert not errors
    with session_scope(sessions) as session:
        for record in records:
            save_record(session, record)
    store = DicomStore(data_dir / "dicom", sessions)
    results = store.store_many([p.read_bytes() for p in sorted((cohort / "dicom").rglob("*"))
                                if p.is_file()])
    assert all(r.ok for r in results)
    return store


def test_export_reproduces_the_synthetic_manifest(db_engine: Engine, cohort: Path,
                                                  tmp_path: Path) -> None:
    store = _ingest(db_engine, cohort, tmp_path)
    out = tmp_path / "export"
    with session_scope(store.sessions) as session:
        result = export_cohort(session, store.root, out,
                               OutcomeDefinition.from_config("deterioration"),
                               patient_ids="identifier")
    truth = pd.read_csv(cohort / "truth.csv")
    expected = pd.read_csv(cohort / "manifest.csv").set_index("patient_id")
    got = pd.read_csv(out / "manifest.csv", dtype={"image": str, "note": str}
                      ).set_index("patient_id")
    # HL7-only patients carry no outcome (the synthetic HL7 feed has no death or ICU
    # message), so their stored record cannot reproduce a positive label.
    fhir_only = set(truth.loc[truth["hl7"] == 0, "patient_id"])
    assert set(got.index) == set(expected.index)
    assert result.rows == len(got) == N_PATIENTS
    both = sorted(fhir_only)
    assert (got.loc[both, "label"] == expected.loc[both, "label"]).all()
    assert got.loc[both, "label"].sum() > 0
    assert (pd.to_datetime(got["index_time"]) ==
            pd.to_datetime(expected.loc[got.index, "index_time"])).all()
    columns = DEFAULT_SPEC.column_names()
    a = got[columns].to_numpy(float)
    b = expected.loc[got.index, columns].to_numpy(float)
    assert all((math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-9,
                                                                  abs_tol=1e-9)
               for x, y in zip(a.ravel(), b.ravel(), strict=True))
    assert (got["note"].fillna("") == expected.loc[got.index, "note"].fillna("")).all()
    for col in ("sex", "race", "ethnicity", "age_band"):
        assert (got[col] == expected.loc[got.index, col]).all(), col
    # Images: exactly the patients whose imaging the synthetic cohort wrote, as series
    # folders of the stored instances.
    has_image = got["image"].fillna("") != ""
    assert set(got.index[has_image]) == set(expected.index[expected["image"].fillna("") != ""])
    assert result.images == int(has_image.sum()) > 0
    first_pid = got.index[has_image][0]
    first = out / got.loc[first_pid, "image"]
    assert len(list(first.glob("*.dcm"))) == 8
    # The training loader reads the materialised series as the synthetic original.
    exported = load_image(first)
    original = load_image(cohort / expected.loc[first_pid, "image"])
    assert np.array_equal(exported.array, original.array)
    assert np.allclose(exported.affine, original.affine)

    manifest = read_manifest(out / "manifest.csv")
    assert manifest.feature_columns == columns
    assert manifest.outcome is not None and manifest.outcome["horizon_days"] == 30
    sidecar = yaml.safe_load((out / "manifest.yaml").read_text())
    assert "72 h after" in sidecar["index_time_rule"]
    assert "censored" in sidecar["label_rule"]
    assert sidecar["export"]["rows"] == N_PATIENTS


def test_opaque_patient_ids_by_default(db_engine: Engine, cohort: Path, tmp_path: Path) -> None:
    store = _ingest(db_engine, cohort, tmp_path)
    with session_scope(store.sessions) as session:
        export_cohort(session, None, tmp_path / "x",
                      OutcomeDefinition.from_config("mortality"))
    frame = pd.read_csv(tmp_path / "x" / "manifest.csv", dtype=str)
    assert not frame["patient_id"].str.contains("MRN").any()
    assert frame["image"].isna().all()


def _record(**kw: object) -> PatientRecord:
    return PatientRecord(key=PatientIdentifier("urn:s", "1"), **kw)  # type: ignore[arg-type]


def test_index_time_label_and_censoring_rules() -> None:
    adm = datetime(2024, 1, 1, tzinfo=UTC)
    stay = Encounter("IMP", "in-progress", adm)
    outcome = OutcomeDefinition.from_config("deterioration")
    index, why = index_time_for(_record(encounters=[stay]))
    assert index == adm + timedelta(hours=72) and why is None
    assert index_time_for(_record())[1] == "no dated inpatient encounter"
    assert index_time_for(_record(encounters=[Encounter("IMP", "finished", adm,
                                                        adm + timedelta(hours=10))]))[1] \
        == "discharged before the index time"
    late = datetime(2030, 1, 1, tzinfo=UTC)
    icu = Encounter("ACUTE", "in-progress", index + timedelta(days=3), type="305351004")
    assert outcome.label(_record(encounters=[stay, icu]), index, follow_up_until=late) == 1
    dead = Outcome(True, index + timedelta(days=31))  # after the 30-day horizon
    assert outcome.label(_record(encounters=[stay], outcome=dead), index,
                         follow_up_until=late) == 0
    # No event and follow-up shorter than the horizon: unknown, not 0.
    assert outcome.label(_record(encounters=[stay]), index,
                         follow_up_until=index + timedelta(days=5)) is None
    # An event on or before the index time: prevalent, not a prediction target.
    early = Encounter("ACUTE", "in-progress", index - timedelta(hours=1), type="305351004")
    assert outcome.label(_record(encounters=[stay, early]), index, follow_up_until=late) is None
    # mortality ignores ICU transfers
    assert OutcomeDefinition.from_config("mortality").label(
        _record(encounters=[stay, icu]), index, follow_up_until=late) == 0


def test_outcome_definition_errors() -> None:
    with pytest.raises(ValueError, match="unknown outcome"):
        OutcomeDefinition.from_config("nonsense")
    with pytest.raises(ValueError, match="horizon_days"):
        OutcomeDefinition.from_config({"name": "x", "coding": {"death": {}}})
    with pytest.raises(ValueError, match="coding"):
        OutcomeDefinition.from_config({"name": "x", "horizon_days": 7})
    # A model artifact keeps name/definition/horizon only: the built-in coding fills in.
    artifact = {"name": "deterioration", "definition": "...", "horizon_days": 30}
    assert OutcomeDefinition.from_config(artifact).encounter_codes == {"305351004"}


def test_cli_cohort_export(db_engine: Engine, cohort: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    data_dir = tmp_path / "data"
    _ingest(db_engine, cohort, data_dir)
    monkeypatch.setenv("CLINFUSE_DATA_DIR", str(data_dir))
    outcome = tmp_path / "outcome.yaml"
    outcome.write_text(yaml.safe_dump({"outcome": {
        "name": "deterioration", "definition": "death or ICU transfer within 30 days",
        "horizon_days": 30, "population": "adults"}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["cohort", "export", "--outcome", str(outcome), "--out", str(tmp_path / "out"),
              "--database-url", db_engine.url.render_as_string(hide_password=False)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"{N_PATIENTS} patient(s)" in out and "with a stored series" in out
    manifest = read_manifest(tmp_path / "out" / "manifest.csv")
    assert manifest.frame["image"].notna().any()
    # Nothing qualifies before any admission happened: a clear error, exit 2.
    with pytest.raises(SystemExit) as exit_info:
        main(["cohort", "export", "--outcome", "deterioration", "--out", str(tmp_path / "o2"),
              "--index-hours", "100000", "--no-images",
              "--database-url", db_engine.url.render_as_string(hide_password=False)])
    assert exit_info.value.code == 2
    assert "no patient qualifies" in capsys.readouterr().err
