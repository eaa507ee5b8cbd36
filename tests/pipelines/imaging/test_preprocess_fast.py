"""The axis-by-axis (NumPy) preprocessing path against the MONAI transforms it replaces."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from pipelines.imaging.preprocess import Preprocess, PreprocessConfig, Window
from pipelines.imaging.separable import affine_axis_maps, apply_maps, interpolate_map
from pipelines.imaging.volume import Volume

LPS_AFFINE = np.array([[-0.8, 0.0, 0.0, 50.0],
                       [0.0, -0.8, 0.0, 60.0],
                       [0.0, 0.0, 3.0, -20.0],
                       [0.0, 0.0, 0.0, 1.0]])
# Coronal slices: columns run head -> foot, slices stack front -> back (axes swapped).
CORONAL_AFFINE = np.array([[-0.7, 0.0, 0.0, 40.0],
                           [0.0, 0.0, 2.5, -30.0],
                           [0.0, -0.7, 0.0, 90.0],
                           [0.0, 0.0, 0.0, 1.0]])


def _smooth(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[:3]], indexing="ij")
    body = 1500.0 * np.exp(-sum(g**2 for g in grids) * 3) - 1000.0
    if len(shape) == 4:
        body = body[..., None] + 100.0 * np.arange(shape[3])
    return (body + rng.normal(0, 30, shape)).astype(np.float32)


def _config(**kw: object) -> PreprocessConfig:
    base: dict[str, object] = dict(spatial_size=(24, 20, 16), spacing=(1.5, 1.5, 2.0),
                                   windows={"CT": Window(-1000, 1000, 0.0, 1.0)})
    base.update(kw)
    return PreprocessConfig(**base)  # type: ignore[arg-type]


def _both(volume: Volume, config: PreprocessConfig) -> tuple[MetaTensor, MetaTensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = Preprocess(config)(volume)
        ref = Preprocess(config, implementation="monai")(volume)
    return fast, ref


def _volume(array: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> Volume:
    return Volume(array, affine.copy(), {"Modality": "CT", "SeriesInstanceUID": "1.2"},
                  [{"step": "read", "package": "test", "version": "0", "args": {}}])


@pytest.mark.parametrize("affine", [LPS_AFFINE, CORONAL_AFFINE], ids=["axial", "coronal"])
@pytest.mark.parametrize("fit", ["resize", "crop_pad"])
def test_bilinear_matches_monai(affine: np.ndarray, fit: str) -> None:
    volume = _volume(_smooth((40, 30, 12)), affine)
    fast, ref = _both(volume, _config(fit=fit))
    assert fast.shape == ref.shape and fast.dtype == torch.float32
    assert np.allclose(fast.affine.numpy(), ref.affine.numpy(), atol=1e-9)
    # MONAI resamples in float64, the NumPy path in float32.
    assert float((fast.as_tensor() - ref.as_tensor()).abs().max()) < 1e-5
    assert fast.as_tensor().is_contiguous()


@pytest.mark.parametrize("fit", ["resize", "crop_pad"])
def test_nearest_matches_monai_away_from_ties(fit: str) -> None:
    # Where a sample falls exactly half-way, either neighbour is nearest and the two
    # paths may round differently (float64 vs float32 positions); 0.75 -> 1.5 mm and
    # 1 -> 2 mm put no sample on a tie.
    affine = np.diag([-0.75, -0.75, 1.0, 1.0])
    affine[:3, 3] = (50.0, 60.0, -20.0)
    fast, ref = _both(_volume(_smooth((40, 30, 12)), affine),
                      _config(fit=fit, interpolation="nearest"))
    assert torch.equal(fast.as_tensor(), ref.as_tensor())


def test_fortran_ordered_4d_and_float64_inputs_match() -> None:
    array = np.asfortranarray(_smooth((20, 18, 10, 3)))
    fast, ref = _both(_volume(array), _config(spatial_size=(16, 16, 12), fit="resize"))
    assert fast.shape == (3, 16, 16, 12)
    assert float((fast.as_tensor() - ref.as_tensor()).abs().max()) < 1e-5
    wide = _volume(_smooth((20, 18, 10)).astype(np.float64))
    fast, ref = _both(wide, _config())
    assert float((fast.as_tensor() - ref.as_tensor()).abs().max()) < 1e-5


def test_no_spacing_step_is_a_pure_reorientation() -> None:
    array = _smooth((20, 18, 10))
    fast, ref = _both(_volume(array), _config(spacing=None, spatial_size=(20, 18, 10)))
    assert torch.equal(fast.as_tensor(), ref.as_tensor())


def test_rotated_grid_matches_and_2d_falls_back_to_monai() -> None:
    # Spacing keeps the input's axis directions, so a rotated grid is still axis-aligned
    # with its resampled self.
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.8, 3.0])
    fast, ref = _both(_volume(_smooth((30, 30, 8)), affine), _config())
    assert fast.meta["provenance"][-1]["package"] == "clinfuse"
    assert float((fast.as_tensor() - ref.as_tensor()).abs().max()) < 1e-5
    flat = Volume(_smooth((30, 30, 1))[..., 0], np.diag([0.8, 0.8, 1.0, 1.0]),
                  {"Modality": "CT"})
    fast, ref = _both(flat, _config(spatial_size=(16, 16, 1)))
    assert fast.meta["provenance"][-1]["package"] == "monai"
    assert torch.equal(fast.as_tensor(), ref.as_tensor())


def test_provenance_names_the_reproduced_steps() -> None:
    fast, ref = _both(_volume(_smooth((40, 30, 12))), _config())
    steps = [r["step"] for r in fast.meta["provenance"]]
    assert steps == [r["step"] for r in ref.meta["provenance"]] == [
        "read", "VolumeToTensor", "Orientationd", "Spacingd", "ScaleIntensityRange",
        "ResizeWithPadOrCropd"]
    for fast_record, ref_record in zip(fast.meta["provenance"], ref.meta["provenance"],
                                       strict=True):
        assert fast_record["args"] == ref_record["args"]
    assert fast.meta["provenance"][3]["package"] == "clinfuse"
    assert fast.meta["provenance"][3]["reproduces"].endswith("Spacingd")
    assert fast.meta["Modality"] == ref.meta["Modality"] == "CT"


def test_constant_image_warns_on_both_paths() -> None:
    flat = _volume(np.full((10, 10, 6), 5.0, dtype=np.float32))
    for implementation in ("auto", "monai"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # No spacing step: resampling would zero-pad the edges and break the constancy.
            Preprocess(_config(spacing=None, spatial_size=(10, 10, 6)),
                       implementation=implementation)(flat)  # type: ignore[arg-type]
        assert any("constant image" in str(w.message) for w in caught), implementation
    with pytest.raises(ValueError, match="implementation must be one of"):
        Preprocess(_config(), implementation="torch")  # type: ignore[arg-type]


def test_separable_maps_reproduce_torch() -> None:
    data = torch.from_numpy(_smooth((13, 9, 7)))[None]
    out = apply_maps(data.numpy(), [interpolate_map(d, n, m, "bilinear")
                                    for d, (n, m) in enumerate(zip((13, 9, 7), (5, 11, 7),
                                                                   strict=True))])
    ref = torch.nn.functional.interpolate(data[None], size=(5, 11, 7), mode="trilinear")[0]
    assert float((torch.from_numpy(out) - ref).abs().max()) < 1e-3  # HU-scale values
    # A shear cannot be done axis by axis.
    shear = np.eye(4)
    shear[0, 1] = 0.3
    assert affine_axis_maps(shear, (4, 4, 4), (4, 4, 4), "bilinear") is None
