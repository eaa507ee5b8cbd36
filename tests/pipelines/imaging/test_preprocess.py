"""Preprocessing: orientation, spacing, window and shape as configured; deterministic."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from pipelines.imaging.preprocess import (
    Preprocess,
    PreprocessConfig,
    Preprocessd,
    VolumeToTensor,
    Window,
    WindowByModality,
)
from pipelines.imaging.volume import Volume

# LPS-oriented (as DICOM stores it), anisotropic: 0.8 x 0.8 x 3 mm.
LPS_AFFINE = np.array([[-0.8, 0.0, 0.0, 50.0],
                       [0.0, -0.8, 0.0, 60.0],
                       [0.0, 0.0, 3.0, -20.0],
                       [0.0, 0.0, 0.0, 1.0]])
MARK = (5, 7, 3)


def _volume(modality: str = "CT") -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1200, 2000, size=(40, 30, 10)).astype(np.int16)
    array[MARK] = 3000  # a locatable peak
    return Volume(array, LPS_AFFINE.copy(), {"Modality": modality, "SeriesInstanceUID": "1.2"},
                  [{"step": "read", "package": "test", "version": "0", "args": {}}])


def _config(**kw: object) -> PreprocessConfig:
    base: dict[str, object] = dict(spatial_size=(24, 20, 16), spacing=(1.5, 1.5, 2.0),
                                   windows={"CT": Window(-1000, 1000, 0.0, 1.0),
                                            "MR": Window(0, 500, -1.0, 1.0)})
    base.update(kw)
    return PreprocessConfig(**base)  # type: ignore[arg-type]


def test_output_matches_the_config() -> None:
    out = Preprocess(_config())(_volume())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (1, 24, 20, 16)
    affine = out.affine.numpy()
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), (1.5, 1.5, 2.0))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) > 0.5  # the window actually spans the data


def test_geometry_is_preserved_through_reorientation() -> None:
    # A lone bright voxel must end up at the same patient position (within a voxel).
    vol = _volume()
    vol.array[...] = -1000
    vol.array[MARK] = 1000
    out = Preprocess(_config(spatial_size=(48, 48, 24)))(vol)
    peak = np.unravel_index(int(out[0].argmax()), out.shape[1:])
    where_out = out.affine.numpy() @ [*peak, 1]
    where_in = LPS_AFFINE @ [*MARK, 1]
    assert np.allclose(where_out[:3], where_in[:3], atol=2.0)


def test_window_per_modality_and_resize_mode() -> None:
    out = Preprocess(_config(fit="resize"))(_volume("MR"))
    assert tuple(out.shape) == (1, 24, 20, 16)
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    assert float(out.min()) == pytest.approx(-1.0)  # negatives clipped to b_min
    with pytest.raises(KeyError, match="no intensity window for Modality 'PT'"):
        Preprocess(_config())(_volume("PT"))
    default = _config(windows={"default": Window(0, 1)})
    assert Preprocess(default)(_volume("PT")).shape == (1, 24, 20, 16)


def test_deterministic_and_provenance() -> None:
    vol = _volume()
    a = Preprocess(_config())(vol)
    b = Preprocess(_config())(vol)
    assert torch.equal(a, b)
    steps = [r["step"] for r in a.meta["provenance"]]
    assert steps == ["read", "VolumeToTensor", "Orientationd", "Spacingd",
                     "ScaleIntensityRange", "ResizeWithPadOrCropd"]
    assert all({"step", "package", "version", "args"} <= set(r) for r in a.meta["provenance"])
    assert a.meta["provenance"][3]["args"]["pixdim"] == [1.5, 1.5, 2.0]
    assert len(vol.provenance) == 1  # the input Volume is not modified


def test_config_round_trip_and_validation() -> None:
    cfg = _config()
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="spatial_size"):
        _config(spatial_size=(0, 2, 2))
    with pytest.raises(ValueError, match="a_max must exceed a_min"):
        Window(1, 1)
    with pytest.raises(ValueError, match="orientation"):
        _config(orientation="RRS")
    with pytest.raises(ValueError, match="unknown preprocess config keys"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "spcing": [1, 1, 1]})


def test_dict_form_and_constant_image_warning() -> None:
    out = Preprocessd(["ct"], _config())({"ct": _volume(), "label": 1})
    assert out["label"] == 1 and tuple(out["ct"].shape) == (1, 24, 20, 16)
    with pytest.raises(KeyError, match="ct"):
        Preprocessd(["ct"], _config())({"mr": _volume()})
    flat = Volume(np.zeros((4, 4, 4)), np.eye(4), {"Modality": "CT", "SeriesInstanceUID": "9"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        WindowByModality({"CT": Window(0, 1)})(VolumeToTensor()(flat))
    assert any("constant image" in str(w.message) and "9" in str(w.message) for w in caught)
