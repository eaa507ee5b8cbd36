"""Bad input: each a clear ImageError naming the file and the problem, never a traceback."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipelines.imaging.convert import load_image, main_dicom2nifti
from pipelines.imaging.dicom_series import load_dicom_series
from pipelines.imaging.discovery import discover, read_dicom
from pipelines.imaging.volume import ImageError
from tests.shared_data import shared_data_dir


def pydicom_file(name: str) -> Path:
    return shared_data_dir("dicom/pydicom_test_files") / name


def anatomical() -> Path:
    return shared_data_dir("dicom/dicom2nifti_testdata") / "generic" / "anatomical" / "001"


@pytest.mark.parametrize(("name", "words"), [
    ("MR_truncated.dcm", "corrupt pixel data"),
    ("badVR.dcm", "NumberOfFrames is not an integer"),
    ("meta_missing_tsyntax.dcm", "no (0002,0010) TransferSyntaxUID"),
    ("rtplan.dcm", "no DICOM image series found"),
    # 12-bit JPEG: neither GDCM nor Pillow decodes it; only GPL libjpeg does.
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
])
def test_bad_dicom_files_refused_by_name(name: str, words: str) -> None:
    path = pydicom_file(name)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert words in str(info.value)
    assert str(path) in str(info.value)


def test_unsupported_compression_is_refused_naming_it(tmp_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(pydicom_file("JPEG2000.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder
    path = tmp_path / "mpeg2.dcm"
    ds.save_as(path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert "1.2.840.10008.1.2.4.100" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_gdcm.dcm"])
def test_jpeg_lossless_decodes_through_gdcm(name: str) -> None:
    import pydicom

    volume = load_image(pydicom_file(name))
    reference = pydicom.dcmread(pydicom_file(name)).pixel_array
    assert volume.array.size == reference.size


def test_non_dicom_bytes_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image at all\n" * 20)
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    found = discover(tmp_path)
    assert not found.series
    assert {Path(r.source).name for r in found.rejected} == {"notes.txt", "random.bin"}
    assert all("not DICOM" in r.reason for r in found.rejected)
    with pytest.raises(ImageError, match="not DICOM"):
        read_dicom(tmp_path / "random.bin")


def test_file_without_meta_read_only_when_it_parses() -> None:
    ds = read_dicom(pydicom_file("ExplVR_LitEndNoMeta.dcm"))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.8"


def test_slice_from_another_series_named(tmp_path: Path) -> None:
    for path in anatomical().glob("*.dcm"):
        shutil.copy(path, tmp_path / path.name)
    stray = shared_data_dir("dicom/dicom2nifti_testdata") / "hitachi" / "anatomical" / "001"
    shutil.copy(stray / "001.dcm", tmp_path / "stray.dcm")
    with pytest.raises(ImageError) as info:
        load_dicom_series(tmp_path)
    assert "2 series found" in str(info.value) and "stray.dcm" in str(info.value)


def test_slice_with_same_uid_but_other_frame_of_reference_named(tmp_path: Path) -> None:
    for path in anatomical().glob("*.dcm"):
        shutil.copy(path, tmp_path / path.name)
    odd = sorted(tmp_path.glob("*.dcm"))[1]
    ds = pydicom.dcmread(odd)
    ds.FrameOfReferenceUID = "1.2.3.4.5"
    ds.save_as(odd)
    with pytest.raises(ImageError) as info:
        load_dicom_series(tmp_path)
    assert "mixed frames of reference" in str(info.value) and odd.name in str(info.value)


def test_cli_body_writes_reason_without_traceback(tmp_path: Path) -> None:
    err = io.StringIO()
    code = main_dicom2nifti(pydicom_file("MR_truncated.dcm"), tmp_path / "x.nii.gz", False,
                            stderr=err)
    assert code == 1
    assert "MR_truncated.dcm" in err.getvalue() and "Traceback" not in err.getvalue()
    assert main_dicom2nifti(anatomical(), tmp_path / "ok.nii.gz", False) == 0


def test_zip_and_dicomdir_sources(tmp_path: Path) -> None:
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(anatomical().glob("*.dcm")):
            zf.write(path, f"study/{path.name}")
    volume = load_dicom_series(archive)
    assert volume.array.shape == (256, 256, 4)
    dicomdir = shared_data_dir("dicom/pydicom_test_files/dicomdirtests") / "DICOMDIR"
    found = discover(dicomdir)
    assert len(found.series) >= 3 and not any("not DICOM" in r.reason for r in found.rejected)
