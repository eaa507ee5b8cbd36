"""``train`` on 2-D images: a site's pretrained weights, or a small CNN with a warning.

The weights file is a seeded resnet18 state dict generated here: it exercises the
loading path; it is not a model.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from models.artifact import load_artifact
from models.model_card import build_model_card
from models.pretrained import build_backbone, file_sha256
from pipelines.scoring import main_score
from pipelines.training import DEFAULT_CONFIG, main_train
from tests.pipelines.png_cohort import write_png_cohort

FAST: dict[str, Any] = {
    "notes": {"encoder": "tfidf"}, "workers": 1, "device": "cpu",
    "image": {"spatial_size_2d": [32, 32], "max_epochs": 2, "patience": 2, "batch_size": 16},
    "fusion": {"max_epochs": 60, "patience": 10}, "baseline_without_image": False,
}
if "learner" in DEFAULT_CONFIG.get("tabular", {}):  # the EHR learner's inner CV is not
    FAST["tabular"] = {"learner": "linear"}         # what these tests are about


def _config(tmp_path: Path, image: dict[str, Any]) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**FAST, "image": {**FAST["image"], **image}}))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_png_cohort(tmp_path_factory.mktemp("png"), 70, seed=5, size=32)


def test_pretrained_backbone_stays_frozen_and_is_recorded(cohort: Path, tmp_path: Path
                                                          ) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "site-resnet18.pt"
    file_state = build_backbone("resnet18", spatial_dims=2, in_channels=3, embedding_dim=1000,
                                frozen=False).net.state_dict()
    torch.save(file_state, weights)
    config = _config(tmp_path, {"pretrained_path": str(weights),
                                "pretrained_architecture": "resnet18"})
    err = io.StringIO()
    model = tmp_path / "model"
    assert main_train(cohort, model, config_path=config, stderr=err) == 0, err.getvalue()

    art = load_artifact(model, trusted_public_keys=None)
    choice = art.config["image"]["choice"]
    assert choice["network"] == "resnet18" and choice["pretrained_sha256"] == file_sha256(
        weights)
    assert choice["from_scratch_warning"] is False and "frozen" in choice["reason"]
    encoder = art.config["image"]["encoders"][0]
    assert encoder["pretrained"]["frozen"] is True and encoder["pretrained_path"] is None
    state = art.tensors["image_encoder_0"]
    # Frozen: every backbone weight and batch-norm statistic is the file's (the RGB
    # first convolution summed over its channels for the grey input).
    for key, value in file_state.items():
        if key.startswith("fc."):
            continue
        expected = value.sum(dim=1, keepdim=True) if key == "conv1.weight" else value
        assert torch.equal(state[f"backbone.net.{key}"], expected), key
    assert float(state["head.weight"].abs().sum()) > 0  # the probe's head was fitted
    card = build_model_card(art)["inputs"]["image_network"]
    assert card["pretrained_sha256"] == file_sha256(weights) and card["frozen"] is True
    # Scoring rebuilds the probe layout from the artifact alone, without the file.
    weights.unlink()
    assert main_score(model, cohort, tmp_path / "scores.csv",
                      trusted_keys=[Path(f"{model}.key.pub")], device="cpu",
                      stderr=err) == 0, err.getvalue()


def test_no_weights_on_2d_images_warns_and_trains_a_small_cnn(
        cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    err = io.StringIO()
    with caplog.at_level(logging.WARNING):
        assert main_train(cohort, tmp_path / "model", config_path=_config(tmp_path, {}),
                          stderr=err) == 0, err.getvalue()
    warnings = [r.getMessage() for r in caplog.records if "pretrained" in r.getMessage()]
    assert warnings == ["no pretrained weights: training a small CNN (compact) from scratch; "
                        "see docs/image-weights.md to plug in a site's weights "
                        "(image.pretrained_path)"]
    art = load_artifact(tmp_path / "model", trusted_public_keys=None)
    assert art.config["image"]["choice"]["network"] == "compact"
    assert build_model_card(art)["inputs"]["image_network"]["trained_from_scratch"] is True


def test_wrong_architecture_is_one_line_naming_a_key(cohort: Path, tmp_path: Path) -> None:
    weights = tmp_path / "densenet.pt"
    torch.save(build_backbone("densenet121", spatial_dims=2, in_channels=1, embedding_dim=2,
                              frozen=False).net.state_dict(), weights)
    err = io.StringIO()
    config = _config(tmp_path, {"pretrained_path": str(weights),
                                "pretrained_architecture": "resnet18"})
    assert main_train(cohort, tmp_path / "model", config_path=config, stderr=err) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clinfuse train: pretrained weights")
    assert "missing 'conv1.weight'" in lines[0]
