"""HL7 v2 tolerance (issue 17): the smallest bad element is nulled or dropped, with a warning.

Messages are built here, synthetic; the shapes follow real public-health ORU^R01 feeds
(a newborn-screening report, labs with comparators, TX/XTN results, LF-separated files).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest

from fhir_adapters.errors import Issue
from fhir_adapters.hl7v2 import build_ack, hl7_to_fhir_resources, map_hl7, records_from_hl7
from fhir_adapters.hl7v2_parse import disagreements, read_messages, split_messages
from fhir_adapters.hl7v2_to_fhir import MappedMessage

IMPOSSIBLE = "201702291252-0500"  # Feb 29 in 2017, not a leap year
OBR7 = "20170301083000-0500"
OBR7_UTC = datetime(2017, 3, 1, 13, 30, tzinfo=UTC)
MRN = "NB0042"


def oru(*obx: str, obr7: str = OBR7, version: str = "2.5.1", control: str = "NBS1",
        sep: str = "\r") -> str:
    """An ORU^R01 for one newborn, with the given OBX segments after one OBR."""
    head = [
        f"MSH|^~\\&|NBS_LAB|STATE_PHL|CLINFUSE|HOSP|20170301090000-0500||ORU^R01^ORU_R01|"
        f"{control}|P|{version}",
        f"PID|1||{MRN}^^^STATE_PHL&2.16.840.1.113883.3.9999.7&ISO^MR||Baby^Girl||20170227|F",
        f"OBR|1||SPEC9|57128-1^Newborn screening panel^LN|||{obr7}",
    ]
    return sep.join([*head, *obx]) + sep


def nm(n: int, value: str = "1.5", when: str = "", unit: str = "umol/L") -> str:
    return f"OBX|{n}|NM|{46000 + n}-1^Analyte {n}^LN||{value}|{unit}^^UCUM|||||F|||{when}"


def where(issue: Issue) -> tuple[str | None, int | None, int | None]:
    return issue.segment, issue.segment_index, issue.field


def one_record(text: str, parser: str = "fast") -> Any:
    [record] = records_from_hl7(text, parser=parser)  # type: ignore[arg-type]
    return record


def resources_of(text: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in hl7_to_fhir_resources(text) if r["resourceType"] == kind]


def validate_r4(resource: dict[str, Any]) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


# --- dates -------------------------------------------------------------------------------


@pytest.mark.parametrize("parser", ["fast", "hl7apy"])
def test_newborn_screen_keeps_all_131_results_102_with_obr7_time(parser: str) -> None:
    bad = {n for n in range(1, 131) if n % 9 not in (1, 5)} | {131}  # 102 of the 131
    assert len(bad) == 102
    segments = []
    for n in range(1, 132):
        when = IMPOSSIBLE if n in bad else "201702281252-0500"
        if n % 3 == 0:
            segments.append(f"OBX|{n}|CWE|{46000 + n}-1^Screen {n}^LN||LA6626-1^Normal^LN"
                            f"||||||F|||{when}")
        else:
            segments.append(nm(n, when=when))
    text = oru(*segments)
    record = one_record(text, parser)
    assert str(record.key) == f"urn:oid:2.16.840.1.113883.3.9999.7|{MRN}"
    assert len(record.observations) == 131
    by_code = {o.code: o for o in record.observations}
    for n in range(1, 132):
        expected = OBR7_UTC if n in bad else datetime(2017, 2, 28, 17, 52, tzinfo=UTC)
        assert by_code[f"{46000 + n}-1"].effective == expected, n
    assert [where(w) for w in record.warnings] == [("OBX", n, 14) for n in sorted(bad)]
    assert all(w.severity == "warning" and IMPOSSIBLE not in w.diagnostics
               for w in record.warnings)
    ack = build_ack(text, "AA", record.warnings, control_id="A1")
    errs = [s.split("|") for s in ack.split("\r") if s.startswith("ERR|")]
    assert ack.split("\r")[1] == "MSA|AA|NBS1"
    assert [e[2] for e in errs] == [f"OBX^{n}^14" for n in sorted(bad)]
    assert {e[4] for e in errs} == {"W"}
    assert IMPOSSIBLE not in ack and "2017022" not in ack


def test_one_impossible_obx14_falls_back_to_obr7_as_a_missing_one_would() -> None:
    text = oru(nm(1, when="20170228125200-0500"), nm(2, when=IMPOSSIBLE), nm(3))
    record = one_record(text)
    times = [o.effective for o in record.observations]
    assert times == [datetime(2017, 2, 28, 17, 52, tzinfo=UTC), OBR7_UTC, OBR7_UTC]
    [warning] = record.warnings
    assert where(warning) == ("OBX", 2, 14)
    assert warning.code == "value" and "OBX-14" in warning.diagnostics


def test_bad_obr7_is_warned_once_and_its_results_stay_undated() -> None:
    text = oru(nm(1), nm(2), nm(3, when="20170228"), obr7="20171345")
    record = one_record(text)
    assert [o.effective for o in record.observations] == [
        None, None, datetime(2017, 2, 28, tzinfo=UTC)]
    assert [where(w) for w in record.warnings] == [("OBR", 1, 7)]


def test_bad_dates_elsewhere_are_nulled_and_located() -> None:
    text = "\r".join([
        "MSH|^~\\&|ADT|HOSP|CLINFUSE|HOSP|20240101120000||ADT^A03^ADT_A03|ADT9|P|2.5.1",
        "|".join(["PID", "1", "", "M77^^^HOSP^MR", "", "Doe^Jo", "", "19800230", "M",
                  *[""] * 20, "20240231"]),
        "|".join(["PV1", "1", "I", *[""] * 41, "20240105", "2024010699"]),
        "TXA|1|DS|TX|2024023010||20240107",
        "OBX|1|TX|11506-3^Progress note^LN||Seen and well.||||||F",
    ]) + "\r"
    record = one_record(text)
    assert record.demographics.birth_date is None
    assert record.outcome.deceased_time is None
    [encounter] = record.encounters
    assert encounter.start == datetime(2024, 1, 5, tzinfo=UTC) and encounter.end is None
    [note] = record.notes
    assert note.text == "Seen and well." and note.time == datetime(2024, 1, 7, tzinfo=UTC)
    assert [where(w) for w in record.warnings] == [
        ("PID", 1, 7), ("PID", 1, 29), ("PV1", 1, 45), ("TXA", 1, 4)]
    for resource in hl7_to_fhir_resources(text):
        validate_r4(resource)


# --- OBX-5 and OBX-3: only these drop their result ----------------------------------------


@pytest.mark.parametrize(("kind", "value"), [
    ("DTM", "20170231083000"), ("DT", "2017-02-01"), ("TS", "201702291252"),
    ("TM", "2599"), ("NM", "TNP"), ("NM", "1.2.3"), ("SN", "abc^5"), ("SN", "<^1^-^2"),
])
def test_a_malformed_obx5_drops_only_that_result(kind: str, value: str) -> None:
    bad = f"OBX|2|{kind}|99999-9^Odd^LN||{value}||||||F"
    text = oru(nm(1), bad, nm(3))
    record = one_record(text)
    assert [o.code for o in record.observations] == ["46001-1", "46003-1"]
    [warning] = record.warnings
    assert where(warning) == ("OBX", 2, 5)
    assert kind in warning.diagnostics and "dropped" in warning.diagnostics
    assert value not in warning.diagnostics


def test_a_valid_obx5_date_is_kept() -> None:
    text = oru("OBX|1|DTM|8665-2^Last menstrual period^LN||20170115||||||F")
    [obs] = resources_of(text, "Observation")
    assert obs["valueDateTime"] == "2017-01-15"
    assert one_record(text).warnings == []


def test_an_empty_obx3_drops_its_result() -> None:
    text = oru(nm(1), "OBX|2|NM|||7.1|mmol/L||||F", nm(3))
    record = one_record(text)
    assert len(record.observations) == 2
    assert [where(w) for w in record.warnings] == [("OBX", 2, 3)]


# --- what the source meant -------------------------------------------------------------------


@pytest.mark.parametrize(("value", "comparator", "number"), [
    ("<2.22", "<", 2.22), (">=10", ">=", 10), ("< 5", "<", 5), (">0.5", ">", 0.5),
    ("<=3", "<=", 3),
])
def test_nm_with_a_comparator_is_a_quantity_with_that_comparator(
        value: str, comparator: str, number: float) -> None:
    text = oru(nm(1, value=value, unit="mg/dL"))
    [obs] = resources_of(text, "Observation")
    assert obs["valueQuantity"]["comparator"] == comparator
    assert obs["valueQuantity"]["value"] == number
    assert obs["valueQuantity"]["unit"] == "mg/dL"
    validate_r4(obs)
    record = one_record(text)
    # The record keeps the number; the comparator stays in the FHIR resource.
    assert record.observations[0].value == number and record.warnings == []


@pytest.mark.parametrize(("value", "expected"), [
    ("<^2.22", {"valueQuantity": {"value": 2.22, "comparator": "<"}}),
    (">=^10", {"valueQuantity": {"value": 10, "comparator": ">="}}),
    ("=^7", {"valueQuantity": {"value": 7}}),
    ("^10^-^20", {"valueRange": {"low": {"value": 10}, "high": {"value": 20}}}),
    ("^1^:^128", {"valueRatio": {"numerator": {"value": 1}, "denominator": {"value": 128}}}),
    ("^2^+", {"valueString": "2+"}),
])
def test_structured_numeric(value: str, expected: dict[str, Any]) -> None:
    text = oru(f"OBX|1|SN|5195-3^Titer^LN||{value}||||||F")
    [obs] = resources_of(text, "Observation")
    assert {k: v for k, v in obs.items() if k.startswith("value")} == expected
    validate_r4(obs)
    assert one_record(text).warnings == []


# --- value types: where each goes ----------------------------------------------------------------


def test_tx_and_ft_results_reach_the_record_as_note_text() -> None:
    text = oru(
        nm(1),
        "OBX|2|TX|48767-8^Annotation comment^LN||Specimen received \\T\\ processed.~"
        "Repeat screen advised.||||||F",
        "OBX|3|TX|48767-8^Annotation comment^LN||Call the clinic.||||||F",
        "OBX|4|FT|8251-1^Service comment^LN||Formatted\\.br\\text||||||F",
    )
    record = one_record(text)
    assert [n.text for n in record.notes] == [
        "Specimen received & processed.\nRepeat screen advised.\nCall the clinic.",
        "Formatted\ntext",
    ]
    assert [n.type for n in record.notes] == ["48767-8", "8251-1"]
    assert {n.time for n in record.notes} == {OBR7_UTC}
    assert record.warnings == []


@pytest.mark.parametrize(("kind", "value"), [
    ("XTN", "^WPN^PH^^1^555^5550100"),
    ("RP", "http://images.example/abc^IMAGE^JPEG"),
    ("ED", "^AP^PDF^Base64^JVBERi0xLjQ="),
    ("XCN", "1234^Smith^Pat"),
])
def test_types_without_a_home_are_dropped_with_a_warning(kind: str, value: str) -> None:
    text = oru(nm(1), f"OBX|2|{kind}|18706-8^Contact^LN||{value}||||||F")
    record = one_record(text)
    assert len(record.observations) == 1 and record.notes == []
    [warning] = record.warnings
    assert where(warning) == ("OBX", 2, 2) and warning.code == "not-supported"
    assert f"OBX-2 {kind}" in warning.diagnostics and "not kept" in warning.diagnostics
    assert "555" not in warning.diagnostics and "Smith" not in warning.diagnostics
    ack = build_ack(text, "AA", record.warnings)
    [err] = [s for s in ack.split("\r") if s.startswith("ERR|")]
    assert err.split("|")[2:5] == ["OBX^2^2", "103^Table value not found^HL70357", "W"]


def test_an_ed_without_data_carries_nothing_and_is_not_warned() -> None:
    record = one_record(oru(nm(1), "OBX|2|ED|11502-2^Report^LN||^AP^PDF^Base64^||||||F"))
    assert len(record.observations) == 1 and record.notes == [] and record.warnings == []


def test_xtn_warning_says_contact_data() -> None:
    text = oru(nm(1), "OBX|2|XTN|18706-8^Contact^LN||^WPN^PH^^1^555^5550100||||||F")
    [warning] = one_record(text).warnings
    assert "telecom" in warning.diagnostics and "not a clinical result" in warning.diagnostics


def test_coded_string_and_untyped_results() -> None:
    text = oru(
        "OBX|1|CWE|29463-7^Screen result^LN||LA6576-8^Positive^LN||||||F",
        "OBX|2|ST|33882-2^Collection note^LN||hemolysed||||||F",
        "OBX|3||33882-2^Collection note^LN||no type given||||||F",
        "OBX|4||33882-2^Collection note^LN||||||||F",  # no type, no value: nothing sent
    )
    record = one_record(text)
    assert [o.value for o in record.observations] == ["LA6576-8", "hemolysed", "no type given"]
    assert [where(w) for w in record.warnings] == [("OBX", 3, 2)]
    obs = resources_of(text, "Observation")
    assert obs[0]["valueCodeableConcept"]["coding"][0]["code"] == "LA6576-8"


def test_ed_in_a_txa_document_that_is_not_base64_is_warned() -> None:
    pdf = base64.b64encode(b"%PDF-1.4").decode()
    text = "\r".join([
        "MSH|^~\\&|DOC|HOSP|CLINFUSE|HOSP|20240101120000||MDM^T02^MDM_T02|DOC1|P|2.5.1",
        "PID|1||M5^^^HOSP^MR||Doe^Jo||19800101|M",
        "TXA|1|DS|TX|20240107",
        "OBX|1|TX|11506-3^Note^LN||Text line||||||F",
        f"OBX|2|ED|11506-3^Note^LN||^AP^PDF^Base64^{pdf}||||||F",
        "OBX|3|ED|11506-3^Note^LN||^AP^PDF^Hex^255044||||||F",
        "OBX|4|NM|8302-2^Height^LN||170|cm|||||F",
    ]) + "\r"
    [doc] = resources_of(text, "DocumentReference")
    assert [c["attachment"]["contentType"] for c in doc["content"]] == [
        "text/plain; charset=utf-8", "application/pdf"]
    record = one_record(text)
    assert [where(w) for w in record.warnings] == [("OBX", 3, 5), ("OBX", 4, 2)]


# --- wrapped lines -----------------------------------------------------------------------------


@pytest.mark.parametrize("sep", ["\n", "\r\n"])
def test_a_field_wrapped_onto_a_new_line_in_an_lf_file_parses(sep: str) -> None:
    text = oru(nm(1), nm(2), sep=sep).replace(
        "Newborn screening panel", f"Newborn screening{sep}panel, second tier")
    [message] = read_messages(text)
    obr = message.text.split("\r")[2]
    assert obr.split("|")[4] == "57128-1^Newborn screening panel, second tier^LN"
    [warning] = message.warnings
    assert where(warning) == ("OBR", 1, 4) and "line 4" in warning.diagnostics
    record = one_record(text)
    assert len(record.observations) == 2
    assert [where(w) for w in record.warnings] == [("OBR", 1, 4)]
    assert disagreements(message.text) == []
    assert records_from_hl7(text, parser="hl7apy")[0] == record


def test_a_wrapped_result_text_and_a_break_at_a_field_boundary() -> None:
    text = oru(
        "OBX|1|TX|48767-8^Comment^LN||Repeat the screen",
        "after 24 hours of feeding.||||||F",
        "OBX|2|NM|46002-1^Analyte^LN||3.1|",
        "umol/L^^UCUM|||||F",
        sep="\n",
    )
    record = one_record(text)
    assert record.notes[0].text == "Repeat the screen after 24 hours of feeding."
    assert (record.observations[0].value, record.observations[0].unit) == (3.1, "umol/L")
    assert [where(w) for w in record.warnings] == [("OBX", 1, 5), ("OBX", 2, 6)]


def test_cr_separated_file_with_lf_inside_a_field_is_joined_too() -> None:
    text = oru("OBX|1|TX|48767-8^Comment^LN||First part\nsecond part||||||F")
    record = one_record(text)
    assert record.notes[0].text == "First part second part"
    assert [where(w) for w in record.warnings] == [("OBX", 1, 5)]


def test_a_bare_word_line_is_text_but_a_bare_known_segment_id_is_a_segment() -> None:
    word = oru("OBX|1|TX|48767-8^Comment^LN||Sent to", "ABC", "for review||||||F", sep="\n")
    assert one_record(word).notes[0].text == "Sent to ABC for review"
    bare = oru(nm(1), "NTE", nm(2), sep="\n")
    [message] = read_messages(bare)
    assert message.text.split("\r")[4] == "NTE" and message.warnings == ()


def test_text_before_msh_and_wrapped_batch_headers() -> None:
    with pytest.raises(Exception, match="line 1 comes before any MSH"):
        split_messages("hello\n" + oru(nm(1), sep="\n"))
    batch = "FHS|^~\\&|LAB\nwrapped header text\n" + oru(nm(1), sep="\n") + "FTS|1\n"
    [message] = read_messages(batch)
    assert message.text.startswith("MSH|") and message.warnings == ()


# --- per message, per patient --------------------------------------------------------------------


def test_warnings_go_to_the_record_of_their_message_and_patient() -> None:
    first = oru(nm(1), control="M1")
    second = oru(nm(1, when=IMPOSSIBLE), control="M2") + (
        "PID|2||OTHER9^^^HOSP^MR||Roe^Al||19700101|M\r"
        "OBX|2|XTN|18706-8^Contact^LN||^WPN^PH^^1^555^5550100||||||F\r")
    records = records_from_hl7(first + second)
    assert [r.warnings for r in records[:1]] == [[]]
    newborn, other = records[1:]
    assert [where(w) for w in newborn.warnings] == [("OBX", 1, 14)]
    assert [where(w) for w in other.warnings] == [("OBX", 2, 2)]
    assert newborn.warnings[0].diagnostics.startswith("message 2: OBX-14")
    mapped = map_hl7(first + second)
    assert isinstance(mapped[1], MappedMessage) and len(mapped[1].warnings) == 2


def test_ack_for_v2_3_puts_warnings_in_err_1() -> None:
    text = oru(nm(1, when=IMPOSSIBLE), version="2.3")
    record = one_record(text)
    ack = build_ack(text, "AA", record.warnings, control_id="A1")
    assert ack.split("\r")[1:] == ["MSA|AA|NBS1", "ERR|OBX^1^14^102&Data type error&HL70357"]


def test_a_file_with_one_unreadable_message_keeps_the_other_and_notes_it(tmp_path: Any) -> None:
    from fhir_adapters.sources import read_file_result

    path = tmp_path / "feed.hl7"
    unreadable = oru(nm(1), version="9.9", control="NBS2")
    path.write_text((oru(nm(1, when=IMPOSSIBLE)) + unreadable).replace("\r", "\n"))
    result = read_file_result(path)
    assert result.error is None
    assert [r.key.value for r in result.records if r.key] == [MRN]
    assert [w.where() for w in result.records[0].warnings] == ["OBX[1]-14"]
    assert [(n.where(), n.severity) for n in result.notices] == [("MSH[1]-12", "warning")]
    assert "message 2" in result.notices[0].diagnostics

    strict = read_file_result(path, strict=True)
    assert strict.records == [] and strict.error is not None
    assert {i.where() for i in strict.error.issues} == {"MSH[1]-12", "OBX[1]-14"}
