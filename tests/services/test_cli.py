"""The command line as a user runs it: exit codes, stdout and stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main
from tests.fhir_adapters.bulk_export import (
    PATIENTS,
    SECRET_NAME,
    export_folder,
    ndjson,
    observation,
    patient,
)
from tests.shared_data import shared_data_dir


def clinfuse(*args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from services.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2],
                          env={**os.environ, **env} if env else None)


def test_records_prints_one_json_line_per_patient() -> None:
    folder = shared_data_dir("fhir") / "synthea_r4_bundles"
    result = clinfuse("records", str(folder))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 10
    assert all(line["key"]["system"] for line in lines)
    assert "skipped" in result.stderr and "hospitalInformation" in result.stderr
    assert "10 patient record(s)" in result.stderr


def test_records_as_of_hides_later_data() -> None:
    path = next((shared_data_dir("fhir") / "synthea_r4_bundles").glob("Agust*.json"))
    full = json.loads(clinfuse("records", str(path)).stdout)
    early = json.loads(clinfuse("records", str(path), "--as-of", "1990-01-01").stdout)
    assert len(early["observations"]) < len(full["observations"])
    assert early["index_time"].startswith("1990-01-01")


def test_records_rejects_bad_json_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"resourceType": "Patient", "birthDate": ')
    result = clinfuse("records", str(bad))
    assert result.returncode == 1
    assert "rejected" in result.stderr and "bad.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_records_of_hl7_junk_is_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.hl7"
    junk.write_bytes(bytes(range(256)) * 4)
    result = clinfuse("records", str(junk))
    assert result.returncode == 1 and "Traceback" not in result.stderr


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``clinfuse ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def test_records_on_a_bulk_folder_with_a_client_log(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = export_folder(tmp_path / "export")
    code, out, err = run_in_process(capsys, "records", str(folder))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]  # stdout is only JSON lines
    assert len(lines) == PATIENTS
    assert sorted(line["key"]["value"] for line in lines) == [
        f"MRN{i:03d}" for i in range(1, PATIENTS + 1)]
    assert all(line["warnings"] == [] and len(line["observations"]) == 1 for line in lines)
    skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert [line.split(": ")[1] for line in skipped] == [
        str(folder / name) for name in (".DS_Store", "Encounter.ndjson", "README.md",
                                        "log.ndjson")]
    assert skipped[-1].startswith(f"skipped: {folder / 'log.ndjson'}: a bulk-data client's "
                                  "log (exportId/eventId events), not FHIR resources")
    assert err.splitlines()[-1] == (
        f"{PATIENTS} patient record(s) from 4 file(s) read; 4 file(s) skipped as not patient "
        "data, 0 rejected; 0 warning(s)")


def test_records_warnings_go_to_stderr_and_with_the_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "export.ndjson"
    bad = observation(1, valueQuantity={"value": SECRET_NAME})
    path.write_text(ndjson([patient(1), observation(1), bad]) + '{"resourceType": "Pat\n')
    code, out, err = run_in_process(capsys, "records", str(path))
    assert code == 0
    [record] = [json.loads(line) for line in out.splitlines()]
    assert [w["diagnostics"] for w in record["warnings"]] == [
        f"{path} line 3, Observation.valueQuantity.value: must be a decimal (a JSON number); "
        "the resource was dropped"]
    assert err.splitlines() == [
        f"warning: {path} line 3, Observation.valueQuantity.value: must be a decimal (a JSON "
        "number); the resource was dropped",
        f"warning: {path} line 4: malformed JSON at line 1, column 18: Unterminated string "
        "starting at; the line was dropped",
        "1 patient record(s) from 1 file(s) read; 0 file(s) skipped as not patient data, "
        "0 rejected; 2 warning(s)"]
    assert SECRET_NAME not in out + err


def test_records_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = export_folder(tmp_path / "export")
    nothing = [str(folder / name) for name in ("log.ndjson", "README.md", "Encounter.ndjson")]
    code, out, err = run_in_process(capsys, "records", *nothing)
    assert (code, out) == (1, "")
    assert err.count("skipped: ") == 3
    broken = tmp_path / "broken.json"
    broken.write_text('{"resourceType": "Bundle", "type": "history", "entry": []}')
    good = str(folder / "Patient.ndjson")
    code, out, err = run_in_process(capsys, "records", good, str(broken))
    assert code == 0 and len(out.splitlines()) == PATIENTS
    assert f"rejected: {broken}: Bundle.type 'history' is not ingested" in err
    code, out, err = run_in_process(capsys, "records", "--strict", good, str(broken))
    assert code == 3 and len(out.splitlines()) == PATIENTS
    assert f"rejected: {broken}" in err
    code, out, _ = run_in_process(capsys, "records", "--help")
    assert code == 0 and "  3  --strict: records were produced, but a file was rejected" in out


def test_dicom2nifti_refusal_exits_nonzero_with_reason(tmp_path: Path) -> None:
    series = shared_data_dir("dicom") / "dicom2nifti_testdata" / "failing" / "gantrytilting"
    result = clinfuse("dicom2nifti", str(series / "001"), str(tmp_path / "out.nii.gz"))
    assert result.returncode != 0
    assert "gantry tilt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.nii.gz").exists()


def test_synth_prints_oracle_aurocs(tmp_path: Path) -> None:
    result = clinfuse("synth", "--patients", "40", "--out", str(tmp_path / "c"), "--seed", "3",
                      "--slices", "8", "--size", "32", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "Bayes-optimal AUROC" in result.stdout and "oracle AUROC" in result.stdout
    assert (tmp_path / "c" / "manifest.csv").exists()


@pytest.mark.parametrize("args", [["synth", "--patients", "0", "--out", "x"],
                                  ["records"], ["nonsense"]])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    result = clinfuse(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_serve_refuses_a_missing_or_tampered_model_in_one_line(tmp_path: Path) -> None:
    from models.artifact import generate_signing_key

    key = tmp_path / "k.pem"
    generate_signing_key(key)
    env = {"CLINFUSE_DATA_DIR": str(tmp_path / "data"),
           "CLINFUSE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    missing = clinfuse("serve", "--port", "1", "--model", str(tmp_path / "nope"),
                      "--trusted-key", f"{key}.pub", env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"clinfuse serve: cannot start: model artifact {tmp_path / 'nope'} does not exist; fix "
        "CLINFUSE_MODEL_PATH or unset it to run without predictions"]
    fake = tmp_path / "fake-model"
    fake.mkdir()
    (fake / "MANIFEST.json").write_text("{}")
    corrupt = clinfuse("serve", "--port", "1", "--model", str(fake), "--trusted-key",
                      f"{key}.pub", env=env)
    assert corrupt.returncode == 2
    assert "cannot start: model artifact" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr
