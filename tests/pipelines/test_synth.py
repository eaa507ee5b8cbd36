"""clinfuse synth: files, DICOM, FHIR/HL7 round trips, manifest = builder, truth, leakage."""

from __future__ import annotations

import base64
import json
import math
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest

from fhir_adapters.record import (
    Demographics,
    Observation,
    PatientIdentifier,
    PatientRecord,
    merge_records,
)
from pipelines.ehr_features import EHRFeatureBuilder
from pipelines.feature_spec import DEFAULT_SPEC
from pipelines.manifest import read_manifest
from pipelines.synth import CohortSummary, generate_cohort, simulate_cohort
from pipelines.synth.codes import MRN_SYSTEM, OUTCOME_TERMS
from pipelines.synth.dicom_writer import dicom_text_values
from pipelines.synth.leakage import auroc, outcome_terms, shuffled_auroc
from pipelines.synth.phantom import lesion_volume_ml

N_SMALL = 80
SLICES, SIZE = 12, 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CohortSummary]:
    out = tmp_path_factory.mktemp("synth")
    summary = generate_cohort(N_SMALL, out, seed=3, n_slices=SLICES, size=SIZE, workers=2)
    return out, summary


def _bundles(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "fhir").glob("*.json"))}


def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _minimal_record(bundle: dict[str, Any]) -> PatientRecord:
    """Test-only Bundle -> PatientRecord (Patient + Observations), for the builder check
    while fhir_adapters.fhir_json is being written."""
    patient = _resources(bundle, "Patient")[0]
    ident = patient["identifier"][0]
    key = PatientIdentifier(ident["system"], ident["value"])
    observations = [
        Observation(code=o["code"]["coding"][0]["code"], system="http://loinc.org", display=None,
                    value=o["valueQuantity"]["value"], unit=o["valueQuantity"]["code"],
                    effective=_time(o["effectiveDateTime"]))
        for o in _resources(bundle, "Observation")
    ]
    return PatientRecord(key=key, identifiers=(key,),
                         demographics=Demographics(sex=patient["gender"],
                                                   birth_date=date.fromisoformat(
                                                       patient["birthDate"])),
                         observations=observations)


def _assert_features_equal(manifest: pd.DataFrame, records: dict[str, PatientRecord]) -> None:
    columns = DEFAULT_SPEC.column_names()
    rows = manifest.set_index("patient_id")
    ids = sorted(records)
    views = [records[i].as_of(_time(rows.loc[i, "index_time"])) for i in ids]
    built = EHRFeatureBuilder(spec=DEFAULT_SPEC).fit_transform(views)
    expected = rows.loc[ids, columns].to_numpy(dtype=float)
    got = built[columns].to_numpy(dtype=float)
    assert np.array_equal(np.isnan(expected), np.isnan(got))
    both = ~np.isnan(expected)
    np.testing.assert_allclose(got[both], expected[both], rtol=1e-9, atol=1e-12)


def test_files_written(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    assert len(list((out / "fhir").glob("*.json"))) == N_SMALL
    assert 0 < len(list((out / "hl7").glob("*.hl7"))) < N_SMALL
    series = list((out / "dicom").glob("*/*"))
    assert len(series) == summary.counts["dicom_series"]
    assert all(len(list(s.glob("*.dcm"))) == SLICES for s in series)
    for name in ("manifest.csv", "manifest.yaml", "truth.csv", "truth.yaml"):
        assert (out / name).exists()
    assert "Bayes-optimal AUROC" in summary.to_text()


def test_manifest_reads_and_columns_are_the_spec(cohort: tuple[Path, CohortSummary]) -> None:
    out, _ = cohort
    m = read_manifest(out / "manifest.csv")
    assert m.feature_columns == DEFAULT_SPEC.column_names()
    assert m.sensitive == ["sex", "race", "ethnicity", "age_band"]
    assert m.sidecar["feature_source"] == "fhir-spec"
    assert m.sidecar["feature_spec_version"] == DEFAULT_SPEC.version
    assert m.outcome is not None and m.outcome["horizon_days"] == 30
    present = m.modalities_present()
    truth = pd.read_csv(out / "truth.csv")
    assert present["image"].tolist() == (truth["withheld_imaging"] == 0).tolist()
    assert present["note"].tolist() == (truth["withheld_notes"] == 0).tolist()
    assert all(p is None or p.is_dir() for p in m.image_paths())
    assert list(truth["patient_id"]) == list(m.frame["patient_id"])
    assert all(pid.startswith(MRN_SYSTEM + "|MRN") for pid in truth["patient_id"])


def test_manifest_features_equal_builder_on_written_bundles(
        cohort: tuple[Path, CohortSummary]) -> None:
    """The manifest values = EHRFeatureBuilder on the Bundles as of the index time."""
    out, _ = cohort
    manifest = pd.read_csv(out / "manifest.csv", dtype={"patient_id": str})
    records = {r.patient_id: r for r in map(_minimal_record, _bundles(out).values())}
    _assert_features_equal(manifest, records)
    # Unit conversion really was exercised.
    units = {o["valueQuantity"]["code"] for b in _bundles(out).values()
             for o in _resources(b, "Observation")}
    assert {"[degF]", "umol/L", "mEq/L"} <= units
    assert "mmol/L" in units


def test_fhir_ingest_matches_manifest(cohort: tuple[Path, CohortSummary]) -> None:
    fhir_json = pytest.importorskip(
        "fhir_adapters.fhir_json", reason="fhir_adapters.fhir_json (records_from_json) not "
                                          "written yet")
    out, _ = cohort
    manifest = pd.read_csv(out / "manifest.csv", dtype={"patient_id": str})
    found: list[PatientRecord] = []
    for path in sorted((out / "fhir").glob("*.json")):
        found += fhir_json.records_from_json(json.loads(path.read_text()), str(path))
    records = {r.patient_id: r for r in merge_records(found)}
    assert set(records) == set(manifest["patient_id"])
    _assert_features_equal(manifest, records)
    truth = pd.read_csv(out / "truth.csv").set_index("patient_id")
    for pid, record in records.items():
        view = record.as_of(_time(truth.loc[pid, "index_time"]))
        assert view.outcome.deceased is not True
        assert all(e.encounter_class != "ACUTE" for e in view.encounters)
        if truth.loc[pid, "event_type"] == "death":
            assert record.outcome.deceased_time is not None


def test_hl7_ingest_matches_fhir(cohort: tuple[Path, CohortSummary]) -> None:
    hl7v2 = pytest.importorskip("fhir_adapters.hl7v2",
                                reason="fhir_adapters.hl7v2 (records_from_hl7) not written yet")
    out, _ = cohort
    manifest = pd.read_csv(out / "manifest.csv", dtype={"patient_id": str})
    found: list[PatientRecord] = []
    for path in sorted((out / "hl7").glob("*.hl7")):
        found += hl7v2.records_from_hl7(path.read_bytes(), str(path))
    records = {r.patient_id: r for r in merge_records(found)}
    assert records and set(records) <= set(manifest["patient_id"])
    _assert_features_equal(manifest, records)


def test_hl7_structure(cohort: tuple[Path, CohortSummary]) -> None:
    out, _ = cohort
    bundles = _bundles(out)
    for path in sorted((out / "hl7").glob("*.hl7")):
        text = path.read_bytes().decode("utf-8")
        assert "\n" not in text
        segments = [s for s in text.split("\r") if s]
        kinds = [s.split("|")[8] for s in segments if s.startswith("MSH")]
        assert kinds[0] == "ADT^A01^ADT_A01" and "ORU^R01^ORU_R01" in kinds
        pid = next(s for s in segments if s.startswith("PID")).split("|")
        assert pid[3] == f"{path.stem}^^^SYNTHHOSP&2.16.840.1.113883.3.9999.1&ISO^MR"
        obx = [s.split("|") for s in segments if s.startswith("OBX|") and "|NM|" in s]
        fhir_obs = _resources(bundles[path.stem], "Observation")
        assert len(obx) == len(fhir_obs)
        assert sorted(float(o[5]) for o in obx) == sorted(
            float(o["valueQuantity"]["value"]) for o in fhir_obs)


def test_dicom_reads_back(cohort: tuple[Path, CohortSummary]) -> None:
    out, _ = cohort
    bundles = _bundles(out)
    syntaxes, shuffled, signed = set(), 0, set()
    for series in sorted((out / "dicom").glob("*/*")):
        mrn = series.parent.name
        datasets = [pydicom.dcmread(f) for f in sorted(series.glob("*.dcm"))]
        ds0 = datasets[0]
        assert ds0.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds0.Modality == "CT"
        assert ds0.PatientID == mrn == _resources(bundles[mrn], "Patient")[0]["identifier"][0][
            "value"]
        assert ds0.IssuerOfPatientID == MRN_SYSTEM
        study = _resources(bundles[mrn], "ImagingStudy")[0]
        assert study["identifier"][0]["value"] == f"urn:oid:{ds0.StudyInstanceUID}"
        assert study["series"][0]["uid"] == ds0.SeriesInstanceUID == series.name
        assert ds0.StudyDate == _time(study["started"]).strftime("%Y%m%d")
        syntaxes.add(ds0.file_meta.TransferSyntaxUID)
        signed.add(int(ds0.PixelRepresentation))
        by_position = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
        z = [float(d.ImagePositionPatient[2]) for d in by_position]
        assert np.all(np.diff(z) > 0)
        numbers = [int(d.InstanceNumber) for d in by_position]
        shuffled += numbers != sorted(numbers)
        hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                       for d in by_position])
        assert hu.shape == (SLICES, SIZE, SIZE) and hu.min() >= -1100 and hu.max() < 200
        for d in datasets:
            assert not outcome_terms(dicom_text_values(d))
    assert "1.2.840.10008.1.2.1" in syntaxes and len(syntaxes) >= 2
    assert shuffled > 0 and signed == {0, 1}


@pytest.mark.parametrize(("compression", "syntax"), [("rle", "1.2.840.10008.1.2.5"),
                                                     ("jpegls", "1.2.840.10008.1.2.4.80")])
def test_compressed_series_decode_losslessly(tmp_path: Path, compression: str,
                                             syntax: str) -> None:
    import dataclasses

    from pipelines.synth.dicom_writer import write_series
    from pipelines.synth.phantom import render

    patient = simulate_cohort(1, seed=2).patients[0]
    patient.imaging = dataclasses.replace(patient.imaging, compression=compression,
                                          signed=False, shuffled=True)
    hu = render(patient.imaging, np.random.default_rng(0), n_slices=6, size=32)
    write_series(tmp_path, patient, hu, seed=2, shuffle_rng=np.random.default_rng(1))
    datasets = [pydicom.dcmread(f) for f in (tmp_path / "dicom").glob("*/*/*.dcm")]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    assert {d.file_meta.TransferSyntaxUID for d in datasets} == {syntax}
    back = np.stack([d.pixel_array.astype(int) + int(d.RescaleIntercept) for d in datasets])
    np.testing.assert_array_equal(back, np.clip(hu, -1024, None))


def test_outcome_events_after_index_and_hidden(cohort: tuple[Path, CohortSummary]) -> None:
    out, _ = cohort
    truth = pd.read_csv(out / "truth.csv", dtype={"event_type": str}, keep_default_na=False)
    bundles = _bundles(out)
    post_index = 0
    for _, row in truth.iterrows():
        bundle = bundles[row["patient_id"].split("|")[1]]
        index = _time(row["index_time"])
        patient = _resources(bundle, "Patient")[0]
        icu = [e for e in _resources(bundle, "Encounter") if e["class"]["code"] == "ACUTE"]
        assert ("deceasedDateTime" in patient) == (row["event_type"] == "death")
        assert bool(icu) == (row["event_type"] == "icu")
        for when in [patient.get("deceasedDateTime")] + [e["period"]["start"] for e in icu]:
            if when:
                assert index < _time(when) <= index + pd.Timedelta(days=30)
        inpatient = [e for e in _resources(bundle, "Encounter") if e["class"]["code"] == "IMP"]
        assert _time(inpatient[0]["period"]["start"]) < index
        assert "end" not in inpatient[0]["period"]
        post_index += sum(_time(o["effectiveDateTime"]) > index
                          for o in _resources(bundle, "Observation"))
        for doc in _resources(bundle, "DocumentReference"):
            assert _time(doc["date"]) <= index
        for study in _resources(bundle, "ImagingStudy"):
            assert _time(study["started"]) <= index
    assert post_index > 0
    assert set(truth["label"]) == {0, 1}


def test_notes_have_negations_and_no_outcome_words(cohort: tuple[Path, CohortSummary]) -> None:
    out, _ = cohort
    texts = [base64.b64decode(d["content"][0]["attachment"]["data"]).decode()
             for b in _bundles(out).values() for d in _resources(b, "DocumentReference")]
    assert texts
    joined = "\n".join(texts)
    assert "Denies " in joined and "No " in joined
    assert outcome_terms(texts) == []
    for term in OUTCOME_TERMS:
        assert term not in joined.lower()


def test_leakage_pixels_carry_the_image_signal(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    truth = pd.read_csv(out / "truth.csv").set_index("patient_id")
    labels, stats = [], []
    for series in sorted((out / "dicom").glob("*/*")):
        datasets = [pydicom.dcmread(f) for f in series.glob("*.dcm")]
        hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                       for d in datasets])
        stats.append(lesion_volume_ml(hu, n_slices=SLICES, size=SIZE))
        labels.append(truth.loc[f"{MRN_SYSTEM}|{series.parent.name}", "label"])
    y, s = np.array(labels), np.array(stats)
    assert np.corrcoef(s, truth.set_index(truth.index)["lesion_volume_ml"].reindex(
        [f"{MRN_SYSTEM}|{p.parent.name}" for p in sorted((out / "dicom").glob("*/*"))]))[0, 1] > 0.9
    real = auroc(y, s)
    shuffled = shuffled_auroc(y, s, np.random.default_rng(0), repeats=50)
    assert real > 0.6
    assert abs(shuffled - 0.5) < 0.06
    assert summary.leakage["passed"]
    assert summary.leakage["image_stat_auroc"] == pytest.approx(real)


def test_truth_files(cohort: tuple[Path, CohortSummary]) -> None:
    import yaml

    out, summary = cohort
    truth = pd.read_csv(out / "truth.csv")
    for column in ("p_true", "bayes_posterior", "oracle_imaging", "oracle_ehr", "oracle_notes",
                   "oracle_all"):
        assert truth[column].between(0, 1).all()
    data = yaml.safe_load((out / "truth.yaml").read_text())
    assert data["outcome"]["definition"] == "death or ICU transfer within 30 days of the index time"
    roles = data["signal"]["ehr"]
    assert roles["lactate"]["role"] == "signal" and roles["sodium"]["role"] == "noise"
    assert {s["role"] for s in data["signal"]["notes"].values()} == {"signal", "noise"}
    assert data["planted_bias"] == []
    assert set(summary.oracle_auroc) == {"imaging", "ehr", "notes", "all"}


def test_determinism(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    generate_cohort(12, a, seed=11, n_slices=4, size=16, workers=2)
    generate_cohort(12, b, seed=11, n_slices=4, size=16, workers=1)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = tmp_path / "c"
    generate_cohort(12, c, seed=12, n_slices=4, size=16, workers=1)
    assert (c / "manifest.csv").read_bytes() != (a / "manifest.csv").read_bytes()


def test_bias_changes_imaging_missingness_and_lab_offset() -> None:
    fair = simulate_cohort(3000, seed=5)
    biased = simulate_cohort(3000, seed=5, bias=True)

    def withheld_rate(cohort: Any, target: bool) -> float:
        rows = [p.withheld_imaging for p in cohort.patients
                if (p.race[1] == "Black or African American"
                    or p.ethnicity[1] == "Hispanic or Latino") == target]
        return float(np.mean(rows))

    assert withheld_rate(biased, True) - withheld_rate(biased, False) > 0.2
    assert abs(withheld_rate(fair, True) - withheld_rate(fair, False)) < 0.06

    def log_lactate_gap(cohort: Any) -> float:
        by_group: dict[bool, list[float]] = {True: [], False: []}
        for p in cohort.patients:
            values = [o.spec_value for o in p.observations if o.feature == "lactate"]
            if values:
                by_group[p.race[1] == "Black or African American"].append(
                    float(np.mean(np.log(values))))
        return float(np.mean(by_group[True]) - np.mean(by_group[False]))

    assert log_lactate_gap(biased) == pytest.approx(0.35, abs=0.1)
    assert abs(log_lactate_gap(fair)) < 0.1
    # Same seed, same latents: only the recorded data moved.
    assert [p.z_ehr for p in fair.patients] == [p.z_ehr for p in biased.patients]


def test_bias_recorded_in_truth_yaml(tmp_path: Path) -> None:
    import yaml

    generate_cohort(10, tmp_path, seed=1, bias=True, n_slices=4, size=16, workers=1)
    bias = yaml.safe_load((tmp_path / "truth.yaml").read_text())["planted_bias"]
    assert [b["kind"] for b in bias] == ["imaging missingness", "measurement offset"]
    assert bias[1]["feature"] == "lactate"


def test_invalid_arguments_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_patients must be positive, got 0"):
        generate_cohort(0, tmp_path)
    with pytest.raises(ValueError, match="size must be at least 16 pixels, got 8"):
        generate_cohort(3, tmp_path, size=8)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_aurocs_in_target_ranges(seed: int) -> None:
    cohort = simulate_cohort(1000, seed=seed)
    y = cohort.labels
    assert 0.10 <= y.mean() <= 0.20
    for modality in ("imaging", "ehr", "notes"):
        assert 0.65 <= auroc(y, cohort.posterior[modality]) <= 0.80, modality
    assert auroc(y, cohort.posterior["all"]) >= 0.85
    bayes = auroc(y, cohort.posterior["bayes"])
    assert 0.80 <= bayes <= auroc(y, cohort.posterior["all"]) + 0.02
    # The Bayes posterior is calibrated: mean posterior ~ event rate.
    assert math.isclose(float(cohort.posterior["bayes"].mean()), float(y.mean()), abs_tol=0.03)
