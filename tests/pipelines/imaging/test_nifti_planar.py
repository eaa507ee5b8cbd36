"""NIfTI/Analyze via nibabel, and 2-D images (CR/DX, PNG/JPEG)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from pipelines.imaging.convert import load_image
from pipelines.imaging.nifti import load_nifti
from pipelines.imaging.planar import load_raster, planar_dicom_to_volume
from pipelines.imaging.volume import ImageError
from tests.shared_data import shared_data_dir


def nifti(name: str) -> Path:
    return shared_data_dir("nifti/nibabel_testdata") / name


@pytest.mark.parametrize(("name", "shape", "fmt"), [
    ("anatomical.nii", (33, 41, 25), "Nifti1Image"),  # big-endian
    ("example4d.nii.gz", (128, 96, 24, 2), "Nifti1Image"),  # gzipped 4-D
    ("example_nifti2.nii.gz", (32, 20, 12, 2), "Nifti2Image"),
    ("functional.nii", (17, 21, 3, 20), "Nifti1Image"),  # scaled -> float32
])
def test_nifti_variants(name: str, shape: tuple[int, ...], fmt: str) -> None:
    volume = load_nifti(nifti(name))
    image = nib.load(nifti(name))
    assert volume.array.shape == shape and volume.metadata["Format"] == fmt
    assert volume.array.dtype.isnative
    assert np.allclose(volume.array, image.get_fdata(), rtol=1e-6)
    assert np.allclose(volume.affine, image.affine)


def test_big_endian_recorded() -> None:
    assert load_nifti(nifti("anatomical.nii")).metadata["Endianness"] == "big"


@pytest.mark.parametrize("name", ["analyze.hdr", "nifti1.hdr"])
def test_header_without_image_file(name: str) -> None:
    with pytest.raises(ImageError, match=r"image file .*\.img is missing"):
        load_nifti(nifti(name))


def test_cifti_refused() -> None:
    with pytest.raises(ImageError, match="CIFTI"):
        load_image(nifti("row_major.dconn.nii"))


def test_cr_uses_imager_pixel_spacing_and_inverts_monochrome1() -> None:
    path = shared_data_dir("dicom/pydicom_test_files/dicomdirtests") / "77654033/CR1/6154"
    ds = pydicom.dcmread(path)
    volume = load_image(path)
    assert volume.array.shape == (ds.Columns, ds.Rows)
    assert volume.metadata["SpacingSource"] == "ImagerPixelSpacing"
    assert volume.metadata["SpacingKnown"] and volume.metadata["InvertedFrom"] == "MONOCHROME1"
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    values = ds.pixel_array.astype(np.float64) * slope + intercept
    low, high = intercept, (2 ** ds.BitsStored - 1) * slope + intercept
    assert np.allclose(volume.array, (low + high - values).T, rtol=1e-6)


def test_planar_without_spacing_says_so() -> None:
    ds = pydicom.dcmread(shared_data_dir("dicom/pydicom_test_files") / "examples_palette.dcm")
    volume = planar_dicom_to_volume(ds, "palette")
    assert volume.metadata["SpacingKnown"] is False
    assert volume.array.shape == (800, 350, 3)
    assert volume.metadata["ColorConversion"] == "PALETTE COLOR -> RGB"


def test_png_jpeg_grey_colour_palette(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(grey).save(tmp_path / "g.png")
    volume = load_raster(tmp_path / "g.png")
    assert np.array_equal(volume.array, grey.T) and volume.metadata["SpacingKnown"] is False
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    volume = load_raster(tmp_path / "c.png")
    assert volume.array.shape == (4, 3, 3) and volume.metadata["ColorConversion"].startswith(
        "RGBA -> RGB")
    Image.fromarray(rgba[..., :3], "RGB").convert("P").save(tmp_path / "p.png")
    assert load_raster(tmp_path / "p.png").metadata["SourceMode"] == "P"
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    jpeg = load_raster(tmp_path / "g.jpg")
    assert np.abs(jpeg.array.astype(int) - grey.T).max() <= 3  # lossy
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageError, match=r"bad\.png"):
        load_raster(tmp_path / "bad.png")
