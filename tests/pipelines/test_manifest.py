"""Cohort manifest reading and its errors."""

from __future__ import annotations

from pathlib import Path

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
