"""One minimal reproducer per crash class the parser fuzzer found (benchmarks/fuzz_parsers.py).

Each input is built here; before its fix each raised a traceback (the exception named in
the test's docstring) instead of the project's located error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from fhir_adapters.errors import IngestError
from fhir_adapters.fhir_json import records_from_json
from pipelines.imaging.convert import dicom_to_nifti, volume_to_nifti
from pipelines.imaging.decode import _decoding_plugin, decode_pixels
from pipelines.imaging.dicom_limits import DicomLimits
from pipelines.imaging.discovery import discover, read_dicom
from pipelines.imaging.volume import ImageError, Volume
from pipelines.manifest import ManifestError, read_manifest


def ct_slice(path: Path, *, orientation: list[float] | None = None) -> Path:
    """A 4x3 16-bit CT slice with full geometry, explicit VR little endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "CT", "Fuzz^Regression"
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = orientation or [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 2
    ds.Rows, ds.Columns = 3, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.arange(12, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- FHIR


def test_json_nested_deeper_than_the_stack_is_refused_not_recursion_error() -> None:
    """RecursionError from json.loads on arrays nested 100,000 deep."""
    text = '{"resourceType": "Patient", "name": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(IngestError) as caught:
        records_from_json(text, source="deep.json")
    assert str(caught.value) == "deep.json: input: JSON nested too deeply"


# --------------------------------------------------------------------------- DICOM


def test_unknown_vr_in_header_refused_naming_the_element(tmp_path: Path) -> None:
    """NotImplementedError ("Unknown Value Representation") from pydicom when a corrupted
    VR byte reached the first use of the element (RescaleIntercept, here)."""
    path = ct_slice(tmp_path / "ct.dcm")
    data = path.read_bytes()
    tag = b"\x28\x00\x52\x10DS"  # (0028,1052) RescaleIntercept, explicit VR 'DS'
    assert data.count(tag) == 1
    path.write_bytes(data.replace(tag, b"\x28\x00\x52\x10DC"))
    with pytest.raises(ImageError) as caught:
        read_dicom(path)
    assert caught.value.source == str(path)
    assert caught.value.reason == ("unreadable DICOM header: element (0028,1052) has an "
                                   "unknown value representation")
    with pytest.raises(ImageError, match=r"no DICOM image series found .*\(0028,1052\)"):
        dicom_to_nifti(path, tmp_path / "out.nii")


@pytest.mark.parametrize("affine", [
    np.diag([0.0, 0.0, 1.0, 1.0]),                   # zero spacing: singular
    np.diag([np.nan, 1.0, 1.0, 1.0]),                # not finite
    np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float),
])
def test_affine_nifti_cannot_hold_is_refused_not_header_data_error(affine: np.ndarray) -> None:
    """nibabel's HeaderDataError ("Could not decompose affine") from volume_to_nifti; the
    last affine has parallel row and column directions."""
    volume = Volume(np.zeros((4, 3), dtype=np.float32), affine)
    with pytest.raises(ImageError) as caught:
        volume_to_nifti(volume, source="ct.dcm")
    assert caught.value.source == "ct.dcm"
    assert caught.value.reason.startswith("cannot write NIfTI: the voxel-to-patient affine")


def rle_slice(insert_at: int) -> Dataset:
    """An 8x8 RLE Lossless slice with one zero byte inserted into its encapsulated data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = 8, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.arange(64, dtype="<u2") * 37).tobytes()
    ds.compress(RLELossless)
    data = bytes(ds.PixelData)
    ds.PixelData = data[:insert_at] + b"\0" + data[insert_at:]
    return ds


@pytest.mark.parametrize(("insert_at", "reason"), [
    # The basic offset table's length now points past the data: struct.error.
    (4, "corrupt pixel data or image attributes: unpack requires a buffer of 1024 bytes"),
    # A shifted RLE segment: pylibjpeg-rle panics (pyo3 PanicException, a BaseException).
    (30, "corrupt pixel data: the pylibjpeg decoder failed on a frame"),
])
def test_corrupt_rle_frame_is_refused(insert_at: int, reason: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_pixels(rle_slice(insert_at), "rle.dcm")
    assert (caught.value.source, caught.value.reason) == ("rle.dcm", reason)


@pytest.mark.parametrize(("ts", "plugin"), [
    (JPEG2000Lossless, "pylibjpeg"), (JPEGLSLossless, "pyjpegls"),
    (JPEGBaseline8Bit, "pillow"), (RLELossless, "pylibjpeg"),
    (JPEGLossless, ""),  # only GDCM decodes it: pydicom's own choice
])
def test_gdcm_is_not_the_decoder_where_another_is_installed(ts: str, plugin: str) -> None:
    """GDCM aborted the process ("terminate called after throwing gdcm::Exception") on a
    JPEG 2000 frame whose component count disagreed with SamplesPerPixel."""
    assert _decoding_plugin(UID(ts)) == plugin


def test_more_frames_declared_than_encapsulated_is_refused() -> None:
    """StopIteration from pydicom's frame generator (NumberOfFrames 3, one RLE frame)."""
    ds = rle_slice(10_000)  # past the end: nothing inserted
    ds.NumberOfFrames = 3
    with pytest.raises(ImageError) as caught:
        decode_pixels(ds, "rle.dcm")
    assert caught.value.reason == ("NumberOfFrames is more than the frames in the "
                                   "encapsulated pixel data")


def test_truncated_jpeg_ls_frame_is_refused_before_charls_spends_seconds_on_it() -> None:
    """A cut-off JPEG-LS frame kept CharLS busy for over 5 s (a hang in the fuzz run)."""
    ds = rle_slice(10_000)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7\x00\x0b" + bytes(30)])
    with pytest.raises(ImageError) as caught:
        decode_pixels(ds, "ls.dcm")
    assert caught.value.reason == "JPEG-LS frame 1 is truncated (no end-of-image marker)"


def test_unknown_vr_in_file_meta_is_refused(tmp_path: Path) -> None:
    """NotImplementedError when discovery read MediaStorageSOPClassUID with a flipped VR."""
    path = ct_slice(tmp_path / "ct.dcm")
    data = path.read_bytes()
    tag = b"\x02\x00\x02\x00UI"  # (0002,0002) MediaStorageSOPClassUID
    assert data.count(tag) == 1
    path.write_bytes(data.replace(tag, b"\x02\x00\x02\x00UX"))
    with pytest.raises(ImageError, match=r"element \(0002,0002\) has an unknown value "):
        read_dicom(path)


def test_frame_count_too_large_for_memory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """MemoryError from pydicom allocating NumberOfFrames x Rows x Columns (99,999,999
    frames of a mutated RLE file); the allocation is made to fail here as RLIMIT_AS did."""
    ds = rle_slice(10_000)  # past the end: nothing inserted
    ds.NumberOfFrames = 99_999_999

    def refuse(*args: object, **kwargs: object) -> None:
        raise MemoryError

    # The default pixel cap (issue 19) refuses it before any allocation ...
    with pytest.raises(ImageError, match="more than the 1 GiB cap; refused before decoding"):
        decode_pixels(ds, "rle.dcm")
    # ... and under a cap raised past it, a failed allocation is still a located error.
    monkeypatch.setattr(np, "empty", refuse)
    with pytest.raises(ImageError) as caught:
        decode_pixels(ds, "rle.dcm", limits=DicomLimits(max_pixel_bytes=1 << 40))
    assert caught.value.reason.startswith("the decoded pixel data would not fit in memory")


def test_garbage_modality_is_not_echoed(tmp_path: Path) -> None:
    """A shifted header put a patient's name into Modality, and the 'no pixel data'
    notice quoted it."""
    path = ct_slice(tmp_path / "ct.dcm")
    ds = read_dicom(path)
    del ds.PixelData
    ds.Modality = "Doe^Jane"
    ds.save_as(path, enforce_file_format=False)
    with pytest.raises(ImageError) as caught:
        dicom_to_nifti(path, tmp_path / "out.nii")
    assert "Doe" not in str(caught.value)
    assert "no pixel data (Modality unreadable)" in str(caught.value)


def test_dicomdir_whose_records_are_not_a_sequence_is_refused(tmp_path: Path) -> None:
    """TypeError from pydicom (or iterating bytes) on a DICOMDIR with a mangled record VR."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.1.3.10")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.1.3.10"
    ds.add_new(0x00041220, "OB", b"\x01\x02\x03\x04")  # DirectoryRecordSequence
    path = tmp_path / "DICOMDIR"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageError) as caught:
        discover(path)
    assert (caught.value.source, caught.value.reason) == (
        str(path), "not a DICOMDIR: DirectoryRecordSequence is not a sequence")


# --------------------------------------------------------------------------- manifests


def write_manifest(folder: Path, csv: str, sidecar: bytes | None = None) -> Path:
    path = folder / "manifest.csv"
    path.write_text(csv)
    if sidecar is not None:
        path.with_suffix(".yaml").write_bytes(sidecar)
    return path


CSV = "patient_id,label,age,sex\np1,0,40,F\np2,1,51,M\n"


@pytest.mark.parametrize(("sidecar", "reason"), [
    (b"sensitive: 5\n", "'sensitive' must be a list of column names"),
    (b"categorical: {a: 1}\n", "'categorical' must be a list of column names"),
    (b"sensitive: [sex, [age]]\n", "'sensitive' must be a list of column names"),
    (b"include_sensitive: 'no'\n", "'include_sensitive' must be true or false"),
    (b"sensitive: [sex]\n\xff\xfe\n", "invalid YAML (UnicodeDecodeError)"),
])
def test_sidecar_of_the_wrong_shape_is_refused(tmp_path: Path, sidecar: bytes,
                                               reason: str) -> None:
    """TypeError from list(5), and UnicodeDecodeError from a non-UTF-8 sidecar."""
    path = write_manifest(tmp_path, CSV, sidecar)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert str(caught.value) == f"{path.with_suffix('.yaml')}: {reason}"


def test_empty_sidecar_lists_mean_none(tmp_path: Path) -> None:
    """TypeError from list(None) for ``sensitive:`` left empty in the sidecar."""
    path = write_manifest(tmp_path, "patient_id,label,age\np1,0,40\n",
                          b"sensitive:\ncategorical:\n")
    manifest = read_manifest(path)
    assert manifest.sensitive == [] and manifest.categorical == []
    assert manifest.feature_columns == ["age"]


def test_image_path_the_os_refuses_counts_as_missing(tmp_path: Path) -> None:
    """OSError (File name too long) from Path.exists on a mangled image cell."""
    path = write_manifest(tmp_path, f"patient_id,label,image\np1,0,{'x' * 300}.png\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert str(caught.value) == (f"{path}: column 'image' names files that don't exist on "
                                 "line(s) 2")


def test_rows_longer_than_the_header_are_refused_not_shifted(tmp_path: Path) -> None:
    """ValueError from int('p1') in the row-number helper: pandas had made the first
    column the index, shifting every column left by one."""
    path = write_manifest(tmp_path, "patient_id,label,age\np1,0,40,x\np2,1,51,y\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert str(caught.value) == f"{path}: rows have more cells than the header"


def test_bad_label_lines_counted_by_position_whatever_the_index(tmp_path: Path) -> None:
    """Row numbers come from positions: a Parquet manifest keeps its own (string) index."""
    path = tmp_path / "manifest.parquet"
    pd.DataFrame({"patient_id": ["p1", "p2", "p3"], "label": [0, 1, 7]},
                 index=["a", "b", "c"]).to_parquet(path)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert str(caught.value) == (f"{path}: column 'label' must be 0 or 1; line(s) 4 are not")


@pytest.mark.parametrize(("target", "reason"), [
    ("notes/binary.txt", "names a file that is not UTF-8 text (invalid byte at offset 0)"),
    ("notes", "names a file that cannot be read (Is a directory)"),
])
def test_unreadable_note_file_is_refused_naming_the_line(tmp_path: Path, target: str,
                                                         reason: str) -> None:
    """UnicodeDecodeError / IsADirectoryError from CohortManifest.notes()."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "ok.txt").write_text("Stable overnight.")
    (tmp_path / "notes" / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n")
    path = write_manifest(tmp_path, f"patient_id,label,note_path\np1,0,notes/ok.txt\n"
                                    f"p2,1,{target}\n")
    manifest = read_manifest(path)
    with pytest.raises(ManifestError) as caught:
        manifest.notes()
    assert str(caught.value) == f"{path}: column 'note_path' on line 3 {reason}"
