"""Pretrained backbones from a local state dict (issue 18): loading, refusals, the probe.

The state dicts are generated here from seeded networks: they test loading only; they
are not models.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.image_encoder import ImageEncoder, ImageNetwork, build_network, resolve_network
from models.pretrained import (
    ARCHITECTURES,
    PretrainedError,
    ProbeBackbone,
    build_backbone,
    file_sha256,
)
from pipelines.image_choice import choose_image_network


def _inner(net: ImageNetwork) -> nn.Module:
    """The MONAI network inside a pretrained-backbone image network."""
    assert isinstance(net.backbone, ProbeBackbone)
    return net.backbone.net


def _resnet_file(path: Path, in_channels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout resnet18 state dict with its own 1000-class ``fc``."""
    torch.manual_seed(seed)
    net = build_backbone("resnet18", spatial_dims=2, in_channels=in_channels,
                         embedding_dim=1000, frozen=False).net
    with torch.no_grad():  # batch-norm statistics that are not the defaults
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


def test_grey_input_computes_what_the_rgb_network_computes_on_replicated_grey(
        tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    state = _resnet_file(path)
    grey = build_network("resnet18", spatial_dims=2, in_channels=1, embedding_dim=8,
                         pretrained_path=path)
    rgb = build_network("resnet18", spatial_dims=2, in_channels=3, embedding_dim=8,
                        pretrained_path=path)
    # Same probe on both, so only the backbones are compared.
    _inner(rgb).get_submodule("fc").load_state_dict(_inner(grey).get_submodule("fc")
                                                    .state_dict())
    rgb.head.load_state_dict(grey.head.state_dict())
    x = torch.rand(3, 1, 32, 32)
    grey.eval(), rgb.eval()
    with torch.no_grad():
        e1, _ = grey(x)
        e3, _ = rgb(x.repeat(1, 3, 1, 1))
    torch.testing.assert_close(e1, e3, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_inner(grey).state_dict()["conv1.weight"],
                               state["conv1.weight"].sum(dim=1, keepdim=True))
    assert grey.pretrained_sha256 == file_sha256(path)


def test_refusals_are_one_line_and_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    _resnet_file(path)
    cases = {
        "missing": (tmp_path / "absent.pt", "densenet121", 2, "do not exist"),
        "wrong architecture": (path, "densenet121", 2, "missing 'features.conv0.weight'"),
        "2-D weights, 3-D network": (path, "resnet18", 3, "shape mismatch at 'conv1.weight'"),
    }
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    cases["not a weights file"] = (text, "resnet18", 2, "not a PyTorch state-dict file")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    cases["a tensor, not a state dict"] = (tensor, "resnet18", 2, "not a state dict")
    extra = tmp_path / "extra.pt"
    torch.save({**torch.load(path, weights_only=True), "layer5.0.conv1.weight":
                torch.zeros(1)}, extra)
    cases["an unexpected key"] = (extra, "resnet18", 2, "unexpected 'layer5.0.conv1.weight'")
    for name, (file, arch, dims, expected) in cases.items():
        with pytest.raises(PretrainedError) as info:
            build_network(arch, spatial_dims=dims, in_channels=1, embedding_dim=8,
                          pretrained_path=file)
        message = str(info.value)
        assert expected in message, (name, message)
        assert "\n" not in message, name


def test_torchvision_densenet_keys_load_into_monai_densenet(tmp_path: Path) -> None:
    torch.manual_seed(1)
    monai_net = build_backbone("densenet121", spatial_dims=2, in_channels=3,
                               embedding_dim=4, frozen=False).net
    # torchvision's names: no ``layers.`` level inside a dense layer, a ``classifier``.
    tv = {k.replace(".layers.", "."): v.clone() for k, v in monai_net.state_dict().items()
          if not k.startswith("class_layers")}
    assert "features.denseblock1.denselayer1.norm1.weight" in tv
    tv |= {"classifier.weight": torch.zeros(1000, 1024), "classifier.bias": torch.zeros(1000)}
    torch.save(tv, tmp_path / "tv.pt")
    net = build_network("densenet121", spatial_dims=2, in_channels=3, embedding_dim=4,
                        pretrained_path=tmp_path / "tv.pt")
    loaded = _inner(net).state_dict()
    for key, value in monai_net.state_dict().items():
        if not key.startswith("class_layers"):
            torch.testing.assert_close(loaded[key], value)


def test_frozen_fit_moves_only_the_probe(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    state = _resnet_file(path, in_channels=1)
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 12)
    X = torch.rand(24, 1, 32, 32) + torch.as_tensor(y, dtype=torch.float32)[:, None, None,
                                                                              None] * 0.3
    enc = ImageEncoder(network="auto", spatial_dims=2, embedding_dim=8, max_epochs=2,
                       patience=2, batch_size=8, pretrained_path=str(path),
                       pretrained_architecture="resnet18", device="cpu", seed=3)
    torch.manual_seed(3)
    initial = build_network("resnet18", spatial_dims=2, in_channels=1, embedding_dim=8,
                            probe=True)
    enc.fit(X, y, X[rng.permutation(24)[:8]], y[rng.permutation(24)[:8]])
    assert enc.network_name_ == "resnet18"
    assert enc.pretrained_ == {"file": "resnet18.pt", "sha256": file_sha256(path),
                               "architecture": "resnet18", "frozen": True}
    after = _inner(enc.network_).state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(after[key], value), key  # weights and BN statistics alike
    assert not torch.equal(after["fc.weight"], _inner(initial).state_dict()["fc.weight"])
    # The artifact round trip rebuilds the probe layout without the file.
    config, tensors = enc.to_state()
    assert config["pretrained_path"] is None and config["pretrained"]["sha256"]
    again = ImageEncoder.from_state(config, tensors)
    np.testing.assert_allclose(again.predict_logit(X), enc.predict_logit(X), rtol=1e-5)


def test_finetune_trains_the_backbone(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    state = _resnet_file(path, in_channels=1)
    y = np.array([0, 1] * 8)
    enc = ImageEncoder(network="resnet18", spatial_dims=2, embedding_dim=4, max_epochs=1,
                       batch_size=8, pretrained_path=str(path), finetune=True, device="cpu")
    enc.fit(torch.rand(16, 1, 32, 32), y, torch.rand(4, 1, 32, 32), y[:4])
    assert enc.pretrained_ is not None and enc.pretrained_["frozen"] is False
    assert not torch.equal(_inner(enc.network_).state_dict()["layer1.0.conv1.weight"],
                           state["layer1.0.conv1.weight"])


@pytest.mark.parametrize("dims, device, expected", [(2, "cpu", "compact"),
                                                    (2, "cuda", "compact"),
                                                    (3, "cpu", "compact"),
                                                    (3, "cuda", "densenet121")])
def test_auto_never_picks_the_synthetic_lesion_networks(dims: int, device: str,
                                                        expected: str) -> None:
    assert resolve_network("auto", spatial_dims=dims, device_type=device,
                           pretrained_path=None) == expected
    for arch in ARCHITECTURES:
        assert resolve_network("auto", spatial_dims=dims, device_type=device,
                               pretrained_path="w.pt", pretrained_architecture=arch) == arch
    assert resolve_network("threshold", spatial_dims=dims, device_type=device,
                           pretrained_path=None) == "threshold"


def test_choice_by_manifest_and_config(caplog: pytest.LogCaptureFixture) -> None:
    auto = {"network": "auto", "pretrained_path": None}
    synth = {"generator": {"name": "clinfuse synth", "seed": 0, "bias": False}}
    hard = {"generator": {"name": "clinfuse synth", "seed": 0, "realism": "hard"}}
    with caplog.at_level(logging.WARNING, logger="pipelines.image_choice"):
        # The default synthetic world: its recipe names the lesion network, no warning.
        name, record = choose_image_network(auto, device="cpu", spatial_dims=3, sidecar=synth)
        assert (name, record["from_scratch_warning"]) == ("threshold", False)
        assert "recipe" in record["reason"] and not caplog.records
        # Any other cohort, 3-D or 2-D (the hard world's radiographs): a general CNN.
        for sidecar, dims in (({}, 3), (hard, 2), ({"generator": {"name": "x"}}, 2)):
            name, record = choose_image_network(auto, device="cpu", spatial_dims=dims,
                                                sidecar=sidecar)
            assert (name, record["from_scratch_warning"]) == ("compact", True)
        assert len(caplog.records) == 3
        assert all("no pretrained weights" in r.getMessage() for r in caplog.records)
        # Named networks and weights files win over the recipe.
        assert choose_image_network({"network": "burden", "pretrained_path": None},
                                    device="cpu", spatial_dims=2, sidecar={})[0] == "burden"
        name, record = choose_image_network(
            {**auto, "pretrained_path": "w.pt", "pretrained_architecture": "resnet18"},
            device="cpu", spatial_dims=3, sidecar=synth)
        assert (name, record["pretrained"], record["finetune"]) == ("resnet18", True, False)
        assert len(caplog.records) == 3
