"""Reading shortcuts: pixels viewed from the file bytes, header values shared per series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipelines.imaging.decode import decode_pixels
from pipelines.imaging.header import header_value
from pipelines.imaging.volume import ImageError


def _write(path: Path, raw: np.ndarray, *, bits_stored: int, signed: bool,
           syntax: UID = ExplicitVRLittleEndian, photometric: str = "MONOCHROME2",
           spacing: str = "0.5") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "CT", "Doe^Jane"
    frames = raw.shape[0] if raw.ndim == 3 else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = raw.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = raw.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelSpacing = [spacing, spacing]
    ds.PixelData = raw.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


@pytest.mark.parametrize(("dtype", "bits_stored", "signed"), [
    (np.int16, 16, True), (np.uint16, 12, False), (np.int16, 12, True), (np.uint8, 8, False),
    (np.int32, 20, True)])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_pixels_equal_pydicom(tmp_path: Path, dtype: type, bits_stored: int,
                                     signed: bool, syntax: UID) -> None:
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    # Full-range values: with BitsStored < BitsAllocated the high bits are garbage that
    # pydicom shifts out (sign-extending signed data); the fast path must do the same.
    raw = rng.integers(info.min, info.max, size=(3, 6, 5), dtype=dtype, endpoint=True)
    ds = _write(tmp_path / "a.dcm", raw, bits_stored=bits_stored, signed=signed,
                syntax=syntax)
    ours = decode_pixels(ds, "a.dcm")
    theirs = pydicom.dcmread(tmp_path / "a.dcm").pixel_array
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


def test_native_pixels_are_a_view_and_truncation_still_refused(tmp_path: Path) -> None:
    raw = np.arange(30, dtype=np.int16).reshape(6, 5)
    ds = _write(tmp_path / "a.dcm", raw, bits_stored=16, signed=True)
    ours = decode_pixels(ds, "a.dcm")
    assert not ours.flags.writeable  # viewed on the file bytes, no decoder copy
    assert np.array_equal(ours[0], raw)
    ds.PixelData = ds.PixelData[:-10]
    with pytest.raises(ImageError, match="corrupt pixel data"):
        decode_pixels(ds, "a.dcm")


def test_header_values_shared_only_when_bytes_match(tmp_path: Path) -> None:
    raw = np.zeros((4, 4), dtype=np.int16)
    a = _write(tmp_path / "a.dcm", raw, bits_stored=16, signed=True)
    b = _write(tmp_path / "b.dcm", raw, bits_stored=16, signed=True)
    c = _write(tmp_path / "c.dcm", raw, bits_stored=16, signed=True, spacing="0.7")
    first = header_value(a, "PixelSpacing")
    assert header_value(b, "PixelSpacing") is first  # converted once
    assert [float(v) for v in header_value(c, "PixelSpacing")] == [0.7, 0.7]
    for keyword in ("PixelSpacing", "Rows", "PatientName", "Modality", "SOPInstanceUID"):
        assert header_value(c, keyword) == c.get(keyword)
    assert header_value(c, "SliceThickness", 2.5) == 2.5
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        header_value(c, "PixelSpcing")
