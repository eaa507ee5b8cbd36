"""HL7 v2 edge: shared samples, fast vs hl7apy agreement, bad input, ACK/NAK."""

from __future__ import annotations

import base64
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.errors import IngestError, NotPatientData
from fhir_adapters.hl7v2 import ack_code_for, build_ack, hl7_to_fhir_resources, records_from_hl7
from fhir_adapters.hl7v2_parse import disagreements, parse_fast, split_messages, unescape
from fhir_adapters.hl7v2_to_fhir import LOINC, UCUM
from tests.shared_data import shared_data_dir

SAMPLES = "hl7v2/ms_fhir_converter_samples"
SECRET_DOB = "19610615"

ADT = (
    "MSH|^~\\&|APP|FAC|RCV|RFAC|20240101120000+0000||ADT^A01^ADT_A01|CTRL42|P|2.5.1\r"
    "EVN|A01|20240101120000\r"
    f"PID|1||MRN123^^^HOSP&1.2.3.4&ISO^MR~999^^^SSA^SS||Doe^Jane^Q||{SECRET_DOB}|F|||"
    "||||eng|||||||H^Hispanic or Latino^HL70189|||||||20240102080000+0100|Y\r"
    + "|".join(["PV1", "1", "I", "W1^101^A", *[""] * 15, "V55^^^HOSP^VN", *[""] * 24,
                "20240101100000+0000", "20240103100000+0000"]) + "\r"
)
ORU = (
    "MSH|^~\\&|LAB|FAC|RCV|RFAC|20240101120000||ORU^R01^ORU_R01|LAB7|P|2.5\r"
    "PID|1||MRN9^^^LABNS||Roe^Rick||19800101|M\r"
    "OBR|1|||24331-1^Lipid panel^LN|||20240105083000-0500\r"
    "OBX|1|NM|2160-0^Creatinine^LN||1.3|mg/dL^^UCUM|0.5-2.2|H|||F\r"
    "OBX|2|SN|2345-7^Glucose^LN||<^5.5|mmol/L|||||F|||20240105090000\r"
    "OBX|3|TX|11529-5^Surgical path^LN||First line \\T\\ more~second line||||||F\r"
    "OBX|4|TX|11529-5^Surgical path^LN||third line||||||F\r"
)


def sample_files() -> list[Path]:
    return sorted(shared_data_dir(SAMPLES).glob("*.hl7"))


def read(name: str) -> bytes:
    return (shared_data_dir(SAMPLES) / name).read_bytes()


def validate_r4(resource: dict[str, Any]) -> None:
    """Conformance: fhir.resources' R4B models are R4's for these four resources."""
    from fhir.resources.R4B import get_fhir_model_class

    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


# --- shared samples ------------------------------------------------------------------------


def test_every_shared_sample_becomes_records_or_a_clear_rejection() -> None:
    files = sample_files()
    assert len(files) >= 100
    for path in files:
        try:
            records = records_from_hl7(path.read_bytes(), source=path.name)
        except NotPatientData as exc:  # allowed, but must say why
            assert exc.issues and exc.issues[0].diagnostics
            continue
        pids = sum(1 for m in split_messages(path.read_bytes())
                   for s in parse_fast(m) if s.name == "PID")
        assert len(records) == pids, path.name
        assert all(r.key is not None for r in records), path.name


def test_every_shared_sample_gives_r4_conformant_resources() -> None:
    for path in sample_files():
        resources = hl7_to_fhir_resources(path.read_bytes())
        ids = {f"{r['resourceType']}/{r['id']}" for r in resources}
        for resource in resources:
            validate_r4(resource)
            if "subject" in resource:
                assert resource["subject"]["reference"] in ids, path.name


@pytest.mark.slow
def test_fast_reader_agrees_with_hl7apy_field_by_field() -> None:
    failures = {}
    for path in sample_files():
        for message in split_messages(path.read_bytes()):
            found = disagreements(message)
            if found:
                failures[path.name] = found[:5]
    assert failures == {}


@pytest.mark.slow
def test_fast_and_hl7apy_paths_give_identical_resources_and_records() -> None:
    for path in sample_files():
        data = path.read_bytes()
        assert hl7_to_fhir_resources(data) == hl7_to_fhir_resources(data, parser="hl7apy"), \
            path.name
        fast = [r.to_json() for r in records_from_hl7(data, path.name)]
        slow = [r.to_json() for r in records_from_hl7(data, path.name, parser="hl7apy")]
        assert fast == slow, path.name


def test_adt_a01_sample_patient_and_encounter() -> None:
    resources = hl7_to_fhir_resources(read("ADT-A01-01.hl7"))
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    assert patient["birthDate"] == "1988-08-18"
    assert patient["gender"] == "male"
    assert patient["identifier"][0] == {
        "system": "test1", "value": "PATID1234",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                             "code": "MR"}]},
    }
    encounter = next(r for r in resources if r["resourceType"] == "Encounter")
    assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"
    assert encounter["class"]["code"] == "PRENC"
    [record] = records_from_hl7(read("ADT-A01-01.hl7"))
    assert record.demographics.birth_date == date(1988, 8, 18)
    assert {c.code for c in record.demographics.race} == {"2106-3", "2028-9"}
    assert record.outcome.deceased is True


def test_iso_assigning_authority_becomes_urn_oid() -> None:
    [record] = records_from_hl7(read("ORU-R01-01.hl7"))
    assert str(record.key) == "urn:oid:2.16.840.1.114222.4.3.3.5.1.2|14"
    assert record.demographics.birth_date == date(1963, 8, 15)


def test_oru_sample_loinc_codes_values_and_units() -> None:
    [record] = records_from_hl7(read("LRI_2.0-NG_CBC_Typ_Message.hl7"))
    assert record.demographics.birth_date == date(1961, 6, 15)
    by_code = {o.code: o for o in record.observations}
    assert {"26453-1", "718-7", "20570-8"} <= set(by_code)
    hgb = by_code["718-7"]
    assert hgb.system == LOINC
    assert (hgb.value, hgb.unit) == (12.5, "g/mL")
    assert (hgb.reference_low, hgb.reference_high) == (13.0, 18.0)
    assert hgb.effective is not None and hgb.effective.isoformat() == "2011-01-03T22:34:28+00:00"


def test_lab_oru_falls_back_to_nothing_without_obx14_and_reads_bom() -> None:
    data = read("LAB-ORU-1.hl7")
    assert data.startswith(b"\xef\xbb\xbf")
    [record] = records_from_hl7(data)
    rbc = next(o for o in record.observations if o.code == "11273-0")
    assert rbc.value == 4.06 and rbc.unit == "tera.l-1"


def test_mdm_t02_sample_note_text() -> None:
    [record] = records_from_hl7(read("MDM-T02-03.hl7"))
    assert len(record.notes) == 1
    note = record.notes[0]
    assert note.text.startswith("Toilet cylinder crackers model")
    assert note.text.count("\n") == 28  # 29 OBX TX lines, one note
    assert note.type == "DS"


# --- synthetic messages ----------------------------------------------------------------------


def test_adt_identity_and_demographics() -> None:
    resources = hl7_to_fhir_resources(ADT)
    [record] = records_from_hl7(ADT)
    assert str(record.key) == "urn:oid:1.2.3.4|MRN123"
    assert {str(i) for i in record.identifiers} == {"SSA|999", "urn:oid:1.2.3.4|MRN123"}
    assert record.demographics.sex == "female"
    assert record.demographics.birth_date == date(1961, 6, 15)
    assert record.demographics.language == "eng"
    assert [c.code for c in record.demographics.ethnicity] == ["2135-2"]
    assert record.outcome.deceased is True
    assert record.outcome.deceased_time is not None
    assert record.outcome.deceased_time.isoformat() == "2024-01-02T07:00:00+00:00"
    encounter = next(r for r in resources if r["resourceType"] == "Encounter")
    assert encounter["status"] == "finished"
    assert encounter["identifier"][0] == {"system": "HOSP", "value": "V55", "type": {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "VN"}]}}
    assert encounter["period"] == {"start": "2024-01-01T10:00:00+00:00",
                                   "end": "2024-01-03T10:00:00+00:00"}
    for resource in resources:
        validate_r4(resource)


def test_oru_quantity_range_comparator_and_text_note() -> None:
    resources = hl7_to_fhir_resources(ORU)
    obs = [r for r in resources if r["resourceType"] == "Observation"]
    creat, glucose = obs
    assert creat["code"]["coding"][0] == {"system": LOINC, "code": "2160-0",
                                          "display": "Creatinine"}
    assert creat["valueQuantity"] == {"value": 1.3, "unit": "mg/dL", "system": UCUM,
                                      "code": "mg/dL"}
    assert creat["referenceRange"][0]["low"]["value"] == 0.5
    assert creat["referenceRange"][0]["high"]["value"] == 2.2
    assert creat["effectiveDateTime"] == "2024-01-05T08:30:00-05:00"  # from OBR-7
    assert glucose["valueQuantity"]["comparator"] == "<"
    assert glucose["effectiveDateTime"] == "2024-01-05T09:00:00Z"  # OBX-14, no zone -> UTC
    [doc] = [r for r in resources if r["resourceType"] == "DocumentReference"]
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert text == "First line & more\nsecond line\nthird line"
    for resource in resources:
        validate_r4(resource)


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_segment_separators_bom_and_batch(sep: str) -> None:
    batch = "FHS|^~\\&\rBHS|^~\\&\r" + ADT + ORU + "BTS|2\rFTS|1\r"
    text = "\ufeff" + batch.replace("\r", sep)
    records = records_from_hl7(text)
    assert [str(r.key) for r in records] == ["urn:oid:1.2.3.4|MRN123", "LABNS|MRN9"]


def test_versions_2_3_to_2_8_are_read() -> None:
    for version in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.2"):
        text = ORU.replace("|P|2.5\r", f"|P|{version}\r")
        assert records_from_hl7(text)[0].observations, version
        assert records_from_hl7(text, parser="hl7apy")[0].observations, version


def test_unescape() -> None:
    enc = parse_fast(split_messages(ORU)[0])[0]._enc
    assert unescape("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\.br\\g\\X41\\\\H\\h\\N\\", enc) == \
        "a|b^c&d~e\\f\ngAh"


# --- bad input -------------------------------------------------------------------------------


def assert_located(exc: IngestError, segment: str | None, field: int | None) -> None:
    issue = exc.issues[0]
    assert issue.segment == segment
    assert issue.field == field
    assert SECRET_DOB not in str(exc)
    assert SECRET_DOB not in str(exc.to_operation_outcome())


def nak_for(text: str | bytes, exc: IngestError) -> str:
    ack = build_ack(text, ack_code_for(exc), exc, control_id="ACK1")
    assert SECRET_DOB not in ack
    return ack


@pytest.mark.parametrize("junk", [b"\x00\x01\x02\xff\xfe binary", "\x00\x07\x1b junk"])
def test_binary_junk_is_rejected(junk: bytes | str) -> None:
    with pytest.raises(IngestError) as info:
        records_from_hl7(junk)
    ack = nak_for(junk, info.value)
    assert "MSA|AR|" in ack and "\rERR|" in ack


@pytest.mark.parametrize("empty", ["", "   \r\n", b"", "\ufeff"])
def test_empty_input_is_rejected(empty: str | bytes) -> None:
    with pytest.raises(IngestError) as info:
        records_from_hl7(empty)
    assert_located(info.value, "MSH", None)
    assert "empty" in info.value.issues[0].diagnostics
    assert "MSA|AR|" in nak_for(empty, info.value)


def test_message_without_msh_is_rejected() -> None:
    text = ADT.split("\r", 1)[1]
    with pytest.raises(IngestError) as info:
        records_from_hl7(text)
    assert_located(info.value, "MSH", None)
    assert "MSH" in info.value.issues[0].diagnostics


def test_message_without_pid_is_not_patient_data() -> None:
    text = "MSH|^~\\&|A|B|C|D|20240101||MFN^M02^MFN_M02|MF1|P|2.5\rMFI|PRA||UPD\r"
    with pytest.raises(NotPatientData) as info:
        records_from_hl7(text)
    assert "no PID" in info.value.issues[0].diagnostics
    ack = nak_for(text, info.value)
    assert ack.split("\r")[1] == "MSA|AR|MF1"
    assert ack.split("\r")[2].startswith("ERR||PID^1|200^")


@pytest.mark.parametrize("parser", ["fast", "hl7apy"])
def test_bad_birth_date_is_nulled_with_a_warning_naming_pid7_not_the_value(parser: str) -> None:
    # Policy (issue 17): a field the patient can live without is nulled, not the message.
    text = ADT.replace(SECRET_DOB, "19611345")
    [record] = records_from_hl7(text, parser=parser)  # type: ignore[arg-type]
    assert record.demographics.birth_date is None
    assert str(record.key) == "urn:oid:1.2.3.4|MRN123"
    [warning] = record.warnings
    assert (warning.severity, warning.segment, warning.segment_index, warning.field) == \
        ("warning", "PID", 1, 7)
    assert "19611345" not in str(warning)
    ack = build_ack(text, "AA", record.warnings, control_id="ACK1")
    assert ack.split("\r")[1] == "MSA|AA|CTRL42"
    err = ack.split("\r")[2].split("|")
    assert err[2] == "PID^1^7" and err[3].startswith("102^") and err[4] == "W"
    assert "19611345" not in ack


def test_future_birth_date_is_nulled_with_a_warning() -> None:
    text = ADT.replace(SECRET_DOB, "29990101")
    [record] = records_from_hl7(text)
    assert record.demographics.birth_date is None
    [warning] = record.warnings
    assert (warning.segment, warning.field) == ("PID", 7)
    assert "future" in warning.diagnostics and "2999" not in warning.diagnostics


def test_unsupported_version_is_rejected() -> None:
    text = ADT.replace("|P|2.5.1\r", "|P|3.0\r")
    with pytest.raises(IngestError) as info:
        records_from_hl7(text)
    assert_located(info.value, "MSH", 12)
    assert "203^Unsupported version id" in nak_for(text, info.value)


def test_a_bad_message_drops_only_itself_and_is_named() -> None:
    # Policy (issue 17): one unreadable message drops that message, not the file.
    text = ORU + ADT.replace("|P|2.5.1\r", "|P|3.0\r")
    errors: list[IngestError] = []
    records = records_from_hl7(text, source="batch.hl7", errors=errors)
    assert [str(r.key) for r in records] == ["LABNS|MRN9"]
    [error] = errors
    assert "message 2" in str(error) and "batch.hl7" in str(error)
    assert (error.issues[0].segment, error.issues[0].field) == ("MSH", 12)
    # Without an errors list the drop is still reported, on the file's records.
    [record] = records_from_hl7(text, source="batch.hl7")
    assert [w.diagnostics[:10] for w in record.warnings] == ["message 2:"]


def test_a_file_of_only_bad_messages_raises_naming_each() -> None:
    text = ORU.replace("|P|2.5\r", "|P|3.0\r") + ADT.replace("|P|2.5.1\r", "|P|9.9\r")
    with pytest.raises(IngestError) as info:
        records_from_hl7(text, source="batch.hl7")
    assert "message 1" in str(info.value) and "message 2" in str(info.value)
    assert "batch.hl7" in str(info.value)


# --- ACK -------------------------------------------------------------------------------------


def test_ack_echoes_control_id_and_swaps_endpoints() -> None:
    ack = build_ack(ADT, control_id="ACK1")
    msh, msa = ack.split("\r")
    fields = msh.split("|")
    assert fields[2:6] == ["RCV", "RFAC", "APP", "FAC"]
    assert fields[8:12] == ["ACK^A01^ACK", "ACK1", "P", "2.5.1"]
    assert msa == "MSA|AA|CTRL42"


def test_pre_2_5_ack_uses_err_1() -> None:
    text = ORU.replace("||19800101|", "||1980xx01|").replace("|P|2.5\r", "|P|2.4\r")
    [record] = records_from_hl7(text)
    ack = build_ack(text, "AA", record.warnings, control_id="X")
    assert ack.split("\r")[1:] == ["MSA|AA|LAB7", "ERR|PID^1^7^102&Data type error&HL70357"]


def test_shared_data_helper_skips_or_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CLINFUSE_SHARED_DATA", str(tmp_path / "absent"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        shared_data_dir("hl7v2")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        shared_data_dir("hl7v2")
