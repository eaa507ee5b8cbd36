"""The declared colour policy: BT.601 luma for one-channel models, RGB for three."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pipelines.imaging.colour import LUMA_POLICY, ToModelChannels
from pipelines.imaging.convert import load_image
from pipelines.imaging.planar import load_raster
from pipelines.manifest import read_manifest
from pipelines.model_inputs import load_images, model_volume, preprocess_config

# One orange-ish pixel: Y = 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2.
ORANGE = (200, 100, 50)
ORANGE_Y = 124.2


def _picture() -> np.ndarray:
    """(rows=4, cols=6, 3): orange left half, blue right half."""
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, :3] = ORANGE
    rgb[:, 3:] = (0, 0, 255)  # Y = 0.114 * 255 = 29.07
    return rgb


@pytest.mark.parametrize(("mode", "suffix", "conversion"), [
    ("RGB", ".png", "none"),
    ("RGBA", ".png", "RGBA -> RGB (alpha dropped)"),
    ("P", ".png", "P -> RGB (palette expanded)"),
    ("RGB", ".tif", "none"),
    ("RGBA", ".tiff", "RGBA -> RGB (alpha dropped)"),
])
def test_colour_rasters_become_bt601_luma_for_a_grey_model(tmp_path: Path, mode: str,
                                                           suffix: str, conversion: str) -> None:
    rgb = _picture()
    if mode == "RGBA":
        # A transparent pixel keeps its colour: alpha is dropped, never composited.
        image = Image.fromarray(np.dstack([rgb, np.full((4, 6), 0, np.uint8)]))
    elif mode == "P":
        image = Image.fromarray(rgb).quantize(colors=2)
    else:
        image = Image.fromarray(rgb)
    image.save(tmp_path / f"x{suffix}")
    raw = load_raster(tmp_path / f"x{suffix}")
    assert raw.metadata["SourceMode"] == mode and raw.metadata["ColorConversion"] == conversion
    assert raw.is_color and raw.array.shape == (6, 4, 3)

    grey = ToModelChannels(1)(raw)
    assert grey.array.shape == (6, 4) and not grey.is_color
    np.testing.assert_allclose(grey.array[0, 0], ORANGE_Y, atol=1e-3)
    np.testing.assert_allclose(grey.array[5, 3], 29.07, atol=1e-3)
    assert grey.metadata["ColourPolicy"] == LUMA_POLICY
    assert grey.metadata["PhotometricInterpretation"] == "MONOCHROME2"
    assert grey.provenance[-1] == {"step": "ToModelChannels", "package": "clinfuse",
                                   "arguments": {"channels": 1, "policy": LUMA_POLICY}}


def test_cmyk_jpeg_and_ycbcr_become_rgb_then_luma(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8, 3), ORANGE, np.uint8)).convert("CMYK").save(
        tmp_path / "c.jpg", quality=100)
    volume = load_raster(tmp_path / "c.jpg")
    assert volume.metadata["ColorConversion"] == "CMYK -> RGB"
    # JPEG is lossy; luma within 3 grey levels of the orange's.
    assert abs(float(ToModelChannels(1)(volume).array.mean()) - ORANGE_Y) < 3


def test_grey_keeps_its_values_16_bit_included(tmp_path: Path) -> None:
    values = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    grey = ToModelChannels(1)(load_raster(tmp_path / "g16.png"))
    assert grey.array.dtype == np.uint16 and grey.array.T.tolist() == values.tolist()
    assert grey.metadata["ColourPolicy"] == "grey kept (values unchanged)"


def test_a_three_channel_model_takes_colour_as_is_and_grey_replicated(tmp_path: Path) -> None:
    Image.fromarray(_picture()).save(tmp_path / "c.png")
    Image.fromarray(np.full((4, 6), 77, np.uint8)).save(tmp_path / "g.png")
    colour = ToModelChannels(3)(load_raster(tmp_path / "c.png"))
    assert colour.array[0, 0].tolist() == list(ORANGE)
    assert colour.metadata["ColourPolicy"] == "colour kept as RGB (3 channels)"
    grey = ToModelChannels(3)(load_raster(tmp_path / "g.png"))
    assert grey.is_color and grey.array.shape == (6, 4, 3) and (grey.array == 77).all()
    assert grey.metadata["ColourPolicy"] == "grey replicated to 3 channels"
    with pytest.raises(ValueError, match=r"must be 1 \(grey\) or 3"):
        ToModelChannels(4)


def _secondary_capture(tmp_path: Path, photometric: str) -> Path:
    rgb = np.full((4, 6, 3), ORANGE, np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 4, 6, 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = photometric
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    path = tmp_path / f"{photometric}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_dicom_rgb_and_ybr_ultrasound_become_luma(tmp_path: Path, photometric: str) -> None:
    path = _secondary_capture(tmp_path, photometric)
    grey = model_volume(path, channels=1)
    assert grey.array.shape == (6, 4)
    # YBR_FULL round-trips through 8-bit rounding: within one grey level.
    np.testing.assert_allclose(grey.array, ORANGE_Y, atol=1.0)
    assert grey.metadata["ColourPolicy"] == LUMA_POLICY
    assert load_image(path).metadata["ColorConversion"] == (
        "none" if photometric == "RGB" else "YBR_FULL -> RGB")


def test_load_images_shares_the_policy_for_one_and_three_channel_models(tmp_path: Path) -> None:
    rgb = _picture()
    images = {"rgb.png": Image.fromarray(rgb),
              "rgba.png": Image.fromarray(np.dstack([rgb, np.full((4, 6), 128, np.uint8)])),
              "p.png": Image.fromarray(rgb).quantize(colors=2),
              "l.jpg": Image.fromarray(rgb).convert("L")}
    for name, image in images.items():
        image.save(tmp_path / name)
    pd.DataFrame({"patient_id": list("abcd"), "label": [0, 1, 0, 1],
                  "image": list(images)}).to_csv(tmp_path / "m.csv", index=False)
    manifest = read_manifest(tmp_path / "m.csv")
    rows = np.arange(4)
    grey = load_images(manifest, rows, preprocess_config(2, [4, 6]), 2, tmp_path / "cache")
    colour = load_images(manifest, rows, preprocess_config(2, [4, 6], channels=3), 2,
                         tmp_path / "cache")
    assert tuple(grey.tensors.shape) == (4, 1, 4, 6) and not grey.dropped
    assert tuple(colour.tensors.shape) == (4, 3, 4, 6)
    # The default window maps 0..255 to 0..1: orange's luma and its red channel.
    for i in range(3):
        assert float(grey.tensors[i, 0, 0, 0]) == pytest.approx(ORANGE_Y / 255, abs=2e-3)
        assert float(colour.tensors[i, 0, 0, 0]) == pytest.approx(200 / 255, abs=2e-3)
    # The JPEG was made grey by Pillow's own BT.601 conversion: the same luma.
    assert float(grey.tensors[3, 0, 0, 0]) == pytest.approx(ORANGE_Y / 255, abs=0.02)
