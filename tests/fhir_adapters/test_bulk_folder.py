"""Folders and bulk exports as hospitals send them: file by file, element by element.

A bulk-data client's folder holds NDJSON per resource type (some gzipped), the client's own
``log.ndjson``, a README, Finder's ``.DS_Store`` and empty files. The patient files are read
and linked; the others are skipped with the reason; a bad line or resource drops only itself,
with a warning naming the file and line (or Bundle entry) and never a patient's value.
"""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.bounded_gzip import gunzip_bounded
from fhir_adapters.errors import IngestError, NotPatientData
from fhir_adapters.fhir_json import records_from_json
from fhir_adapters.fhir_lenient import read_document, read_ndjson
from fhir_adapters.sources import read_file, read_sources
from tests.fhir_adapters.bulk_export import (
    PATIENTS,
    SECRET_NAME,
    client_log,
    condition,
    export_folder,
    ndjson,
    observation,
    patient,
)
from tests.shared_data import shared_data_dir

PID = "urn:uuid:22222222-2222-4222-8222-222222222222"

def _reasons(report: Any) -> dict[str, str]:
    return {Path(e.source).name: e.issues[0].diagnostics for e in report.skipped}


def _no_secret(texts: list[str]) -> None:
    for text in texts:
        assert SECRET_NAME not in text


# --------------------------------------------------------------------------- folders


def test_bulk_folder_with_a_client_log_gives_every_patient_and_names_what_it_skipped(
        tmp_path: Path) -> None:
    report = read_sources([export_folder(tmp_path / "export")])
    assert report.rejected == []
    assert len(report.records) == PATIENTS
    for record in report.records:
        # Linked across files: each Observation, Condition and note found its Patient.
        i = int(record.resource_id.removeprefix("p"))  # type: ignore[union-attr]
        assert str(record.key) == f"urn:mrn|MRN{i:03d}"
        assert [o.value for o in record.observations] == [5.0 + i]
        assert [c.code for c in record.conditions] == ["44054006"]
        assert [n.text for n in record.notes] == [f"Seen in clinic, visit {i}."]
        assert record.warnings == []
    reasons = _reasons(report)
    assert set(reasons) == {"log.ndjson", "README.md", ".DS_Store", "Encounter.ndjson"}
    assert "bulk-data client's log" in reasons["log.ndjson"]
    assert "hidden file" in reasons[".DS_Store"]
    assert "empty file" in reasons["Encounter.ndjson"]
    assert "not a FHIR JSON, NDJSON or HL7 v2 file" in reasons["README.md"]
    assert report.files_read == 4
    assert report.warnings == []


def test_non_fhir_json_and_ndjson_are_skipped_not_rejected(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text(json.dumps({"name": "hl7.fhir.r4.examples"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "metrics.ndjson").write_text('{"cpu": 1}\n{"cpu": 2}\n')
    (tmp_path / "Patient.json").write_text(json.dumps(patient(1)))
    report = read_sources([tmp_path])
    assert [str(r.key) for r in report.records] == ["urn:mrn|MRN001"]
    assert report.rejected == []
    reasons = _reasons(report)
    assert reasons["package.json"] == ("JSON that is not FHIR: the top-level object has no "
                                       "resourceType")
    assert reasons["list.json"] == "JSON that is not FHIR: the document is an array, not a resource"
    assert reasons["metrics.ndjson"] == "NDJSON that is not FHIR: no line has a resourceType"


def test_bad_lines_drop_only_themselves_with_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "Patient.ndjson").write_text(ndjson([patient(1), patient(2)]))
    lines = [json.dumps(observation(1)), '{"resourceType": "Observation", "status": ' + SECRET_NAME,
             "[1, 2]", json.dumps({"resourceType": "Obsrevation", "id": "x"}),
             json.dumps(observation(2)), json.dumps({"note": SECRET_NAME})]
    (folder / "Observation.ndjson").write_text("\n".join(lines) + "\n")
    report = read_sources([folder])
    assert report.rejected == [] and report.skipped == []
    by_id = {r.resource_id: r for r in report.records}
    assert [o.value for o in by_id["p1"].observations] == [6.0]
    assert [o.value for o in by_id["p2"].observations] == [7.0]
    where = str(folder / "Observation.ndjson")
    assert [w.diagnostics.split(":")[0].split(",")[0] for w in report.notices] == [
        f"{where} line {n}" for n in (2, 3, 4, 6)]
    assert all(w.severity == "warning" and w.diagnostics.endswith("the line was dropped")
               for w in report.notices)
    assert "malformed JSON" in report.notices[0].diagnostics
    assert "got an array" in report.notices[1].diagnostics
    assert "did you mean 'Observation'?" in report.notices[2].diagnostics
    assert "no resourceType" in report.notices[3].diagnostics
    _no_secret([w.diagnostics for w in report.warnings])


def test_a_bad_resource_is_dropped_and_a_bad_time_is_nulled_on_itspatient(
        tmp_path: Path) -> None:
    bad_value = observation(1, id="bad", valueQuantity={"value": SECRET_NAME})
    # Feb 29 of a non-leap year: the time is nulled, the result kept, issued stands in.
    leap = observation(1, id="leap", effectiveDateTime="2017-02-29T12:52:00-05:00",
                issued="2017-03-01T10:00:00Z")
    future = condition(1) | {"onsetDateTime": "2999-01-01"}
    text = ndjson([patient(1), observation(1), bad_value, leap, future])
    path = tmp_path / "mixed.ndjson"
    path.write_text(text)
    [record] = read_file(path)
    assert [(o.value, o.effective) for o in record.observations] == [
        (6.0, datetime(2019, 1, 1, 8, tzinfo=UTC)), (6.0, datetime(2017, 3, 1, 10, tzinfo=UTC))]
    assert [c.onset for c in record.conditions] == [None]
    assert [(w.expression, w.diagnostics.rsplit("; ", 1)[1]) for w in record.warnings] == [
        ("Observation.valueQuantity.value", "the resource was dropped"),
        ("Observation.effectiveDateTime", "ignored, read as absent"),
        ("Condition.onsetDateTime", "ignored, read as absent")]
    assert record.warnings[0].diagnostics.startswith(f"{path} line 3, ")
    assert record.warnings[1].diagnostics.startswith(f"{path} line 4, ")
    _no_secret([w.diagnostics for w in record.warnings])
    assert "2017-02-29" not in " ".join(w.diagnostics for w in record.warnings)
    # The warnings travel with the record's JSON (clinfuse records prints them).
    assert [w["expression"] for w in record.to_json()["warnings"]] == [
        w.expression for w in record.warnings]


def test_a_bad_resource_in_a_bundle_is_dropped_with_its_entry_index(tmp_path: Path) -> None:
    obs = {k: v for k, v in observation(1).items() if k != "id"} | {"subject": {"reference": PID}}
    no_code = {k: v for k, v in obs.items() if k != "code"}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": PID, "resource": patient(1)},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001", "resource": obs},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000002", "resource": no_code},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000003",
         "resource": {"name": SECRET_NAME}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000004",
         "resource": obs | {"subject": {"reference": "urn:uuid:nowhere"}}},
    ]}
    read = read_document(json.dumps(bundle), "export.json")
    [record] = read.records
    assert len(record.observations) == 1
    assert [w.expression for w in record.warnings] == ["Bundle.entry[2].resource.code"]
    assert record.warnings[0].diagnostics == (
        "export.json, Bundle.entry[2].resource.code: Observation.code is required (R4 1..) "
        "and missing; the resource was dropped")
    # Neither the non-resource entry nor the Observation of no known patient is anyone's.
    assert [w.expression for w in read.notices] == [
        "Bundle.entry[3].resource.resourceType", "Bundle.entry[4].resource.subject.reference"]
    assert read.notices[0].diagnostics.endswith("the entry was dropped")
    _no_secret([w.diagnostics for w in read.warnings])


def test_strict_keeps_all_or_nothing(tmp_path: Path) -> None:
    folder = export_folder(tmp_path / "export")
    with (folder / "Condition.ndjson").open("a") as f:
        f.write("{not json\n")
    lenient = read_sources([folder])
    assert len(lenient.records) == PATIENTS and lenient.rejected == []
    [notice] = lenient.notices
    assert notice.diagnostics.startswith(f"{folder / 'Condition.ndjson'} line {PATIENTS + 1}: ")
    strict = read_sources([folder], strict=True)
    assert strict.records == []
    [error] = strict.rejected
    assert error.source == str(folder)
    assert f"Condition.ndjson line {PATIENTS + 1}" in str(error)
    # Files that are not patient data are still skipped, not counted as drops.
    assert "log.ndjson" in _reasons(strict)
    assert strict.exit_code(strict=True) == 1 and lenient.exit_code(strict=True) == 0


def test_a_file_with_nothing_usable_is_rejected_and_the_others_read(tmp_path: Path) -> None:
    (tmp_path / "a.ndjson").write_text("{oops\n[]\n")
    (tmp_path / "b.json").write_text('{"resourceType": "Patient", "birthDate": ')
    (tmp_path / "c.json").write_text(json.dumps(patient(3)))
    report = read_sources([tmp_path / "a.ndjson", tmp_path / "b.json", tmp_path / "c.json"])
    assert [str(r.key) for r in report.records] == ["urn:mrn|MRN003"]
    assert [Path(e.source or "").name for e in report.rejected] == ["a.ndjson", "b.json"]
    assert "line 1" in str(report.rejected[0]) and "line 2" in str(report.rejected[0])
    assert "malformed JSON at line 1" in str(report.rejected[1])


# --------------------------------------------------------------------------- gzip


def test_gzipped_ndjson_and_json_files_are_read(tmp_path: Path) -> None:
    lines = tmp_path / "Patient.ndjson.gz"
    lines.write_bytes(gzip.compress(ndjson([patient(1), observation(1)]).encode()))
    single = tmp_path / "patient.json.gz"
    single.write_bytes(gzip.compress(json.dumps(patient(2)).encode()))
    [a] = read_file(lines)
    [b] = read_file(single)
    assert (str(a.key), len(a.observations)) == ("urn:mrn|MRN001", 1)
    assert str(b.key) == "urn:mrn|MRN002"


def test_a_gzip_bomb_is_refused_with_a_located_error(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "Patient.ndjson").write_text(ndjson([patient(1)]))
    # 16 MiB of one repeated line packs into a few KiB.
    line = (json.dumps(observation(1)) + "\n").encode()
    bomb = gzip.compress(line * ((16 << 20) // len(line)), compresslevel=9)
    assert len(bomb) < 1 << 20
    (folder / "Observation.ndjson.gz").write_bytes(bomb)
    report = read_sources([folder], max_decompressed=1 << 20)
    [error] = report.rejected
    assert error.source == str(folder / "Observation.ndjson.gz")
    assert error.issues[0].code == "too-long"
    assert "more than 1 MiB (the cap)" in str(error) and "gzip bomb" in str(error)
    [record] = report.records  # the rest of the folder is still read
    assert str(record.key) == "urn:mrn|MRN001"


@pytest.mark.parametrize("data, phrase", [
    (gzip.compress(b'{"resourceType": "Patient"}\n')[:-12], "truncated gzip"),
    (b"\x1f\x8b\x08\x00" + bytes(20), "not valid gzip"),
])
def test_corrupt_gzip_is_rejected_in_one_line(data: bytes, phrase: str) -> None:
    with pytest.raises(IngestError, match=phrase):
        gunzip_bounded(data, "x.ndjson.gz")


def test_a_gzipped_client_log_is_still_just_a_log(tmp_path: Path) -> None:
    (tmp_path / "log.ndjson.gz").write_bytes(gzip.compress(client_log().encode()))
    report = read_sources([tmp_path])
    assert report.records == [] and report.rejected == []
    assert "bulk-data client's log" in _reasons(report)["log.ndjson.gz"]
    assert report.exit_code() == 1


# --------------------------------------------------------------------------- the store's view


def test_drop_nullable_drops_the_line_and_what_belongs_to_itspatient() -> None:
    # A store keeps resources as sent, so a Patient with an impossible birthDate goes, and
    # its Observation with it, rather than hang off a patient known only by reference.
    text = ndjson([patient(1) | {"birthDate": "1950-02-30"}, observation(1), patient(2),
                   observation(2)])
    read = read_ndjson({"": text}, drop_nullable=True, require_patients=False)
    assert [(line, r["id"]) for _, line, r in read.kept] == [(3, "p2"), (4, "o2")]
    assert [w.diagnostics for w in read.warnings] == [
        "line 1, Patient.birthDate: is not a valid FHIR date; the resource was dropped",
        "line 2, Observation.subject: its subject was dropped; the resource was dropped"]


def test_nothing_but_organizations_is_not_patient_data() -> None:
    org = {"resourceType": "Organization", "id": "o", "name": "General"}
    with pytest.raises(NotPatientData, match="Organization"):
        read_ndjson({"Organization.ndjson": ndjson([org])})
    assert read_ndjson({"": ndjson([org])}, require_patients=False).kept[0][1] == 1


# --------------------------------------------------------------------------- shared real data


def test_real_files_read_element_by_element_as_the_all_or_nothing_reader_does() -> None:
    # Good data loses nothing to the element-by-element reader, and gains no warning.
    paths = sorted(shared_data_dir("fhir/synthea_r4_bundles").glob("[A-Z]*_*.json"))
    assert len(paths) == 10
    for path in paths:
        data = path.read_bytes()
        read = read_document(data, path.name)
        assert read.records == records_from_json(data), path.name
        assert read.warnings == []
    report = read_sources([shared_data_dir("fhir/hl7_r4_official_examples")])
    assert report.rejected == [] and report.warnings == []
    assert "package.json" in _reasons(report)  # the package manifest: JSON, not FHIR
    assert len(report.skipped) == 14
