"""FHIR R4 JSON ingest: mapping, reference resolution, sources, and the shared real data."""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.errors import IngestError, NotPatientData
from fhir_adapters.fhir_json import (
    parse_fhir_datetime,
    records_from_json,
    records_from_ndjson,
    records_from_resources,
)
from fhir_adapters.record import Coding, PatientIdentifier, PatientRecord
from fhir_adapters.sources import detect_format, iter_records, read_records
from tests.shared_data import shared_data_dir

MR_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
PID = "urn:uuid:11111111-1111-4111-8111-111111111111"


def _patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient", "id": "p1",
        "identifier": [
            {"system": "urn:ssn", "value": "000-00-0000"},
            {"type": MR_TYPE, "system": "urn:mrn", "value": "MRN42"},
        ],
        "gender": "female", "birthDate": "1970-05",
        "extension": [
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
             "extension": [
                 {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                        "code": "2106-3", "display": "White"}},
                 {"url": "detailed", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                     "code": "2108-9", "display": "European"}},
                 {"url": "text", "valueString": "White"}]},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
             "extension": [
                 {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                        "code": "2186-5"}}]},
        ],
        "communication": [{"language": {"coding": [{"code": "fr"}]}},
                          {"language": {"coding": [{"code": "en"}]}, "preferred": True}],
        "deceasedDateTime": "2020-01-02T03:04:05+02:00",
        **extra,
    }


def _obs(subject: str, code: str = "2339-0", value: float = 5.5, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"},
                            {"system": "http://loinc.org", "code": code, "display": "Glucose"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2019-03-07T10:00:00-05:00",
        "valueQuantity": {"value": value, "unit": "mmol/l", "code": "mmol/L"},
        "referenceRange": [{"low": {"value": 3.9}, "high": {"value": 5.6}}],
        **extra,
    }


def _bundle(*resources: dict[str, Any], btype: str = "transaction",
            urls: list[str] | None = None) -> dict[str, Any]:
    entries = []
    for i, r in enumerate(resources):
        entry: dict[str, Any] = {"resource": r}
        if urls is not None and urls[i]:
            entry["fullUrl"] = urls[i]
        if btype == "transaction":
            entry["request"] = {"method": "POST", "url": r["resourceType"]}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": btype, "entry": entries}


def _b64(text: str, charset: str = "utf-8") -> str:
    return base64.b64encode(text.encode(charset)).decode("ascii")


# --------------------------------------------------------------------------- dates


@pytest.mark.parametrize(("value", "expected"), [
    ("2019", datetime(2019, 1, 1, tzinfo=UTC)),
    ("2019-03", datetime(2019, 3, 1, tzinfo=UTC)),
    ("2019-03-07", datetime(2019, 3, 7, tzinfo=UTC)),
    ("2019-03-07T10:00:00", datetime(2019, 3, 7, 10, tzinfo=UTC)),
    ("2019-03-07T10:00:00Z", datetime(2019, 3, 7, 10, tzinfo=UTC)),
    ("2019-03-07T10:00:00-05:00", datetime(2019, 3, 7, 15, tzinfo=UTC)),
    ("2019-03-07T10:00:00.5371234+01:00", datetime(2019, 3, 7, 9, 0, 0, 537123, tzinfo=UTC)),
])
def test_datetimes_become_aware_utc(value: str, expected: datetime) -> None:
    assert parse_fhir_datetime(value) == expected


@pytest.mark.parametrize("value", ["20190307", "2019-13-01", "2019-02-30", "yesterday", ""])
def test_bad_datetimes_raise(value: str) -> None:
    with pytest.raises(ValueError):
        parse_fhir_datetime(value)


# --------------------------------------------------------------------------- mapping


def test_transaction_bundle_maps_patient_and_observation() -> None:
    bundle = _bundle(_patient(), _obs(PID), urls=[PID, "urn:uuid:o1"])
    [record] = records_from_json(json.dumps(bundle).encode())
    assert record.key == PatientIdentifier("urn:mrn", "MRN42")  # MR preferred over first
    assert record.resource_id == "p1"
    assert set(record.identifiers) == {PatientIdentifier("urn:ssn", "000-00-0000"),
                                       PatientIdentifier("urn:mrn", "MRN42")}
    d = record.demographics
    assert d.sex == "female" and d.birth_date == date(1970, 5, 1)
    assert d.race == (Coding("urn:oid:2.16.840.1.113883.6.238", "2106-3", "White"),
                      Coding("urn:oid:2.16.840.1.113883.6.238", "2108-9", "European"))
    assert d.race_text == "White"
    assert [c.code for c in d.ethnicity] == ["2186-5"]
    assert d.language == "en"  # the preferred one
    assert record.outcome.deceased is True
    assert record.outcome.deceased_time == datetime(2020, 1, 2, 1, 4, 5, tzinfo=UTC)
    [obs] = record.observations
    assert (obs.code, obs.system, obs.value, obs.unit) == ("2339-0", "http://loinc.org", 5.5,
                                                          "mmol/L")
    assert obs.effective == datetime(2019, 3, 7, 15, tzinfo=UTC)
    assert (obs.reference_low, obs.reference_high, obs.category) == (3.9, 5.6, "laboratory")


def test_first_identifier_with_system_is_key_without_mrn() -> None:
    patient = _patient(identifier=[{"value": "no-system"}, {"system": "urn:a", "value": "A1"},
                                   {"system": "urn:b", "value": "B1"}])
    [record] = records_from_json(patient)
    assert record.key == PatientIdentifier("urn:a", "A1")
    assert len(record.identifiers) == 2


@pytest.mark.parametrize("btype", ["transaction", "batch", "collection", "searchset"])
def test_bundle_types(btype: str) -> None:
    bundle = _bundle(_patient(), _obs("Patient/p1"), btype=btype)
    if btype == "searchset":
        bundle["entry"].append({"search": {"mode": "outcome"}, "resource": {
            "resourceType": "OperationOutcome", "issue": [{"severity": "information",
                                                           "code": "informational"}]}})
    [record] = records_from_json(bundle)
    assert record.resource_id == "p1" and len(record.observations) == 1


def test_reference_forms_all_resolve() -> None:
    patient = _patient(id="p9")
    absolute = "http://server.example/fhir/Patient/p9"
    med = {"resourceType": "Medication", "id": "m1",
           "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                "code": "860975"}]}}
    resources = [
        patient,
        _obs(absolute, code="1-1"),                                         # absolute fullUrl
        _obs("Patient/p9", code="2-2"),                                     # relative
        _obs("Patient?identifier=urn:mrn|MRN42", code="3-3"),               # conditional
        _obs("Patient/p9/_history/2", code="4-4"),                          # versioned
        {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
         "contained": [med], "medicationReference": {"reference": "#m1"},
         "subject": {"reference": absolute}, "authoredOn": "2018-01-01"},    # contained
        {"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "Patient/p9"},
         "payor": [{"reference": "Organization?identifier=urn:payer|7"}]},  # conditional org
        {"resourceType": "Organization", "identifier": [{"system": "urn:payer", "value": "7"}],
         "name": "Acme Health Plan"},
    ]
    urls = [absolute] + [f"http://server.example/fhir/X/{i}" for i in range(1, len(resources))]
    [record] = records_from_json(_bundle(*resources, btype="collection", urls=urls))
    assert sorted(o.code or "" for o in record.observations) == ["1-1", "2-2", "3-3", "4-4"]
    [med_out] = record.medications
    assert med_out.code == "860975"
    assert med_out.authored == datetime(2018, 1, 1, tzinfo=UTC)
    assert record.demographics.payers == ("Acme Health Plan",)


def test_lone_observation_keeps_external_patient_reference() -> None:
    [record] = records_from_json(_obs("Patient/example"))
    assert record.key is None and record.resource_id == "example"
    assert record.patient_id == "resource|example"
    assert record.identifiers == ()
    assert record.observations[0].code == "2339-0"


def test_conditional_reference_to_outside_patient_keys_by_identifier() -> None:
    [record] = records_from_json(_obs("Patient?identifier=urn:mrn|MRN42"))
    assert record.key == PatientIdentifier("urn:mrn", "MRN42")


def test_blood_pressure_components_become_observations() -> None:
    bp = _obs("Patient/p1", code="85354-9")
    del bp["valueQuantity"]
    bp["component"] = [
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
         "valueQuantity": {"value": 120, "unit": "mmHg", "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
         "valueQuantity": {"value": 80, "unit": "mmHg"}},
    ]
    [record] = records_from_json(bp)
    got = {(o.code, o.value, o.unit) for o in record.observations}
    # The panel itself has no value, so only its components are kept.
    assert got == {("8480-6", 120.0, "mm[Hg]"), ("8462-4", 80.0, "mmHg")}


def test_value_kinds() -> None:
    base = _obs("Patient/p1")
    del base["valueQuantity"]
    cases = [({"valueString": "positive"}, "positive"), ({"valueBoolean": True}, True),
             ({"valueInteger": 3}, 3.0),
             ({"valueCodeableConcept": {"coding": [{"code": "260385009"}]}}, "260385009"),
             ({"valueCodeableConcept": {"text": "trace"}}, "trace")]
    for extra, expected in cases:
        [record] = records_from_json({**base, **extra})
        assert record.observations[0].value == expected


def test_effective_falls_back_to_period_start_then_issued() -> None:
    o = _obs("Patient/p1")
    del o["effectiveDateTime"]
    o["effectivePeriod"] = {"start": "2019-03"}
    assert records_from_json(o)[0].observations[0].effective == datetime(2019, 3, 1, tzinfo=UTC)
    del o["effectivePeriod"]
    o["issued"] = "2019-04-01T00:00:00Z"
    assert records_from_json(o)[0].observations[0].effective == datetime(2019, 4, 1, tzinfo=UTC)


def test_document_reference_text_is_decoded_with_its_charset() -> None:
    doc = {"resourceType": "DocumentReference", "status": "current",
           "subject": {"reference": "Patient/p1"}, "date": "2020-02-02T10:00:00Z",
           "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
           "content": [
               {"attachment": {"contentType": "text/plain; charset=ISO-8859-1",
                               "data": _b64("Café au lait spots noted.", "latin-1")}},
               {"attachment": {"contentType": "application/pdf", "data": _b64("%PDF-1.4")}},
               {"attachment": {"url": "http://example.org/Binary/1"}},
           ]}
    [record] = records_from_json(doc)
    [note] = record.notes
    assert note.text == "Café au lait spots noted."
    assert note.type == "11506-3" and note.time == datetime(2020, 2, 2, 10, tzinfo=UTC)


def test_diagnostic_report_presented_form_is_a_note() -> None:
    report = {"resourceType": "DiagnosticReport", "status": "final",
              "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
              "subject": {"reference": "Patient/p1"}, "issued": "2021-06-01T08:00:00+02:00",
              "conclusion": "not used when there is text",
              "presentedForm": [{"contentType": "text/plain",
                                 "data": _b64("Chest radiograph: no acute findings.")}]}
    [record] = records_from_json(report)
    [note] = record.notes
    assert note.text.startswith("Chest radiograph")
    assert note.time == datetime(2021, 6, 1, 6, tzinfo=UTC)


def test_condition_encounter_imaging() -> None:
    resources = [
        {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
         "recordedDate": "2015-06-01", "clinicalStatus": {"coding": [{"code": "active"}]}},
        {"resourceType": "Encounter", "status": "finished", "subject": {"reference": "Patient/p1"},
         "class": {"code": "EMER"}, "period": {"start": "2015-06-01T01:00:00Z",
                                              "end": "2015-06-01T05:00:00Z"}},
        {"resourceType": "ImagingStudy", "status": "available",
         "subject": {"reference": "Patient/p1"}, "started": "2015-06-01T02:00:00Z",
         "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}],
         "series": [{"uid": "1.2.3.4.5", "modality": {"code": "CT"},
                     "bodySite": {"display": "Chest"}, "numberOfInstances": 120}]},
    ]
    [record] = records_from_resources(resources)
    [cond] = record.conditions
    assert cond.code == "44054006" and cond.onset == datetime(2015, 6, 1, tzinfo=UTC)
    assert cond.clinical_status == "active"
    [enc] = record.encounters
    assert enc.encounter_class == "EMER" and enc.end == datetime(2015, 6, 1, 5, tzinfo=UTC)
    [study] = record.imaging
    assert study.StudyInstanceUID == "1.2.3.4"
    assert study.series[0].Modality == "CT" and study.series[0].BodySite == "Chest"
    assert study.series[0].NumberOfInstances == 120


def test_records_from_resources_flat_list_links_by_id() -> None:
    [record] = records_from_resources([_patient(), _obs("Patient/p1"), _obs("Patient/p1", "x")])
    assert record.key == PatientIdentifier("urn:mrn", "MRN42")
    assert len(record.observations) == 2


def test_strict_and_fast_agree_on_synthetic_bundle() -> None:
    bundle = _bundle(_patient(), _obs(PID), urls=[PID, "urn:uuid:o1"])
    assert records_from_json(bundle, strict=True) == records_from_json(bundle)


# --------------------------------------------------------------------------- NDJSON and sources


def _write_bulk(folder: Path) -> None:
    folder.mkdir()
    (folder / "Patient.ndjson").write_text(
        json.dumps(_patient()) + "\n" + json.dumps(_patient(id="p2", identifier=[
            {"system": "urn:mrn", "value": "MRN43"}])) + "\n")
    (folder / "Observation.ndjson").write_text(
        "\n".join(json.dumps(_obs(f"Patient/{p}")) for p in ("p1", "p2", "p2")) + "\n")


def test_bulk_export_folder_links_across_files(tmp_path: Path) -> None:
    _write_bulk(tmp_path / "export")
    records, errors = read_records([tmp_path / "export"])
    assert errors == []
    by_key = {str(r.key): r for r in records}
    assert set(by_key) == {"urn:mrn|MRN42", "urn:mrn|MRN43"}
    assert len(by_key["urn:mrn|MRN42"].observations) == 1
    assert len(by_key["urn:mrn|MRN43"].observations) == 2


def test_records_from_ndjson_mapping_of_files() -> None:
    files = {"Patient.ndjson": json.dumps(_patient()),
             "Observation.ndjson": json.dumps(_obs("Patient/p1"))}
    [record] = records_from_ndjson(files)
    assert record.key == PatientIdentifier("urn:mrn", "MRN42")
    assert len(record.observations) == 1


def test_read_records_merges_same_patient_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_bundle(_patient(), _obs("Patient/p1"))))
    (tmp_path / "b.json").write_text(json.dumps(_obs("Patient?identifier=urn:mrn|MRN42",
                                                     code="718-7")))
    (tmp_path / "c.json").write_text(json.dumps(_obs("Patient/p1", code="2160-0")))
    records, errors = read_records([tmp_path])
    assert errors == []
    [record] = records
    assert {o.code for o in record.observations} == {"2339-0", "718-7", "2160-0"}


def test_detect_format() -> None:
    assert detect_format(Path("x.txt"), b"MSH|^~\\&|") == "hl7"
    assert detect_format(Path("x.txt"), b'{"a":1}\n{"b":2}\n') == "ndjson"
    assert detect_format(Path("x.txt"), b'{\n "a": 1\n}\n') == "json"
    assert detect_format(Path("x.dat"), b"hello") is None
    assert detect_format(Path("Patient.ndjson"), b"") == "ndjson"


def test_iter_records_reports_every_file(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text(json.dumps(_patient()))
    (tmp_path / "notes.md").write_text("# readme")
    (tmp_path / "bad.json").write_text("{")
    out = list(iter_records([tmp_path, tmp_path / "missing.json"]))
    records = [x for x in out if isinstance(x, PatientRecord)]
    errors = [x for x in out if isinstance(x, IngestError)]
    assert len(records) == 1
    assert {Path(e.source or "").name for e in errors} == {"notes.md", "bad.json", "missing.json"}
    assert any(isinstance(e, NotPatientData) for e in errors)


# --------------------------------------------------------------------------- shared real data

SYNTHEA_CARLOTA = "Carlota_Muro_ba29bb08-e7d6-44c2-92cc-894cc29b8494.json"
SYNTHEA_NOT_PATIENTS = {"hospitalInformation1559319163815.json",
                        "practitionerInformation1559319163815.json"}
OFFICIAL_NOT_PATIENT_DATA = {
    "Composition-example-mixed.json", "Composition-example.json",
    "DiagnosticReport-gingival-mass.json",  # subject is a display only
    "Media-xray.json", "Observation-decimal.json",  # no subject at all
    "Observation-herd1.json",  # subject is a Group
    "Observation-vp-oyster.json",
    "RiskAssessment-breastcancer-risk.json", "RiskAssessment-cardiac.json",
    "RiskAssessment-genetic.json", "RiskAssessment-population.json",
    "RiskAssessment-prognosis.json", "RiskAssessment-riskexample.json",
}
OFFICIAL_REJECTED = {"package.json"}  # the package manifest, not a FHIR resource


def _ingest_all(folder: Path) -> dict[str, list[PatientRecord] | IngestError]:
    out: dict[str, list[PatientRecord] | IngestError] = {}
    for path in sorted(folder.iterdir()):
        try:
            out[path.name] = records_from_json(path.read_bytes(), path.name)
        except IngestError as e:
            out[path.name] = e
    return out


def test_every_synthea_file_ingests_or_is_not_patient_data() -> None:
    folder = shared_data_dir("fhir/synthea_r4_bundles")
    results = _ingest_all(folder)
    assert len(results) == 12
    for name, result in results.items():
        if name in SYNTHEA_NOT_PATIENTS:
            assert isinstance(result, NotPatientData), name
            assert "no patient data" in str(result)
            assert ("Organization" in str(result)) or ("Practitioner" in str(result))
        else:
            assert isinstance(result, list), f"{name}: {result}"
            [record] = result
            assert record.key is not None and record.key.system == "http://hospital.smarthealthit.org"
            assert record.demographics.birth_date is not None
            assert record.observations and record.encounters
            assert all(o.effective is not None and o.effective.tzinfo is UTC
                       for o in record.observations)


def test_text_scan_and_full_walk_agree_on_synthea() -> None:
    paths = sorted(shared_data_dir("fhir/synthea_r4_bundles").glob("[A-Z]*_*.json"))
    assert len(paths) == 10
    for path in paths:
        data = path.read_bytes()
        assert records_from_json(data) == records_from_json(json.loads(data)), path.name


def test_synthea_named_patient_values() -> None:
    path = shared_data_dir("fhir/synthea_r4_bundles") / SYNTHEA_CARLOTA
    [record] = records_from_json(path.read_bytes(), path.name)
    assert record.key == PatientIdentifier("http://hospital.smarthealthit.org",
                                           "ba29bb08-e7d6-44c2-92cc-894cc29b8494")
    d = record.demographics
    assert d.birth_date == date(1981, 7, 27) and d.sex == "female"
    assert [c.code for c in d.race] == ["2135-2"] and d.race_text == "Other"
    assert [c.code for c in d.ethnicity] == ["2186-5"]
    assert "medicaid" in d.payers
    height = next(o for o in record.observations if o.code == "8302-2")
    assert height.value == pytest.approx(169.70292081538437) and height.unit == "cm"
    assert height.effective == datetime(2013, 6, 24, 5, 39, 22, tzinfo=UTC)
    systolic = [o for o in record.observations if o.code == "8480-6"]
    diastolic = [o for o in record.observations if o.code == "8462-4"]
    assert systolic and len(systolic) == len(diastolic)
    assert all(o.unit == "mm[Hg]" for o in systolic)
    assert any(c.code == "19169002" for c in record.conditions)
    [study] = record.imaging
    assert study.StudyInstanceUID == "1.2.840.99999999.92724937.1559319180119"
    assert study.series[0].Modality == "DX" and study.series[0].BodySite == "Arm"


def test_every_official_example_ingests_or_is_rejected_with_a_reason() -> None:
    folder = shared_data_dir("fhir/hl7_r4_official_examples")
    results = _ingest_all(folder)
    assert len(results) == 165
    not_patient = {n for n, r in results.items() if isinstance(r, NotPatientData)}
    rejected = {n for n, r in results.items()
                if isinstance(r, IngestError) and not isinstance(r, NotPatientData)}
    assert not_patient == OFFICIAL_NOT_PATIENT_DATA
    assert rejected == OFFICIAL_REJECTED
    assert "no resourceType" in str(results["package.json"])
    for name in not_patient:
        result = results[name]
        assert isinstance(result, NotPatientData)
        outcome = result.to_operation_outcome()
        assert outcome["issue"][0]["diagnostics"]
    ingested = [n for n, r in results.items() if isinstance(r, list)]
    assert len(ingested) == 165 - len(OFFICIAL_NOT_PATIENT_DATA) - len(OFFICIAL_REJECTED)


def _one(folder: Path, name: str) -> PatientRecord:
    [record] = records_from_json((folder / name).read_bytes(), name)
    return record


def test_official_example_values() -> None:
    folder = shared_data_dir("fhir/hl7_r4_official_examples")
    f001 = _one(folder, "Patient-f001.json")
    assert f001.demographics.birth_date == date(1944, 11, 17)
    assert f001.key == PatientIdentifier("urn:oid:2.16.840.1.113883.2.4.6.3", "738472983")
    assert f001.demographics.language == "nl"

    example = _one(folder, "Patient-example.json")
    assert example.key == PatientIdentifier("urn:oid:1.2.36.146.595.217.0.1", "12345")
    assert example.demographics.birth_date == date(1974, 12, 25)

    glucose = _one(folder, "Observation-f001.json")
    assert glucose.key is None and glucose.resource_id == "f001"
    [obs] = glucose.observations
    assert (obs.code, obs.value, obs.unit) == ("15074-8", 6.3, "mmol/L")
    assert (obs.reference_low, obs.reference_high) == (3.1, 6.2)
    assert obs.effective == datetime(2013, 4, 2, 8, 30, 10, tzinfo=UTC)

    bgpanel = _one(folder, "Observation-bgpanel.json")
    assert bgpanel.resource_id == "infant"
    assert [o.code for o in bgpanel.observations] == ["34532-2"]

    bp = _one(folder, "Observation-blood-pressure.json")
    assert {(o.code, o.value, o.unit) for o in bp.observations} == {
        ("8480-6", 107.0, "mm[Hg]"), ("8462-4", 60.0, "mm[Hg]")}

    ct = _one(folder, "DiagnosticReport-f201.json")
    assert ct.notes[0].text.split()[:2] == ["CT", "brains:"]

    doc = _one(folder, "DocumentReference-example.json")
    assert doc.resource_id == "xcda"
    assert doc.notes == []  # its only attachment is by URL; nothing inline to decode

    study = _one(folder, "ImagingStudy-example.json")
    [ref] = study.imaging
    assert ref.StudyInstanceUID == "2.16.124.113543.6003.1154777499.30246.19789.3503430045"
    assert ref.series[0].Modality == "CT" and ref.started == datetime(2011, 1, 1, 8, 1, 20,
                                                                       tzinfo=UTC)

    apgar = _one(folder, "Observation-1minute-apgar-score.json")  # contained Patient
    assert apgar.key == PatientIdentifier("http://acmehealthcare/org/mrns", "12345")
    assert apgar.observations[0].code == "9272-6" and apgar.observations[0].value == 0.0

    report = _one(folder, "Bundle-report.json")  # results inherit the report's subject
    assert report.resource_id == "genetics-example1" and len(report.observations) == 13

    med = _one(folder, "MedicationRequest-medrx0301.json")  # contained Medication
    assert med.medications[0].code == "430127000"


def test_read_records_links_official_examples_by_resource_id() -> None:
    folder = shared_data_dir("fhir/hl7_r4_official_examples")
    records, errors = read_records([folder / "Patient-f001.json", folder / "Observation-f001.json",
                                    folder / "Condition-f001.json"])
    assert errors == []
    [record] = records
    assert record.key == PatientIdentifier("urn:oid:2.16.840.1.113883.2.4.6.3", "738472983")
    assert [o.code for o in record.observations] == ["15074-8"] and len(record.conditions) == 1


def _validating_files() -> list[Path]:
    files = sorted(shared_data_dir("fhir/synthea_r4_bundles").glob("*.json"))
    files += sorted(shared_data_dir("fhir/hl7_r4_official_examples").glob("*.json"))
    return files


def test_fast_and_strict_paths_agree_on_shared_data() -> None:
    compared = 0
    for path in _validating_files():
        data = path.read_bytes()
        try:
            fast: list[PatientRecord] | str = records_from_json(data, path.name)
        except IngestError as e:
            fast = type(e).__name__
        try:
            strict: list[PatientRecord] | str = records_from_json(data, path.name, strict=True)
        except IngestError as e:
            strict = type(e).__name__
        assert fast == strict, path.name
        compared += isinstance(fast, list)
    assert compared == 10 + 165 - len(OFFICIAL_NOT_PATIENT_DATA) - len(OFFICIAL_REJECTED)
