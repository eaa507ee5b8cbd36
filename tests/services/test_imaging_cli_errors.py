"""``clinfuse dicom2nifti`` and ``series`` on what is not an image: one line, non-zero exit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from services.cli import main


def _cr(path: Path, *, pixels: bool = True) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Synthetic^Secret", "SECRET-ID-42"
    ds.Modality = "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 64, 64, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels:
        ds.PixelData = np.full((64, 64), 900, np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def truncated(tmp: Path) -> Path:
    path = _cr(tmp / "in" / "cr.dcm")
    path.write_bytes(path.read_bytes()[:-5000])  # the transfer stopped inside the pixels
    return path


def not_an_image(tmp: Path) -> Path:
    path = tmp / "in" / "report.txt"
    path.parent.mkdir()
    path.write_text("Chest radiograph: no acute findings.\n")
    return path


def empty_folder(tmp: Path) -> Path:
    (tmp / "in").mkdir()
    return tmp / "in"


def no_pixel_data(tmp: Path) -> Path:
    return _cr(tmp / "in" / "cr.dcm", pixels=False)


CASES: dict[str, Callable[[Path], Path]] = {
    "truncated": truncated, "not_an_image": not_an_image, "empty_folder": empty_folder,
    "no_pixel_data": no_pixel_data}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["dicom2nifti", "series"])
def test_unusable_input_is_one_line_and_a_nonzero_exit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, command: str) -> None:
    src = CASES[case](tmp_path)
    argv = ["dicom2nifti", str(src), str(tmp_path / "out.nii.gz")] if command == "dicom2nifti" \
        else ["series", str(src)]
    code, err = _run(argv, capsys)
    if (command, case) == ("series", "truncated"):
        # `series` lists headers and never decodes pixels: the intact header is listed.
        assert code == 0 and err == ""
        return
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "SECRET" not in err
    assert str(src) in err  # names the file or folder
    assert not (tmp_path / "out.nii.gz").exists()  # nothing half-written


def test_an_unexpected_fault_is_one_line_without_its_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.imaging.convert as convert

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("decoder fault quoting SECRET-ID-42")

    monkeypatch.setattr(convert, "load_image", broken)
    code, err = _run(["dicom2nifti", str(_cr(tmp_path / "cr.dcm")),
                      str(tmp_path / "out.nii.gz")], capsys)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("clinfuse dicom2nifti: unexpected RuntimeError in ")
    assert "SECRET" not in err and "Traceback" not in err
