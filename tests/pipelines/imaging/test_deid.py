"""De-identification against PS3.15 Table E.1-1, on real files read in place."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipelines.imaging.deid import (
    BASIC_PROFILE_CODE,
    BurnedInAnnotationError,
    UIDMap,
    deidentify_dataset,
    main_deid,
    profile_action,
)
from pipelines.imaging.deid_table import ACTIONS, BASIC_PROFILE
from pipelines.imaging.discovery import read_dicom
from pipelines.imaging.volume import ImageError
from tests.shared_data import shared_data_dir

DUMMY_DATES = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}


def _readable(folder: Path) -> list[tuple[Path, Dataset]]:
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = read_dicom(path)
        except ImageError:
            continue
        if "DirectoryRecordSequence" not in ds:
            out.append((path, ds))
    return out


def _walk(ds: Dataset) -> Iterator[tuple[Dataset, pydicom.DataElement]]:
    """Every element with the dataset that holds it, at every nesting level."""
    for elem in ds:
        yield ds, elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _all_uids(ds: Dataset, *, only_unlisted: bool = False) -> set[str]:
    return {str(v) for _, e in _walk(ds) if e.VR == "UI" and not e.is_empty
            and not (only_unlisted and profile_action(e.tag) is not None)
            for v in (e.value if isinstance(e.value, list | pydicom.multival.MultiValue)
                      else [e.value])}


def _check_level(before: Dataset, after: Dataset, uid_map: UIDMap) -> int:
    """Assert the profile at one nesting level (recursing); return the number checked."""
    checked = 0
    for elem in before:
        tag = elem.tag
        if tag.is_private:
            assert tag not in after, f"private {tag} survived"
            continue
        action = profile_action(tag)
        if action is None:
            if elem.VR == "SQ" and tag in after:
                for b, a in zip(elem.value, after[tag].value, strict=True):
                    checked += _check_level(b, a, uid_map)
            continue
        checked += 1
        name = keyword_for_tag(tag) or str(tag)
        if action == "X":
            assert tag not in after, f"{name} ({action}) not removed"
            continue
        assert tag in after, f"{name} ({action}) was removed; expected it kept and replaced"
        new = after[tag]
        if action in ("Z", "X/Z"):
            assert new.is_empty, f"{name} ({action}) not zero-length: {new.value!r}"
        elif action in ("U", "X/Z/U*") and elem.VR == "UI":
            if not elem.is_empty:
                old = elem.value if isinstance(elem.value, str) else list(elem.value)
                expected = uid_map(old) if isinstance(old, str) else [uid_map(u) for u in old]
                got = new.value if isinstance(new.value, str) else list(new.value)
                assert got == expected and got != old, f"{name} UID not remapped consistently"
        elif elem.VR == "SQ":
            # D/X/Z/U* on a sequence: kept, its items cleaned the same way.
            for b, a in zip(elem.value, new.value, strict=True):
                checked += _check_level(b, a, uid_map)
        else:  # D, Z/D, X/D, X/Z/D: a non-empty dummy
            assert not new.is_empty, f"{name} ({action}) empty; expected a dummy"
            if elem.VR in DUMMY_DATES:
                assert str(new.value) == DUMMY_DATES[elem.VR], f"{name} date not replaced"
            elif elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "CS", "AE"):
                assert str(new.value) == "ANONYMIZED", f"{name}: {new.value!r}"
    return checked


def test_table_is_well_formed() -> None:
    assert len(BASIC_PROFILE) >= 150
    assert set(BASIC_PROFILE.values()) <= ACTIONS
    for keyword in BASIC_PROFILE:
        assert tag_for_keyword(keyword) is not None, keyword
    # Spot checks against the standard's table.
    assert BASIC_PROFILE["PatientName"] == "Z"
    assert BASIC_PROFILE["PatientID"] == "Z/D"
    assert BASIC_PROFILE["PatientAge"] == "X"
    assert BASIC_PROFILE["StudyInstanceUID"] == "U"
    assert BASIC_PROFILE["ReferencedSOPInstanceUID"] == "U"
    assert BASIC_PROFILE["FrameOfReferenceUID"] == "U"
    assert BASIC_PROFILE["InstitutionName"] == "X/Z/D"
    assert BASIC_PROFILE["ReferencedImageSequence"] == "X/Z/U*"
    assert profile_action(0x60003000) == "X" and profile_action(0x50020010) == "X"


@pytest.fixture(scope="module")
def pydicom_files() -> list[tuple[Path, Dataset]]:
    files = _readable(shared_data_dir("dicom/pydicom_test_files"))
    assert len(files) > 20
    return files


def test_every_table_attribute_present_is_handled(pydicom_files: list[tuple[Path, Dataset]]
                                                  ) -> None:
    uid_map = UIDMap("test-salt")
    checked = 0
    for path, ds in pydicom_files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = deidentify_dataset(ds, uid_map, on_burned_in="flag")
        checked += _check_level(ds, out, uid_map)
        assert not any(e.tag.is_private for _, e in _walk(out)), path
        assert out.PatientIdentityRemoved == "YES"
        code = out.DeidentificationMethodCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == \
            BASIC_PROFILE_CODE
        assert out.DeidentificationMethod
        # No replaced UID survives anywhere (unless an unlisted attribute, e.g. a class
        # UID, legitimately holds the same value).
        kept = _all_uids(ds, only_unlisted=True)
        leaked = {u for u in _all_uids(out) if u in uid_map.mapping and u not in kept}
        assert not leaked, f"{path.name}: {leaked}"
        if ds.get("file_meta") and "SOPInstanceUID" in out:
            assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert checked > 100  # the files do exercise the table


def test_input_untouched_and_nested_references_remapped(
        pydicom_files: list[tuple[Path, Dataset]]) -> None:
    uid_map = UIDMap("s")
    ds = next(d for p, d in pydicom_files if p.name == "rtplan.dcm")
    before = ds.to_json_dict()
    out = deidentify_dataset(ds, uid_map)
    assert ds.to_json_dict() == before
    refs = [e.value for _, e in _walk(ds) if e.keyword == "ReferencedSOPInstanceUID"]
    new_refs = [e.value for _, e in _walk(out) if e.keyword == "ReferencedSOPInstanceUID"]
    assert refs and new_refs == [uid_map(r) for r in refs]


def test_uids_consistent_across_a_study() -> None:
    folder = shared_data_dir("dicom/dicom2nifti_testdata/generic/anatomical/001")
    files = _readable(folder)
    assert len(files) >= 2
    uid_map = UIDMap("study-salt")
    outs = [deidentify_dataset(ds, uid_map) for _, ds in files]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        olds = {str(ds.get(key)) for _, ds in files if key in ds}
        news = {str(o.get(key)) for o in outs if key in o}
        if key == "FrameOfReferenceUID" and not olds:
            continue  # these files carry none
        assert len(news) == len(olds) == 1, key
        assert news == {uid_map(olds.pop())}
        assert next(iter(news)).startswith("2.25.")
    sops = [o.SOPInstanceUID for o in outs]
    assert len(set(sops)) == len(sops)
    # Deterministic for the salt, different for another salt.
    again = deidentify_dataset(files[0][1], UIDMap("study-salt"))
    other = deidentify_dataset(files[0][1], UIDMap("other"))
    assert again.StudyInstanceUID == outs[0].StudyInstanceUID != other.StudyInstanceUID


def _synthetic() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN123"
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.InstitutionName = "General Hospital"
    ds.Modality = "CT"
    ds.add_new(0x00091010, "LO", "vendor secret")
    ds.add_new(0x60003000, "OW", b"\x00\x01")
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = "1.2.3.4.6"
    ref.add_new(0x00191001, "LO", "nested private")
    ref.PatientName = "Nested^Name"
    ds.ReferencedImageSequence = Sequence([ref])
    content = Dataset()
    content.TextValue = "Patient Jane Doe, seen at General Hospital"
    ds.ContentSequence = Sequence([content])
    return ds


def test_synthetic_actions_and_nesting() -> None:
    uid_map = UIDMap("x")
    out = deidentify_dataset(_synthetic(), uid_map)
    assert out.PatientName == "" and out["PatientName"].is_empty
    assert out.PatientID == "ANONYMIZED"  # Z/D -> D
    assert out.InstitutionName == "ANONYMIZED"  # X/Z/D -> D
    assert out["PatientBirthDate"].is_empty
    assert out.Modality == "CT"  # not in the table: kept
    assert 0x60003000 not in out
    item = out.ReferencedImageSequence[0]
    assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert item.ReferencedSOPInstanceUID == uid_map("1.2.3.4.6")
    assert item["PatientName"].is_empty
    assert 0x00191001 not in item
    # Free text inside a D sequence does not survive.
    assert out.ContentSequence[0].TextValue == "ANONYMIZED"
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_burned_in_annotation_refused_or_flagged(tmp_path: Path) -> None:
    ds = _synthetic()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInAnnotationError, match="on_burned_in='flag'"):
        deidentify_dataset(ds, UIDMap("x"))
    out = deidentify_dataset(ds, UIDMap("x"), on_burned_in="flag")
    assert out.BurnedInAnnotation == "YES" and out.PatientIdentityRemoved == "YES"
    with pytest.raises(ValueError, match="on_burned_in"):
        deidentify_dataset(ds, UIDMap("x"), on_burned_in="ignore")  # type: ignore[arg-type]


def test_main_deid_writes_readable_deidentified_files(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    src = shared_data_dir("dicom/dicom2nifti_testdata/generic/anatomical/001")
    dst = tmp_path / "out"
    assert main_deid(src, dst, "salt") == 0
    outputs = sorted(dst.rglob("*.dcm"))
    assert len(outputs) == len(_readable(src))
    study_uids = set()
    for path in outputs:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert not any(e.tag.is_private for _, e in _walk(ds))
        assert path.stem == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        study_uids.add(ds.StudyInstanceUID)
        _ = ds.pixel_array  # still a usable image
    assert len(study_uids) == 1
    assert "de-identified" in capsys.readouterr().out
    # Output inside the input is refused.
    assert main_deid(tmp_path, tmp_path / "nested", "salt") == 2
