"""DICOM series against dicom2nifti and dcm2niix ground truths, in world space."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipelines.imaging.convert import dicom_to_nifti, load_image
from pipelines.imaging.decode import GPL_EXTRA
from pipelines.imaging.dicom_series import load_dicom_series
from pipelines.imaging.volume import ImageError
from tests.pipelines.imaging.conftest import canonical, canonical_truth
from tests.shared_data import shared_data_dir


def d2n(sub: str) -> Path:
    return shared_data_dir("dicom/dicom2nifti_testdata") / sub


LOSSLESS = [
    "generic/anatomical/001",
    "generic/anatomical/001_implicit",
    "generic/compressed_j2k/001",
    "generic/compressed_jpegls/001",
    "generic/compressed_rle/001",
    "generic/rgb/001",
    "hyperfine/anatomical/001",
    "siemens_multiframe/anatomical/001",
]


def assert_matches(volume, truth_path: Path, *, rtol: float = 0.0) -> None:  # type: ignore[no-untyped-def]
    array, affine = canonical(volume)
    truth, truth_affine = canonical_truth(truth_path)
    if truth.ndim == array.ndim + 1 and truth.shape[-1] == 1:
        truth = truth[..., 0]
    assert array.shape == truth.shape
    assert np.abs(affine - truth_affine).max() < 1e-3
    if rtol == 0.0:
        assert np.array_equal(array.astype(np.float64), truth.astype(np.float64))
    else:
        assert np.allclose(array, truth, rtol=rtol, atol=0)


@pytest.mark.parametrize("series", LOSSLESS)
def test_lossless_series_match_ground_truth(series: str) -> None:
    volume = load_dicom_series(d2n(series))
    assert_matches(volume, d2n(series + "_ground_truth.nii.gz"))


def test_integer_values_stay_exact_in_float32() -> None:
    volume = load_dicom_series(d2n("generic/anatomical/001"))
    assert volume.array.dtype == np.float32
    assert np.array_equal(volume.array, np.round(volume.array))


def test_philips_enhanced_per_frame_rescale_matches_to_float32_precision() -> None:
    # Per-frame PixelValueTransformationSequence slope is not 1: float32 rounding only.
    volume = load_dicom_series(d2n("philips_enhanced/anatomical/001"))
    assert volume.metadata["SliceCount"] == 8
    assert_matches(volume, d2n("philips_enhanced/anatomical/001_ground_truth.nii.gz"),
                   rtol=1e-6)


def test_jpeg_lossless_decodes_through_gdcm_and_matches() -> None:
    volume = load_dicom_series(d2n("generic/compressed_jpeg/001"))
    assert_matches(volume, d2n("generic/compressed_jpeg/001_ground_truth.nii.gz"))


def test_jpeg_lossless_without_a_decoder_is_refused_naming_syntax_and_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipelines.imaging.decode._decoder_available", lambda ts: False)
    with pytest.raises(ImageError) as info:
        load_dicom_series(d2n("generic/compressed_jpeg/001"))
    assert "1.2.840.10008.1.2.4.70" in str(info.value)
    assert GPL_EXTRA in str(info.value) and "python-gdcm" in str(info.value)


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_mosaic_transfer_syntaxes_match_dcm2niix(number: int) -> None:
    folder = shared_data_dir("dicom/dcm_qa_ts")
    volume = load_image(folder / f"{number}.dcm")
    assert volume.array.shape == (64, 64, 35)
    array, affine = canonical(volume)
    truth = nib.as_closest_canonical(nib.load(folder / "1.nii"))
    assert np.abs(affine - truth.affine).max() < 1e-3
    assert np.array_equal(array, np.asarray(truth.dataobj).astype(np.float32))




def test_too_few_slices_refused_then_allowed() -> None:
    with pytest.raises(ImageError, match="too few slices: 2"):
        load_dicom_series(d2n("failing/slicecount/001"))
    volume = load_dicom_series(d2n("failing/slicecount/001"), min_slices=2)
    assert_matches(volume, d2n("failing/slicecount/001_ground_truth.nii.gz"))


@pytest.mark.parametrize(("series", "words"), [
    ("failing/sliceincrement/001", "missing slice: 1 slice(s) absent"),
    ("failing/sliceincrement/002", "gantry tilt"),
    ("failing/gantrytilting/001", "gantry tilt: the stacking direction is 14.00 degrees"),
    ("failing/notavolume/001", "not a volume: all 4 images lie at the same position"),
    ("failing/sliceorientation/001", "not a volume: mixed orientations"),
])
def test_broken_series_refused(series: str, words: str) -> None:
    with pytest.raises(ImageError) as info:
        load_dicom_series(d2n(series))
    assert words in str(info.value)
    assert str(d2n(series)) in str(info.value)


def test_uneven_spacing_resampled_matches_ground_truth_on_acquired_planes() -> None:
    # dicom2nifti resamples tilted + gapped 002 onto a 0.778 mm grid anchored at the last
    # slice; comparing on its grid: the plane that coincides with an acquired slice must
    # agree (interpolated planes differ: dicom2nifti marks this test skipped upstream).
    from pipelines.imaging.discovery import discover
    from pipelines.imaging.frames import frames_from_dataset
    from pipelines.imaging.resample import resample_stack

    volume = load_dicom_series(d2n("failing/sliceincrement/002"), resample=True)
    assert volume.metadata["Resampled"]
    axes = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    assert np.allclose(axes.T @ axes, np.eye(3), atol=1e-6)  # orthogonal grid
    truth = nib.load(d2n("failing/sliceincrement/002_ground_truth.nii.gz"))
    expected = np.asarray(truth.dataobj).astype(np.float64)
    series = next(iter(discover(d2n("failing/sliceincrement/002")).series.values()))
    frames = [frames_from_dataset(i.dataset, i.source)[0] for i in series]
    normal = np.cross(frames[0].row_cosine, frames[0].col_cosine)
    frames.sort(key=lambda f: float(f.position @ normal))
    slices = np.stack([f.load().T.astype(np.float64) * f.slope + f.intercept for f in frames])
    out, _ = resample_stack(slices, np.array([f.position for f in frames]),
                            frames[0].row_cosine, frames[0].col_cosine, frames[0].spacing,
                            grid=(expected.shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ truth.affine),
                            padding=0)
    plane = 4  # lies on the acquired slice IM-0001-0005
    both = (expected[:, :, plane] != 0) & (out[:, :, plane] != 0)
    assert both.sum() > 200_000
    assert np.abs(out[:, :, plane][both] - expected[:, :, plane][both]).max() < 0.01


def test_gantry_tilt_resampled_keeps_world_values() -> None:
    volume = load_dicom_series(d2n("failing/gantrytilting/001"), resample=True)
    assert volume.metadata["Resampled"] and "gantry tilt" in volume.metadata["ResampleReasons"][0]
    axes = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    assert np.allclose(axes.T @ axes, np.eye(3), atol=1e-6)
    # The first output plane lies on the first acquired slice: same world values.
    first = sorted(d2n("failing/gantrytilting/001").glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    r = np.array(ds.ImageOrientationPatient[:3], float)
    c = np.array(ds.ImageOrientationPatient[3:], float)
    corner = ras @ np.r_[np.array(ds.ImagePositionPatient, float), 1.0]
    index = np.linalg.inv(volume.affine) @ corner
    assert abs(index[2]) < 1e-3 and abs(index[0]) < 1e-3  # plane 0, column 0
    # Rows run along +column-cosine, kept as +j; the slice sits j0 voxels into the grid.
    assert np.allclose(volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1]),
                       (np.diag([-1.0, -1.0, 1.0]) @ c), atol=1e-6)
    assert np.allclose(volume.affine[:3, 0] / np.linalg.norm(volume.affine[:3, 0]),
                       (np.diag([-1.0, -1.0, 1.0]) @ r), atol=1e-6)
    stored = ds.pixel_array.T.astype(np.float64) + float(ds.RescaleIntercept)
    gx, gy = np.meshgrid(np.arange(volume.array.shape[0]), np.arange(volume.array.shape[1]),
                         indexing="ij")
    expected = ndimage.map_coordinates(stored, [gx - index[0], gy - index[1]], order=1,
                                       cval=np.nan)
    inside = ~np.isnan(expected)
    assert inside.sum() > 250_000
    assert np.abs(volume.array[:, :, 0][inside] - expected[inside]).max() < 0.01


def test_shuffled_instance_numbers_monai_wrong_ours_right(tmp_path: Path) -> None:
    from monai.transforms import LoadImage

    source = d2n("generic/anatomical/001")
    truth = d2n("generic/anatomical/001_ground_truth.nii.gz")
    for path, number in zip(sorted(source.glob("*.dcm")), [3, 1, 4, 2], strict=True):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = number
        ds.save_as(tmp_path / path.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = LoadImage(reader="PydicomReader", image_only=True)(str(tmp_path))
    monai = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(image),
                                                     np.asarray(image.affine)))
    expected, expected_affine = canonical_truth(truth)
    monai_right = (np.abs(monai.affine - expected_affine).max() < 1e-3
                   and np.array_equal(np.asarray(monai.dataobj), expected))
    assert not monai_right, "MONAI now orders by position: drop this contrast"
    assert_matches(load_dicom_series(tmp_path), truth)


def test_dicom_to_nifti_writes_file_matching_ground_truth(tmp_path: Path) -> None:
    out = tmp_path / "out.nii.gz"
    dicom_to_nifti(d2n("generic/anatomical/001"), out)
    written = nib.as_closest_canonical(nib.load(out))
    truth, truth_affine = canonical_truth(d2n("generic/anatomical/001_ground_truth.nii.gz"))
    assert np.array_equal(np.asarray(written.dataobj), truth.astype(np.float32))
    assert np.abs(written.affine - truth_affine).max() < 1e-3


def test_dicom_to_nifti_writes_rgb24(tmp_path: Path) -> None:
    out = tmp_path / "rgb.nii.gz"
    dicom_to_nifti(d2n("generic/rgb/001"), out)
    data = np.asarray(nib.load(out).dataobj)
    assert data.dtype.names == ("R", "G", "B")
