"""Bad FHIR input: every case is one IngestError with located issues, no patient values in
the message, and nothing half-ingested."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.errors import IngestError, NotPatientData
from fhir_adapters.fhir_json import records_from_json, records_from_ndjson
from fhir_adapters.record import PatientRecord
from fhir_adapters.sources import read_records

#: Values planted in bad inputs; none may appear in an error or OperationOutcome.
SECRET_NAME = "Zebulon-Quixotic"
SECRET_ID = "SECRET-MRN-987654"
PID = "urn:uuid:22222222-2222-4222-8222-222222222222"


def _patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "p1",
            "identifier": [{"system": "urn:mrn", "value": SECRET_ID}],
            "name": [{"family": SECRET_NAME}], "birthDate": "1960-01-01", **extra}


def _obs(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "subject": {"reference": PID}, "effectiveDateTime": "2019-01-01",
            "valueQuantity": {"value": 5.1, "code": "mmol/L"}, **extra}


def _bundle(*resources: dict[str, Any], btype: str | None = "transaction") -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "entry": [
        {"fullUrl": PID if r["resourceType"] == "Patient" else f"urn:uuid:0000000{i}-0000-4000-"
         "8000-000000000000", "resource": r} for i, r in enumerate(resources)]}
    if btype is not None:
        bundle["type"] = btype
    return bundle


def _reject(data: Any, *, strict: bool = False, kind: type[IngestError] = IngestError
            ) -> IngestError:
    """Ingest ``data``, expect a rejection, and check it is located and value-free."""
    with pytest.raises(kind) as info:
        records_from_json(data if isinstance(data, bytes | str) else json.dumps(data),
                          "input.json", strict=strict)
    error = info.value
    assert error.issues, "an IngestError must carry issues"
    outcome = error.to_operation_outcome()
    assert outcome["resourceType"] == "OperationOutcome"
    assert len(outcome["issue"]) == len(error.issues)
    text = str(error) + json.dumps(outcome)
    for secret in (SECRET_NAME, SECRET_ID):
        assert secret not in text
    assert error.source == "input.json"
    return error


def _expressions(error: IngestError) -> set[str | None]:
    return {i.expression for i in error.issues}


# --------------------------------------------------------------------------- syntax


def test_malformed_json_names_line_and_column() -> None:
    text = '{\n  "resourceType": "Patient",\n  "name": [{"family": "' + SECRET_NAME + '"}\n}'
    error = _reject(text)
    assert "line 4, column 1" in str(error)
    assert error.issues[0].code == "structure"


def test_invalid_utf8_is_located_by_byte() -> None:
    error = _reject(b'{"resourceType": "Patient", "name": [{"family": "\xff\xfe"}]}')
    assert "offset 49" in str(error)


@pytest.mark.parametrize("data", [b"", b"   \n", "", "\ufeff"])
def test_empty_input(data: bytes | str) -> None:
    assert "empty input" in str(_reject(data))


def test_nan_is_not_json() -> None:
    assert "NaN" in str(_reject('{"resourceType": "Observation", "valueQuantity": {"value": NaN}}'))


# --------------------------------------------------------------------------- resource types


def test_misspelled_resource_type_suggests_the_right_one() -> None:
    error = _reject({"resourceType": "Patiant", "id": "x", "name": [{"family": SECRET_NAME}]})
    assert "'Patiant'" in str(error) and "did you mean 'Patient'" in str(error)
    assert _expressions(error) == {"resourceType"}


def test_non_fhir_object_and_array() -> None:
    error = _reject({"name": "clinfuse", "version": "1"})
    assert "no resourceType" in str(error)
    assert "array" in str(_reject([_patient()]))


def test_wrong_resource_type_inside_a_bundle_is_located() -> None:
    bundle = _bundle(_patient(), {"resourceType": "Observaton", "status": "final"})
    error = _reject(bundle)
    assert _expressions(error) == {"Bundle.entry[1].resource.resourceType"}


# --------------------------------------------------------------------------- required elements


def test_observation_without_status_and_code() -> None:
    obs = _obs()
    del obs["status"], obs["code"]
    error = _reject(_bundle(_patient(), obs))
    assert _expressions(error) == {"Bundle.entry[1].resource.status",
                                   "Bundle.entry[1].resource.code"}
    assert {i.code for i in error.issues} == {"required"}


def test_bundle_without_type() -> None:
    error = _reject(_bundle(_patient(), btype=None))
    assert _expressions(error) == {"Bundle.type"}


def test_unsupported_bundle_type() -> None:
    error = _reject(_bundle(_patient(), btype="history"))
    assert error.issues[0].code == "not-supported"


@pytest.mark.parametrize(("resource", "missing"), [
    ({"resourceType": "Condition", "code": {"text": "x"}}, "subject"),
    ({"resourceType": "Encounter", "subject": {"reference": "Patient/p1"}, "class": {}},
     "status"),
    ({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
      "subject": {"reference": "Patient/p1"}}, "medication[x]"),
    ({"resourceType": "DiagnosticReport", "status": "final",
      "subject": {"reference": "Patient/p1"}}, "code"),
    ({"resourceType": "DocumentReference", "status": "current",
      "subject": {"reference": "Patient/p1"}}, "content"),
    ({"resourceType": "ImagingStudy", "subject": {"reference": "Patient/p1"}}, "status"),
])
def test_required_elements_of_mapped_types(resource: dict[str, Any], missing: str) -> None:
    error = _reject(resource)
    assert f"{resource['resourceType']}.{missing}" in _expressions(error)


def test_component_without_code() -> None:
    obs = _obs(subject={"reference": "Patient/p1"}, component=[{"valueQuantity": {"value": 1}}])
    error = _reject(obs)
    assert _expressions(error) == {"Observation.component[0].code"}


# --------------------------------------------------------------------------- references


def test_unresolved_urn_uuid_names_entry_and_path() -> None:
    obs = _obs(subject={"reference": "urn:uuid:99999999-9999-4999-8999-999999999999"})
    error = _reject(_bundle(_patient(), obs))
    [issue] = error.issues
    assert issue.code == "not-found"
    assert issue.expression == "Bundle.entry[1].resource.subject.reference"
    assert "99999999" not in str(error)


def test_unresolved_reference_deep_in_an_unmapped_resource() -> None:
    claim = {"resourceType": "Claim", "patient": {"reference": PID},
             "provider": {"reference": "urn:uuid:77777777-7777-4777-8777-777777777777"}}
    error = _reject(_bundle(_patient(), claim))
    assert _expressions(error) == {"Bundle.entry[1].resource.provider.reference"}


def test_unresolved_contained_reference() -> None:
    med = {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
           "subject": {"reference": "Patient/p1"}, "medicationReference": {"reference": "#nope"}}
    error = _reject(med)
    assert _expressions(error) == {"MedicationRequest.medicationReference.reference"}


# --------------------------------------------------------------------------- absurd values


def test_future_birth_date_is_rejected_without_echoing_it() -> None:
    error = _reject(_patient(birthDate="2999-01-01"))
    assert _expressions(error) == {"Patient.birthDate"}
    assert "2999" not in str(error) and "future" in str(error)


def test_future_observation_time_is_rejected() -> None:
    error = _reject(_bundle(_patient(), _obs(effectiveDateTime="2999-06-01T00:00:00Z")))
    assert _expressions(error) == {"Bundle.entry[1].resource.effectiveDateTime"}


def test_death_before_birth() -> None:
    error = _reject(_patient(deceasedDateTime="1950-01-01"))
    assert error.issues[0].code == "invariant"


@pytest.mark.parametrize(("element", "value"), [
    ("birthDate", "1960-13-45"), ("birthDate", 19600101), ("deceasedBoolean", "yes")])
def test_malformed_patient_values(element: str, value: Any) -> None:
    error = _reject(_patient(**{element: value}))
    assert _expressions(error) == {f"Patient.{element}"}
    assert str(value) not in str(error)


def test_quantity_value_must_be_a_number() -> None:
    error = _reject(_bundle(_patient(), _obs(valueQuantity={"value": "5.1", "code": "mmol/L"})))
    assert _expressions(error) == {"Bundle.entry[1].resource.valueQuantity.value"}


def test_bad_base64_and_bad_charset_text() -> None:
    doc = {"resourceType": "DocumentReference", "status": "current",
           "subject": {"reference": "Patient/p1"},
           "content": [{"attachment": {"contentType": "text/plain", "data": "@@not base64@@"}},
                       {"attachment": {"contentType": "text/plain; charset=utf-8",
                                       "data": base64.b64encode(b"\xff\xfe bad").decode()}}]}
    error = _reject(doc)
    assert _expressions(error) == {"DocumentReference.content[0].attachment.data",
                                   "DocumentReference.content[1].attachment.data"}


# --------------------------------------------------------------------------- not patient data


@pytest.mark.parametrize("resource", [
    {"resourceType": "ValueSet", "status": "active", "url": "http://example.org/vs"},
    {"resourceType": "CodeSystem", "status": "active", "content": "complete"},
    {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Organization", "name": "Acme"}}]},
    {"resourceType": "Bundle", "type": "searchset", "total": 0},
    {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
     "subject": {"reference": "Group/herd"}},
])
def test_no_patient_data(resource: dict[str, Any]) -> None:
    error = _reject(resource, kind=NotPatientData)
    assert "no patient data" in str(error)
    assert error.issues[0].code == "not-supported"


def test_unresolved_reference_in_a_parsed_dict() -> None:
    # A dict skips the text scan and walks every element; same verdict, same location.
    obs = _obs(subject={"reference": "urn:uuid:99999999-9999-4999-8999-999999999999"})
    with pytest.raises(IngestError) as info:
        records_from_json(_bundle(_patient(), obs))
    assert _expressions(info.value) == {"Bundle.entry[1].resource.subject.reference"}


def test_hash_reference_in_a_resource_without_contained() -> None:
    med = {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
           "subject": {"reference": PID}, "medicationReference": {"reference": "#m1"},
           "contained": [{"resourceType": "Medication", "id": "m1"}]}
    obs = _obs(hasMember=[{"reference": "#m1"}])  # "#m1" is not contained in *this* resource
    error = _reject(_bundle(_patient(), med, obs))
    assert _expressions(error) == {"Bundle.entry[2].resource.hasMember[0].reference"}


# --------------------------------------------------------------------------- nothing half-ingested


def test_one_bad_entry_drops_that_entry_and_strict_rejects_the_whole_file(
        tmp_path: Path) -> None:
    # Issue 17's policy: a file is not a transaction; strict keeps all-or-nothing.
    good = _bundle(_patient(), _obs())
    bad_obs = _obs()
    del bad_obs["status"]
    bad = _bundle(_patient(identifier=[{"system": "urn:mrn", "value": "OTHER"}]), _obs(), bad_obs)
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    records, errors = read_records([tmp_path])
    assert errors == []
    by_key = {str(r.key): r for r in records}
    assert set(by_key) == {f"urn:mrn|{SECRET_ID}", "urn:mrn|OTHER"}
    kept = by_key["urn:mrn|OTHER"]
    assert len(kept.observations) == 1
    [warning] = kept.warnings
    assert warning.severity == "warning"
    assert warning.expression == "Bundle.entry[2].resource.status"
    assert warning.diagnostics.startswith(str(tmp_path / "bad.json"))
    assert warning.diagnostics.endswith("the resource was dropped")
    assert by_key[f"urn:mrn|{SECRET_ID}"].warnings == []

    records, errors = read_records([tmp_path], strict=True)
    assert [str(r.key) for r in records] == [f"urn:mrn|{SECRET_ID}"]
    [error] = errors
    assert error.source is not None and error.source.endswith("bad.json")
    assert "Bundle.entry[2].resource.status" in {i.expression for i in error.issues}


def test_many_problems_are_all_reported_at_once() -> None:
    obs = _obs()
    del obs["status"]
    error = _reject(_bundle(_patient(birthDate="2999-01-01"), obs,
                            {"resourceType": "Condition"}))
    assert len(error.issues) == 3


def test_ndjson_bad_line_is_located_and_rejects_all() -> None:
    text = json.dumps(_patient()) + "\n{not json\n" + json.dumps({"resourceType": "Nope"}) + "\n"
    with pytest.raises(IngestError) as info:
        records_from_ndjson(text, "Patient.ndjson")
    message = str(info.value)
    assert "line 2" in message and "line 3" in message
    assert SECRET_NAME not in message


def test_ndjson_empty() -> None:
    with pytest.raises(IngestError, match="empty input"):
        records_from_ndjson("\n\n")


def test_missing_path_and_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    records, errors = read_records([tmp_path / "data.csv", tmp_path / "absent.json"])
    assert records == []
    kinds = {type(e) for e in errors}
    assert kinds == {NotPatientData, IngestError}
    assert any(i.code == "not-found" for e in errors for i in e.issues)


# --------------------------------------------------------------------------- strict path


def test_strict_locates_pydantic_errors_without_values() -> None:
    patient = _patient(birthDate="1960-13-45", gender="female",
                       identifier=[{"system": "urn:mrn", "value": 987654321}],
                       name=[{"family": SECRET_NAME, "nickname": SECRET_NAME}])
    error = _reject(_bundle(patient), strict=True)
    assert _expressions(error) >= {"Bundle.entry[0].resource.birthDate",
                                   "Bundle.entry[0].resource.identifier[0].value",
                                   "Bundle.entry[0].resource.name[0].nickname"}
    assert "987654321" not in str(error) and "1960-13-45" not in str(error)


def test_strict_catches_what_fast_path_does_not_check() -> None:
    # Patient.active must be a boolean; the fast path does not map it, strict does check.
    patient = _patient(active="maybe")
    [record] = records_from_json(patient)
    assert isinstance(record, PatientRecord)
    error = _reject(patient, strict=True)
    assert _expressions(error) == {"Patient.active"}


def test_strict_bundle_shell_is_validated() -> None:
    bundle = _bundle(_patient())
    bundle["entry"][0]["request"] = {"method": "POST"}  # request.url is required
    error = _reject(bundle, strict=True)
    assert "Bundle.entry[0].request.url" in _expressions(error)
