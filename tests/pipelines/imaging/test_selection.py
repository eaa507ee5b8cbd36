"""Series selection rules: planes, ranges, combinations, round trips, the CLI table."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset

from pipelines.imaging.selection import (
    AllOf,
    AnyOf,
    MinSlices,
    ModalityIs,
    Plane,
    SeriesInfo,
    SliceThicknessIn,
    acquisition_plane,
    load_rules,
    main_series,
    matching_rules,
    rule_from_dict,
    rules_from_dict,
    rules_to_dict,
    series_info,
)
from pipelines.imaging.volume import ImageError
from tests.shared_data import shared_data_dir

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

RULES = {
    "ct_chest_axial": {"all": [
        {"modality": "CT"}, {"body_part": ["CHEST", "THORAX"]}, {"plane": "axial"},
        {"slice_thickness": {"min": 0.5, "max": 3.0}}, {"min_slices": 40}]},
    "mr_or_pet": {"any": [{"modality": "mr"}, {"modality": "PT"}]},
    "not_sagittal_thin": {"not": {"any": [{"plane": "sagittal"},
                                          {"slice_thickness": {"min": 5}}]}},
    "implicit_and": {"modality": "CT", "min_slices": 10},
}


def _info(**kw: object) -> SeriesInfo:
    base: dict[str, object] = dict(SeriesInstanceUID="1.2.3", Modality="CT",
                                   BodyPartExamined="CHEST", ImageOrientationPatient=AXIAL,
                                   SliceThickness=1.25, n_instances=120, n_slices=120)
    base.update(kw)
    return SeriesInfo(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("iop", "plane"), [
    (AXIAL, Plane.AXIAL), (CORONAL, Plane.CORONAL), (SAGITTAL, Plane.SAGITTAL),
    # 20 degrees oblique axial stays axial.
    ((1.0, 0.0, 0.0, 0.0, 0.9397, -0.342), Plane.AXIAL),
    (None, None), ((1, 0, 0, 1, 0, 0), None), ((1, 0, 0), None)])
def test_acquisition_plane(iop: tuple[float, ...] | None, plane: Plane | None) -> None:
    assert acquisition_plane(iop) == plane


def test_rules_match_as_declared() -> None:
    rules = rules_from_dict(RULES)
    assert matching_rules(_info(), rules) == ["ct_chest_axial", "not_sagittal_thin",
                                              "implicit_and"]
    assert matching_rules(_info(BodyPartExamined="thorax"), rules)[0] == "ct_chest_axial"
    assert "ct_chest_axial" not in matching_rules(_info(SliceThickness=5.0), rules)
    assert "ct_chest_axial" not in matching_rules(_info(n_slices=39), rules)
    assert "ct_chest_axial" not in matching_rules(_info(ImageOrientationPatient=CORONAL),
                                                  rules)
    assert matching_rules(_info(Modality="MR", ImageOrientationPatient=SAGITTAL), rules) == \
        ["mr_or_pet"]
    # Missing attributes never match by accident.
    missing = _info(BodyPartExamined=None, SliceThickness=None, ImageOrientationPatient=None)
    assert matching_rules(missing, rules) == ["not_sagittal_thin", "implicit_and"]


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    rules = rules_from_dict(RULES)
    text = yaml.safe_dump({"model": "x", "series_selection": rules_to_dict(rules)})
    path = tmp_path / "model.yaml"
    path.write_text(text)
    loaded = load_rules(path)
    assert loaded == rules
    assert rules_to_dict(loaded) == rules_to_dict(rules)
    assert isinstance(loaded["implicit_and"], AllOf)
    assert isinstance(loaded["mr_or_pet"], AnyOf)


@pytest.mark.parametrize(("bad", "match"), [
    ({"modalty": "CT"}, "unknown rule key 'modalty'"),
    ({"plane": "oblique"}, "plane must be among"),
    ({"slice_thickness": {"min": 3, "max": 1}}, "exceeds max"),
    ({"slice_thickness": {"low": 1}}, "slice_thickness takes"),
    ({"min_slices": 0}, "positive integer"),
    ({"all": {"modality": "CT"}}, "takes a list"),
    ({"modality": []}, "non-empty strings"),
])
def test_bad_rules_name_the_problem(bad: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rule_from_dict(bad)


def test_leaf_rules_directly() -> None:
    assert SliceThicknessIn(max=2.0).matches(_info())
    assert not SliceThicknessIn(min=2.0).matches(_info())
    assert MinSlices(120).matches(_info()) and not MinSlices(121).matches(_info())
    assert ModalityIs(["ct", "MR"]).matches(_info())


def _ds(uid: str, iop: tuple[float, ...], thickness: str = "2.5", frames: int | None = None
        ) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = uid
    ds.SOPInstanceUID = uid + ".1"
    ds.Modality = "MR"
    ds.ImageOrientationPatient = list(iop)
    ds.SliceThickness = thickness
    if frames:
        ds.NumberOfFrames = frames
    return ds


def test_series_info_from_headers() -> None:
    info = series_info([_ds("1.2", CORONAL), _ds("1.2", CORONAL), _ds("1.2", AXIAL)])
    assert info.plane is Plane.CORONAL  # the majority, not the first instance
    assert (info.Modality, info.SliceThickness, info.n_instances, info.n_slices) == \
        ("MR", 2.5, 3, 3)
    assert series_info([_ds("1.3", AXIAL, frames=30)]).n_slices == 30
    with pytest.raises(ImageError, match="2 series"):
        series_info([_ds("1.2", AXIAL), _ds("1.3", AXIAL)])
    with pytest.raises(ImageError, match="no instances"):
        series_info([])


def test_series_info_on_real_files() -> None:
    folder = shared_data_dir("dicom/dicom2nifti_testdata/generic/anatomical/001")
    dss = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    info = series_info(dss)
    assert info.n_instances == len(dss) and len(info.paths) == len(dss)
    assert info.Modality == "MR" and info.plane is not None


def test_main_series_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    src = shared_data_dir("dicom/dicom2nifti_testdata/generic/anatomical")
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(yaml.safe_dump({"any_mr": {"modality": "MR"},
                                          "ct": {"modality": "CT"}}))
    assert main_series(src, rules_path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "SeriesInstanceUID"
    assert len(lines) >= 2 and all(line.endswith("any_mr") for line in lines[1:])
    bad = tmp_path / "bad.yaml"
    bad.write_text("x: {nope: 1}\n")
    assert main_series(src, bad) == 2
    assert main_series(tmp_path, None) == 1
