"""Zero, negative, missing and malformed spacing: unit spacing, flagged, never a traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from pipelines.imaging.convert import load_image
from pipelines.imaging.dicom_series import load_dicom_series
from pipelines.imaging.nifti import load_nifti
from services.cli import main


def _meta(ds: Dataset, sop_class: str) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()


def write_cr(path: Path, **spacing: object) -> Path:
    """A chest CR as digitisers write them: MONOCHROME1, 12 bits stored in 16."""
    ds = Dataset()
    _meta(ds, ComputedRadiographyImageStorage)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "SYNTH-CR-1", "Synthetic^Patient"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 24, 20, 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    for keyword, value in spacing.items():
        setattr(ds, keyword, value)
    pixels = (np.arange(24 * 20).reshape(24, 20) * 8 % 4096).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_cr_with_zero_pixel_spacing_converts_with_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    cr = write_cr(tmp_path / "cr.dcm", PixelSpacing="0\\0")
    out = tmp_path / "cr.nii.gz"
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as info:
        main(["dicom2nifti", str(cr), str(out)])
    assert info.value.code == 0
    assert "Traceback" not in capsys.readouterr().err
    assert any("PixelSpacing is zero" in r.getMessage() and "cr.dcm" in r.getMessage()
               for r in caplog.records)
    written = nib.load(out)
    assert written.shape == (20, 24)
    np.testing.assert_allclose(written.header.get_zooms()[:2], (1.0, 1.0))
    np.testing.assert_allclose(written.affine, np.eye(4))
    volume = load_image(cr)
    assert volume.metadata["SpacingKnown"] is False
    assert volume.metadata["SpacingUnknownReason"] == "PixelSpacing is zero (1 mm assumed)"
    assert volume.metadata["InvertedFrom"] == "MONOCHROME1"


@pytest.mark.parametrize(("spacing", "known", "values", "reason"), [
    ({"PixelSpacing": "0\\0"}, False, (1.0, 1.0), "PixelSpacing is zero (1 mm assumed)"),
    ({"PixelSpacing": "-0.2\\-0.2"}, False, (1.0, 1.0),
     "PixelSpacing is negative (1 mm assumed)"),
    ({"PixelSpacing": "0.2"}, False, (1.0, 1.0),
     "PixelSpacing has 1 value(s), not 2 (1 mm assumed)"),
    ({}, False, (1.0, 1.0),
     "no PixelSpacing or ImagerPixelSpacing or NominalScannedPixelSpacing (1 mm assumed)"),
    ({"PixelSpacing": "0\\0", "ImagerPixelSpacing": "0.15\\0.1"}, True, (0.1, 0.15), None),
])
def test_planar_spacing_policy(tmp_path: Path, spacing: dict[str, str], known: bool,
                               values: tuple[float, float], reason: str | None) -> None:
    volume = load_image(write_cr(tmp_path / "cr.dcm", **spacing))
    assert volume.metadata["SpacingKnown"] is known
    np.testing.assert_allclose(volume.spacing[:2], values)
    assert volume.metadata.get("SpacingUnknownReason") == reason
    if known:
        assert volume.metadata["SpacingSource"] == "ImagerPixelSpacing"
        assert volume.metadata["SpacingNote"] == "PixelSpacing is zero"


def _ct_series(folder: Path, pixel_spacing: str) -> Path:
    folder.mkdir()
    series, frame = generate_uid(), generate_uid()
    for k in range(4):
        ds = Dataset()
        _meta(ds, CTImageStorage)
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = (
            series, generate_uid(), frame)
        ds.Modality = "CT"
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.PixelSpacing = pixel_spacing
        ds.SliceThickness = "-1"
        ds.InstanceNumber = k + 1
        ds.PixelData = np.full((8, 8), k, np.int16).tobytes()
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    return folder


def test_series_with_zero_pixel_spacing_keeps_its_slice_spacing(tmp_path: Path) -> None:
    volume = load_dicom_series(_ct_series(tmp_path / "ct", "0\\0"))
    assert volume.array.shape == (8, 8, 4)
    np.testing.assert_allclose(volume.spacing, (1.0, 1.0, 2.5))
    assert volume.metadata["SpacingKnown"] is False
    assert volume.metadata["SpacingUnknownReason"] == "PixelSpacing is zero (1 mm assumed)"
    assert load_dicom_series(_ct_series(tmp_path / "ok", "0.5\\0.5")).metadata[
        "SpacingKnown"] is True


def test_nifti_with_zero_pixdim_gets_unit_spacing_and_the_flag(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(None, code=0)
    image.header["pixdim"][1:4] = [0.0, 2.0, 0.0]
    nib.save(image, tmp_path / "z.nii.gz")
    volume = load_nifti(tmp_path / "z.nii.gz")
    assert volume.metadata["SpacingKnown"] is False
    assert "zero or non-finite voxel size along i, k" in volume.metadata["SpacingUnknownReason"]
    np.testing.assert_allclose(volume.spacing, (1.0, 2.0, 1.0))
    assert np.isfinite(volume.affine).all() and abs(np.linalg.det(volume.affine)) > 0
