"""Pretrained image backbones from a local state-dict file: frozen features, linear probe.

A site brings its own weights (docs/image-weights.md): a torchvision, torchxrayvision
or MONAI-bundle state dict saved to a file. Nothing is ever downloaded. The file is
read with ``torch.load(..., weights_only=True)`` (tensors only, no pickled code) into a
MONAI network of a declared architecture:

``"densenet121"``
    ``monai.networks.nets.DenseNet121``. MONAI keys load as they are; torchvision and
    torchxrayvision keys (``features.denseblock1.denselayer1.norm1.weight``) are mapped
    to MONAI's (``...denselayer1.layers.norm1.weight``).
``"resnet18"``, ``"resnet34"``, ``"resnet50"``
    ``monai.networks.nets.ResNet`` with torchvision's layout (stride-2 stem, no bias on
    the shortcut convolution), so torchvision keys load as they are.

The file's classifier (``classifier.*``, ``fc.*``, ``class_layers.out.*``, torchxrayvision's
``op_threshs``) is dropped: the backbone's pooled features feed a new linear map to the
embedding, and the encoder's head turns that into a logit. Projection and head compose
to one linear map of the frozen features, so with ``finetune=False`` the image model is
a (rank-limited) linear probe; its batch-norm statistics stay those of the file.

Channels: a pretrained first convolution over 3 channels given 1-channel (BT.601 grey)
input is summed over its input channels, which is what the RGB network computes on a
grey image replicated to RGB; a 1-channel convolution given 3 channels is replicated
and divided by 3. Any other mismatch is refused in one line naming the key.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

__all__ = ["ARCHITECTURES", "PretrainedError", "ProbeBackbone", "build_backbone",
           "file_sha256", "load_pretrained"]

#: Architectures a pretrained file may be declared as.
ARCHITECTURES = ("densenet121", "resnet18", "resnet34", "resnet50")

_RESNET = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
           "resnet50": ("bottleneck", [3, 4, 6, 3])}
# Keys of the file's own classifier, replaced by the embedding layer and head.
_CLASSIFIER = re.compile(r"^(classifier|fc|class_layers\.out|op_threshs)(\.|$)")
_FIRST_CONV = {"densenet121": "features.conv0.weight", "resnet18": "conv1.weight",
               "resnet34": "conv1.weight", "resnet50": "conv1.weight"}
# torchvision's dense layers hold norm1/conv1/norm2/conv2 directly; MONAI's in ``layers``.
_TV_DENSE = re.compile(r"^(features\.denseblock\d+\.denselayer\d+)\.(?!layers\.)")


class PretrainedError(ValueError):
    """A pretrained file that cannot be used; the message is one line."""


class ProbeBackbone(nn.Module):
    """A MONAI backbone whose last linear layer (``head_name``) maps pooled features to
    the embedding; with ``frozen`` every other module stays in eval mode with no
    gradient, so training moves the probe only and the batch-norm statistics stay put."""

    def __init__(self, net: nn.Module, head_name: str, frozen: bool) -> None:
        super().__init__()
        self.net = net
        self.head_name = head_name
        self.frozen = frozen
        if frozen:
            for name, param in net.named_parameters():
                param.requires_grad_(name.startswith(head_name + "."))

    def train(self, mode: bool = True) -> ProbeBackbone:
        super().train(mode)
        if self.frozen:
            for name, module in self.net.named_modules():
                if name and not (name == self.head_name or name.startswith(self.head_name + ".")
                                 or self.head_name.startswith(name + ".")):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def build_backbone(architecture: str, *, spatial_dims: int, in_channels: int,
                   embedding_dim: int, frozen: bool) -> ProbeBackbone:
    """A randomly initialised backbone of ``architecture`` (load weights afterwards)."""
    net: nn.Module
    if architecture == "densenet121":
        net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels,
                          out_channels=embedding_dim)
        head = "class_layers.out"
    elif architecture in _RESNET:
        block, layers = _RESNET[architecture]
        net = ResNet(block=block, layers=layers, block_inplanes=[64, 128, 256, 512],
                     spatial_dims=spatial_dims, n_input_channels=in_channels,
                     conv1_t_stride=2, bias_downsample=False, num_classes=embedding_dim)
        head = "fc"
    else:
        raise PretrainedError(f"unknown pretrained architecture {architecture!r}; choose "
                              f"from {list(ARCHITECTURES)}")
    return ProbeBackbone(net, head, frozen)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local state-dict file; one-line :class:`PretrainedError` otherwise.

    Accepts a plain state dict, one wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}`` (Lightning, MONAI bundles), and DataParallel's ``module.`` prefix.
    """
    p = Path(path)
    if not p.is_file():
        raise PretrainedError(f"pretrained weights {p} do not exist (weights are never "
                              "downloaded; give a local file)")
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: not a weights file
        raise PretrainedError(f"pretrained weights {p}: not a PyTorch state-dict file "
                              f"({type(exc).__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise PretrainedError(f"pretrained weights {p}: not a state dict (a mapping of "
                              "parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(backbone: ProbeBackbone, architecture: str, path: str | Path) -> str:
    """Load ``path`` into ``backbone`` (all but its embedding layer); returns its sha256.

    Raises
    ------
    PretrainedError
        Missing file, not a state dict, or weights of another architecture (the first
        missing or unexpected key, or a shape mismatch, named).
    """
    state = read_state_dict(path)
    if architecture == "densenet121":
        state = {_TV_DENSE.sub(r"\1.layers.", k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _CLASSIFIER.match(k)}
    own = {k: v for k, v in backbone.net.state_dict().items()
           if not k.startswith(backbone.head_name + ".")}
    where = f"pretrained weights {Path(path)} (declared {architecture})"
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        key = missing[0] if missing else unexpected[0]
        raise PretrainedError(f"{where}: not this architecture: {len(missing)} missing and "
                              f"{len(unexpected)} unexpected keys, e.g. "
                              f"{'missing' if missing else 'unexpected'} {key!r}")
    first = _FIRST_CONV[architecture]
    for key, target in own.items():
        value = state[key]
        if key == first and value.ndim == target.ndim and value.shape[1] != target.shape[1] \
                and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            if target.shape[1] == 1:  # RGB weights, grey input: R+G+B of a replicated grey
                value = value.sum(dim=1, keepdim=True)
            elif value.shape[1] == 1:
                value = value.repeat(1, target.shape[1], *([1] * (value.ndim - 2))) \
                    / target.shape[1]
            state[key] = value
        if state[key].shape != target.shape:
            raise PretrainedError(f"{where}: shape mismatch at {key!r}: file "
                                  f"{tuple(value.shape)}, network {tuple(target.shape)}")
    backbone.net.load_state_dict(state, strict=False)
    return file_sha256(path)
