"""Occlusion saliency finds the region the score reads; overlays are cached per series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.saliency import occlusion_saliency
from pipelines.saliency_overlay import cached_saliency


def _score(batch: torch.Tensor) -> np.ndarray:
    """A 'model' whose logit is the mean intensity of the block x 8:16, y 8:16, z 4:6."""
    return batch[:, 0, 8:16, 8:16, 4:6].mean(dim=(1, 2, 3)).double().numpy()


def _image() -> torch.Tensor:
    img = torch.zeros(1, 32, 32, 8)
    img[0, 8:16, 8:16, 4:6] = 1.0
    return img


def test_occlusion_finds_the_lesion_slices() -> None:
    sal = occlusion_saliency(_image(), _score)
    assert sal.heatmap.shape == (32, 32, 8)
    assert set(sal.top_slices[:2]) == {4, 5}
    assert sal.heatmap[8:16, 8:16, 4:6].min() > 0
    assert np.abs(sal.heatmap[24:, 24:, :]).max() == 0


def test_2d_image() -> None:
    img = torch.zeros(1, 16, 16)
    img[0, :4, :4] = 1.0
    sal = occlusion_saliency(img, lambda b: b[:, 0, :4, :4].mean(dim=(1, 2)).double().numpy())
    assert sal.top_slices == [0] and sal.heatmap[:4, :4].min() > 0


def test_cached_once_with_png_overlays_and_alt_text(tmp_path: Path) -> None:
    calls = []

    def counting(batch: torch.Tensor) -> np.ndarray:
        calls.append(len(batch))
        return _score(batch)

    first, folder = cached_saliency(tmp_path, "series1", "model1", _image(), counting)
    n_calls = len(calls)
    again, folder2 = cached_saliency(tmp_path, "series1", "model1", _image(), counting)
    assert len(calls) == n_calls and again == first and folder2 == folder
    assert len(first["overlays"]) == 3
    for entry in first["overlays"]:
        with Image.open(folder / entry["file"]) as png:
            assert png.format == "PNG" and png.size[0] > 50
        assert "slice" in entry["alt_text"] and entry["alt_text"].endswith(".")
    assert first["top_slices"][0] in (4, 5)
