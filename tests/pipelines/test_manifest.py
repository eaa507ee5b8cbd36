"""Cohort manifest reading and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.manifest import ManifestError, read_manifest


def write(tmp_path: Path, text: str, sidecar: str | None = None, name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    if sidecar is not None:
        path.with_suffix(".yaml").write_text(sidecar)
    return path


def test_reads_modalities_and_sidecar(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "n1.txt").write_text("Denies chest pain.")
    path = write(tmp_path,
                 "patient_id,label,index_time,image,note,note_path,sex,lactate,ward\n"
                 "p1,1,2026-01-01T00:00:00Z,img/a.png,Short of breath.,,F,4.1,ICU-A\n"
                 "p2,0,,,,n1.txt,M,,ward-3\n",
                 "sensitive: [sex]\ncategorical: [ward]\noutcome: {name: deterioration}\n")
    m = read_manifest(path)
    assert list(m.frame["example_id"]) == ["0", "1"]
    assert m.feature_columns == ["lactate", "ward"]
    assert m.image_paths() == [tmp_path / "img" / "a.png", None]
    assert m.notes() == ["Short of breath.", "Denies chest pain."]
    assert m.outcome == {"name": "deterioration"}
    present = m.modalities_present()
    assert present["image"].tolist() == [True, False]
    assert present["ehr"].tolist() == [True, True]
    assert read_manifest(path, include_sensitive=True).feature_columns == ["sex", "lactate",
                                                                          "ward"]
    with pytest.raises(ManifestError, match="'sex' has non-numeric values"):
        read_manifest(path, sensitive=[])


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pd.DataFrame({"patient_id": ["a", "b"], "label": [0, 1], "x": [1.0, None]}).to_parquet(path)
    assert read_manifest(path).feature_columns == ["x"]


@pytest.mark.parametrize(("text", "message"), [
    ("patient_id,x\np1,1\n", r"missing required column\(s\) \['label'\]"),
    ("patient_id,label\np1,2\np2,1\n", r"'label' must be 0 or 1; line\(s\) 2 "),
    ("patient_id,label,index_time\np1,1,yesterday\n", "not an ISO 8601 time on line"),
    ("patient_id,label,image\np1,1,missing.dcm\n", "files that don't exist on line"),
    ("example_id,patient_id,label\ne,p1,1\ne,p2,0\n", "duplicate example_id on line"),
    ("patient_id,label,lab\np1,1,high\n", "non-numeric values on line"),
    ("", "not a readable"),
])
def test_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(write(tmp_path, text))
    for value in ("yesterday", "high", "missing.dcm"):
        assert value not in str(info.value)


def test_tolerant_reading_drops_bad_rows_and_nulls_bad_cells_with_located_warnings(
        tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    path = write(tmp_path,
                 "example_id,patient_id,label,index_time,image,lactate\n"
                 "e1,p1,1,2026-01-01T00:00:00Z,a.png,4.1\n"     # line 2: clean
                 "e2,p2,2,2026-01-01T00:00:00Z,,1.0\n"          # 3: label 2 -> dropped
                 "e3,p3,0,yesterday,,1.0\n"                     # 4: bad time -> dropped
                 "e1,p4,0,2026-01-02T00:00:00Z,,1.0\n"          # 5: repeated id -> dropped
                 ",,1,2026-01-02T00:00:00Z,,1.0\n"              # 6: blank patient -> dropped
                 "e6,p6,0,2026-01-03T00:00:00Z,gone.png,high\n"  # 7: two cells nulled
                 "e7,p7,1,2026-01-03T00:00:00Z,a.png,2.5\n")    # 8: clean
    m = read_manifest(path, strict=False)
    assert m.frame["patient_id"].tolist() == ["p1", "p6", "p7"]
    assert m.lines == [2, 7, 8] and m.line_of(1) == 7
    assert m.image_paths() == [tmp_path / "a.png", None, tmp_path / "a.png"]
    assert np.isnan(m.frame["lactate"].iloc[1]) and m.frame["lactate"].iloc[2] == 2.5
    assert [(w.severity, w.expression) for w in m.warnings] == [
        ("warning", "line 6, column 'patient_id'"), ("warning", "line 3, column 'label'"),
        ("warning", "line 4, column 'index_time'"), ("warning", "line 5, column 'example_id'"),
        ("warning", "line 7, column 'lactate'"), ("warning", "line 7, column 'image'")]
    assert m.warnings[1].diagnostics == (f"{path}: line 3, column 'label': not 0 or 1; the "
                                         "row is dropped")
    text = " ".join(w.diagnostics for w in m.warnings)
    for value in ("yesterday", "high", "gone.png", "p2", "p3"):
        assert value not in text
    with pytest.raises(ManifestError, match=r"duplicate example_id on line\(s\) 5"):
        read_manifest(path)  # strict, the library default: refused as before


@pytest.mark.parametrize(("text", "message"), [
    ("patient_id,x\np1,1\n", r"missing required column\(s\) \['label'\]"),
    ("patient_id,label\np1,2\np2,x\n", r"no usable row \(2 problem\(s\); first: line 2, "
     r"column 'label': not 0 or 1; the row is dropped\)"),
    ("patient_id,label,lab\np1,1,high\n", "non-numeric values on line"),  # all text
])
def test_tolerant_reading_still_refuses_an_unusable_manifest(tmp_path: Path, text: str,
                                                            message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        read_manifest(write(tmp_path, text), strict=False)
