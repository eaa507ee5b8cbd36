"""The image encoder: a MONAI network -> an embedding plus an auxiliary logit.

Networks (``network`` in the model config):

``"compact"``
    What "auto" trains from scratch (2-D, or 3-D on CPU) when no pretrained
    weights are given: four strided ``monai.networks.blocks.Convolution`` blocks
    (conv, batch norm, PReLU) and global average pooling, ~0.3 M parameters. The
    pooling keeps "how much of the volume looks like X", which is what a
    lesion-burden signal is; batch (not instance) norm keeps absolute intensity.
``"burden"``
    The previous CPU default: a lesion-burden network, ~200 parameters. The volume is
    average-pooled by ``downsample`` (2: 32x64x64 becomes 16x32x32), a per-voxel
    MLP of MONAI ``Convolution`` blocks (kernel 1, PReLU) maps each voxel to a few
    non-negative "looks like X" scores, and the embedding is the log of their means
    over the volume: "how much of the volume looks like X", the quantity a lesion
    burden is, on a log scale. No normalisation layer, so absolute intensity (the
    CT window) is kept, and no batch statistics make validation losses jump. An
    epoch over 1,600 series of 32x64x64 takes ~10-25 s on 2 cores.
``"threshold"``
    The synth recipe's CPU network (tuned to the synthetic lesion; "auto" never
    picks it): a soft voxel count above learned intensity thresholds,
    ~150 parameters. A kernel-1 MONAI ``Convolution`` gives each voxel ``maps``
    scores ``slope_k (x - t_k)``; their sigmoids are soft "brighter than t_k"
    indicators, and the embedding is the log of each indicator's mean over the
    volume at full resolution: the log volume above each threshold, the quantity a
    lesion burden is. The thresholds start spread over the windowed intensity
    range ``[0, 1]``, so some map already separates lesion from tissue before
    training; the head then picks and refines them. Unlike ``"burden"`` it needs
    no pooling (a partial-volume voxel would blur the count) and its score does not
    scale with how bright the lesion is. An epoch over 1,600 series of 32x64x64
    takes ~10-20 s on 2 cores.
``"densenet121"``
    The GPU default: ``monai.networks.nets.DenseNet121`` with its classifier
    replaced by the embedding layer.
``"resnet18"``, ``"resnet34"``, ``"resnet50"``
    MONAI ``ResNet`` in torchvision's layout; with ``pretrained_path`` (as
    ``"densenet121"``) a pretrained backbone, :mod:`models.pretrained`.
``"auto"``
    With ``pretrained_path``: the pretrained backbone of ``pretrained_architecture``,
    frozen with a linear probe (``finetune=True`` trains it all). Without: ``densenet121``
    for 3-D on CUDA, else ``compact``, trained from scratch. ``auto`` never picks
    ``threshold`` or ``burden``: they are tuned to the synthetic cohort's bright lesion
    and stay available by name (the synth recipe, :mod:`pipelines.synth.recipe`, names
    them).

``spatial_dims`` is 3 for CT/MR volumes (input ``(N, 1, X, Y, Z)``) and 2 for
radiographs and PNG/JPEG images (``(N, 1, X, Y)``). ``pretrained_path`` loads a
local state dict; nothing is ever downloaded (docs/image-weights.md).

:class:`ImageEncoder` is the scikit-learn style wrapper used in stage 1 of
training: it fits the network on labelled images through the auxiliary head
(early stopping on a validation split), then ``embed`` gives the frozen
embeddings that the fusion model consumes.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet121
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from torch import nn

from models.device import autocast, exact_math, resolve_device
from models.pretrained import (
    ARCHITECTURES,
    PretrainedError,
    build_backbone,
    load_pretrained,
    read_state_dict,
)

__all__ = ["NETWORKS", "BurdenEncoder", "CompactEncoder", "ImageEncoder", "ImageNetwork",
           "ThresholdEncoder", "build_network", "count_parameters", "resolve_network"]

log = logging.getLogger(__name__)

NETWORKS = ("threshold", "burden", "compact", "densenet121", "resnet18", "resnet34",
            "resnet50", "auto")
_INVALID_NETWORK = "Unrecognised image network {0!r}; choose from {1}"


class CompactEncoder(nn.Module):
    """Strided MONAI convolution blocks + global average pooling -> ``out_channels``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            blocks.append(Convolution(spatial_dims, channels, width, strides=2, kernel_size=3,
                                      act="PRELU", norm="BATCH"))
            channels = width
        self.features = nn.Sequential(*blocks)
        self.out = nn.Linear(channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.out(h.flatten(2).mean(dim=2))


class BurdenEncoder(nn.Module):
    """Average-pool, per-voxel MLP to ``maps`` non-negative scores, log of their means.

    ``log(mean_v softplus(s_k(x_v)))`` never saturates (its gradient is scale-free),
    so no score map can die during training the way a thresholded count would.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *,
                 width: int = 8, maps: int = 4, downsample: int = 2) -> None:
        super().__init__()
        self.downsample = downsample
        self.pool: nn.Module = (nn.AvgPool3d(downsample) if spatial_dims == 3
                                else nn.AvgPool2d(downsample))
        self.voxel = nn.Sequential(
            Convolution(spatial_dims, in_channels, width, kernel_size=1, act="PRELU",
                        norm=None),
            Convolution(spatial_dims, width, maps, kernel_size=1, conv_only=True))
        self.out = nn.Linear(maps, out_channels)
        # Start with near-empty score maps (softplus(-5) ~ 0.007 per voxel): a burden
        # detector should see the few voxels it raises, not a background-filled mean.
        last = self.voxel[-1].conv
        assert isinstance(last, nn.Conv2d | nn.Conv3d) and last.bias is not None
        nn.init.constant_(last.bias, -5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample > 1:
            x = self.pool(x)
        scores = nn.functional.softplus(self.voxel(x)).flatten(2).mean(dim=2)
        return self.out(torch.log(scores + 1e-8))


class ThresholdEncoder(nn.Module):
    """Log of the soft fraction of voxels above each of ``maps`` learned thresholds.

    Parameters
    ----------
    spatial_dims, in_channels, out_channels : int
    maps : int, default=8
        Thresholds; they start evenly spread over ``(0, 1)``, the windowed range.
    slope : float, default=40.0
        Initial steepness of each indicator (per unit of windowed intensity).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *,
                 maps: int = 8, slope: float = 40.0) -> None:
        super().__init__()
        self.voxel = Convolution(spatial_dims, in_channels, maps, kernel_size=1,
                                 conv_only=True)
        self.out = nn.Linear(maps, out_channels)
        conv = self.voxel.conv
        assert isinstance(conv, nn.Conv2d | nn.Conv3d) and conv.bias is not None
        thresholds = (torch.arange(maps, dtype=torch.float32) + 0.5) / maps
        with torch.no_grad():
            conv.weight.fill_(slope / in_channels)
            conv.bias.copy_(-slope * thresholds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fraction = torch.sigmoid(self.voxel(x)).flatten(2).mean(dim=2)
        return self.out(torch.log(fraction + 1e-6))


class ImageNetwork(nn.Module):
    """Backbone -> embedding; ``head`` turns the embedding into the auxiliary logit."""

    pretrained_sha256: str | None

    def __init__(self, backbone: nn.Module, embedding_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(embedding_dim, 1)
        self.pretrained_sha256 = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.backbone(x)
        return embedding, self.head(embedding).squeeze(-1)


def resolve_network(network: str, *, spatial_dims: int, device_type: str,
                    pretrained_path: str | Path | None,
                    pretrained_architecture: str = "densenet121") -> str:
    """The network "auto" stands for (any other name is returned as it is).

    A pretrained file makes it the declared architecture; without one, a general
    network trained from scratch: densenet121 for 3-D on CUDA, compact otherwise. Never
    the synthetic-lesion networks (threshold, burden).
    """
    if network != "auto":
        return network
    if pretrained_path is not None:
        return pretrained_architecture
    return "densenet121" if spatial_dims == 3 and device_type == "cuda" else "compact"


def build_network(network: str, *, spatial_dims: int, in_channels: int = 1,
                  embedding_dim: int = 64, pretrained_path: str | Path | None = None,
                  probe: bool = False, finetune: bool = False) -> ImageNetwork:
    """The network named ``network``, weights from a local file.

    ``probe`` (implied by ``pretrained_path`` for the architectures of
    :mod:`models.pretrained`) builds the pretrained-backbone layout, frozen unless
    ``finetune``; with ``pretrained_path`` the file is loaded into it and its sha256 is
    ``net.pretrained_sha256``.

    Raises
    ------
    ValueError
        Unknown network or spatial_dims, or a pretrained file that does not fit
        (:class:`models.pretrained.PretrainedError`, one line).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if network in ARCHITECTURES and (probe or pretrained_path is not None):
        probe_backbone = build_backbone(network, spatial_dims=spatial_dims,
                                        in_channels=in_channels, embedding_dim=embedding_dim,
                                        frozen=not finetune)
        sha = (load_pretrained(probe_backbone, network, pretrained_path)
               if pretrained_path is not None else None)
        probe_net = ImageNetwork(probe_backbone, embedding_dim)
        probe_net.pretrained_sha256 = sha
        return probe_net
    backbone: nn.Module
    if network == "threshold":
        backbone = ThresholdEncoder(spatial_dims, in_channels, embedding_dim)
    elif network == "burden":
        backbone = BurdenEncoder(spatial_dims, in_channels, embedding_dim)
    elif network == "compact":
        backbone = CompactEncoder(spatial_dims, in_channels, embedding_dim)
    elif network == "densenet121":
        backbone = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels,
                               out_channels=embedding_dim)
    else:
        raise ValueError(_INVALID_NETWORK.format(network, [n for n in NETWORKS if n != "auto"]))
    net = ImageNetwork(backbone, embedding_dim)
    net.pretrained_sha256 = None
    if pretrained_path is not None:  # a warm start of a from-scratch network, all trained
        path = Path(pretrained_path)
        state = read_state_dict(path)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if len(missing) == len(list(backbone.state_dict())):
            raise PretrainedError(f"pretrained weights {path} match none of the {network} "
                                  "layers")
        log.info("loaded pretrained %s weights from %s (%d missing, %d unexpected keys)",
                 network, path, len(missing), len(unexpected))
    return net


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ImageEncoder(BaseEstimator):
    """Stage-1 image model: fit on labels through the auxiliary head, then embed.

    Parameters
    ----------
    network : {"auto", "threshold", "burden", "compact", "densenet121", "resnet18", \
"resnet34", "resnet50"}, default="auto"
        "auto" as :func:`resolve_network` says.
    spatial_dims : {2, 3}, default=3
    embedding_dim : int, default=64
    max_epochs : int, default=30
    patience : int, default=5
        Epochs without a better validation loss before stopping.
    batch_size : int, default=32
    lr : float, default=1e-3
    weight_decay : float, default=1e-4
    augment : bool, default=True
        Random flips along each spatial axis (from the estimator's own generator).
    seed : int, default=0
    device : str, default="auto"
    pretrained_path : str, optional
        A local state-dict file (never downloaded); for the architectures of
        :mod:`models.pretrained` the backbone is loaded from it and frozen.
    pretrained_architecture : str, default="densenet121"
        What "auto" builds around ``pretrained_path``.
    finetune : bool, default=False
        Train the pretrained backbone too (large cohorts), not only the linear probe.
    progress : bool, default=False
        tqdm bars per epoch.

    Attributes
    ----------
    network_ : ImageNetwork
        The fitted network (best validation epoch), in eval mode on CPU.
    network_name_ : str
        The network actually built ("auto" resolved).
    history_ : list of dict
        Per-epoch train loss, validation loss and AUROC.
    best_epoch_ : int
    pretrained_ : dict or None
        The pretrained file used: its name, sha256, architecture and whether the
        backbone was frozen.
    """

    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "network": NETWORKS, "spatial_dims": (2, 3), "pretrained_architecture": ARCHITECTURES,
    }

    def __init__(self, *, network: str = "auto",
                 spatial_dims: int = 3, embedding_dim: int = 64, max_epochs: int = 30,
                 patience: int = 5, batch_size: int = 32, lr: float = 1e-3,
                 weight_decay: float = 1e-4, augment: bool = True, seed: int = 0,
                 device: str = "auto", pretrained_path: str | None = None,
                 pretrained_architecture: str = "densenet121", finetune: bool = False,
                 progress: bool = False) -> None:
        self.network = network
        self.spatial_dims = spatial_dims
        self.embedding_dim = embedding_dim
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.augment = augment
        self.seed = seed
        self.device = device
        self.pretrained_path = pretrained_path
        self.pretrained_architecture = pretrained_architecture
        self.finetune = finetune
        self.progress = progress


    def _validate(self) -> None:
        for name, allowed in self._parameter_constraints.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("embedding_dim", "max_epochs", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def _check_input(self, X: torch.Tensor) -> None:
        if X.ndim != self.spatial_dims + 2:
            axes = "X, Y, Z" if self.spatial_dims == 3 else "X, Y"
            raise ValueError(f"expected images of shape (N, C, {axes}), got {tuple(X.shape)}")

    def fit(self, X: torch.Tensor, y: np.ndarray, X_val: torch.Tensor, y_val: np.ndarray
            ) -> ImageEncoder:
        """Train on (X, y) with early stopping on (X_val, y_val); returns self."""
        self._validate()
        self._check_input(X)
        self._check_input(X_val)
        y_t = torch.as_tensor(np.asarray(y), dtype=torch.float32)
        yv = np.asarray(y_val, dtype=float)
        if len(np.unique(np.asarray(y))) < 2:
            raise ValueError("the image training split has one class only; cannot train the "
                             "image encoder")
        device = resolve_device(self.device)
        name = resolve_network(self.network, spatial_dims=self.spatial_dims,
                               device_type=device.type, pretrained_path=self.pretrained_path,
                               pretrained_architecture=self.pretrained_architecture)
        torch.manual_seed(self.seed)
        net = build_network(name, spatial_dims=self.spatial_dims, in_channels=int(X.shape[1]),
                            embedding_dim=self.embedding_dim,
                            pretrained_path=self.pretrained_path,
                            finetune=bool(self.finetune)).to(device)
        probe = name in ARCHITECTURES and self.pretrained_path is not None
        self.pretrained_ = None if not probe else {
            "file": Path(str(self.pretrained_path)).name, "sha256": net.pretrained_sha256,
            "architecture": name, "frozen": not self.finetune}
        channels_last = device.type == "cuda" and self.spatial_dims == 3
        if channels_last:
            net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        # A frozen backbone has no gradient: only the probe (and head) are optimised.
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=self.lr,
                                weight_decay=self.weight_decay)
        steps = max(1, math.ceil(len(X) / self.batch_size)) * self.max_epochs
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps,
                                                    pct_start=0.15)
        gen = torch.Generator().manual_seed(self.seed)
        loss_fn = nn.BCEWithLogitsLoss()
        best, best_state, best_epoch, stale = math.inf, copy.deepcopy(net.state_dict()), 0, 0
        history: list[dict[str, float]] = []
        for epoch in range(1, self.max_epochs + 1):
            net.train()
            order = torch.randperm(len(X), generator=gen)
            total, seen = 0.0, 0
            batches = range(0, len(X), self.batch_size)
            for start in _bar(batches, self.progress, f"image encoder epoch {epoch}"):
                idx = order[start:start + self.batch_size]
                if len(idx) < 2:
                    continue  # batch norm needs two samples
                xb = X[idx].to(torch.float32)
                if self.augment:
                    xb = _flip(xb, gen, self.spatial_dims)
                xb = xb.to(device)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last_3d)
                with autocast(device):
                    _, logit = net(xb)
                    loss = loss_fn(logit.float(), y_t[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # no single batch blows up
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            val_logit = _predict(net, X_val, device, self.batch_size, channels_last)[1]
            val_loss = _bce(val_logit, yv)
            record = {"epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss,
                      "val_auroc": _auroc(yv, val_logit)}
            history.append(record)
            log.info("image encoder epoch %d: train loss %.4f, val loss %.4f, val AUROC %.3f",
                     epoch, record["train_loss"], val_loss, record["val_auroc"])
            if val_loss < best - 1e-4:
                best, best_state, best_epoch, stale = (val_loss, copy.deepcopy(net.state_dict()),
                                                       epoch, 0)
            else:
                stale += 1
                if stale >= self.patience:
                    break
        net.load_state_dict(best_state)
        self.network_ = net.to("cpu", memory_format=torch.contiguous_format  # type: ignore[call-overload]
                               ).eval()
        self.network_name_ = name
        self.in_channels_ = int(X.shape[1])
        self.history_ = history
        self.best_epoch_ = best_epoch
        return self

    def embed(self, X: torch.Tensor, *, device: str | None = None) -> np.ndarray:
        """Embeddings ``(N, embedding_dim)`` as float32, computed in float32."""
        return self._run(X, device)[0]

    def predict_logit(self, X: torch.Tensor, *, device: str | None = None) -> np.ndarray:
        """The auxiliary head's logits ``(N,)``."""
        return self._run(X, device)[1]

    def _run(self, X: torch.Tensor, device: str | None) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self, "network_")
        self._check_input(X)
        dev = resolve_device(device if device is not None else self.device)
        net = self.network_.to(dev)
        try:
            return _predict(net, X, dev, self.batch_size,
                            dev.type == "cuda" and self.spatial_dims == 3)
        finally:
            self.network_ = net.to("cpu")

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(config, state dict) for the artifact."""
        check_is_fitted(self, "network_")
        config = {**self.get_params(deep=False), "network_name": self.network_name_,
                  "best_epoch": self.best_epoch_, "in_channels": self.in_channels_,
                  "pretrained": getattr(self, "pretrained_", None)}
        config["pretrained_path"] = None  # the weights are in the artifact now
        return config, {k: v.detach().cpu().clone() for k, v in
                        self.network_.state_dict().items()}

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> ImageEncoder:
        """Rebuild a fitted encoder from :meth:`to_state` output."""
        params = {k: config[k] for k in (
            "network", "spatial_dims", "embedding_dim", "max_epochs", "patience", "batch_size",
            "lr", "weight_decay", "augment", "seed", "device", "pretrained_architecture",
            "finetune") if k in config}
        enc = cls(**params)
        pretrained = config.get("pretrained")
        net = build_network(config["network_name"], spatial_dims=int(config["spatial_dims"]),
                            in_channels=int(config.get("in_channels", 1)),
                            embedding_dim=int(config["embedding_dim"]),
                            probe=pretrained is not None,
                            finetune=bool(config.get("finetune", False)))
        net.load_state_dict(state)
        enc.network_ = net.eval()
        enc.network_name_ = config["network_name"]
        enc.in_channels_ = int(config.get("in_channels", 1))
        enc.history_ = []
        enc.best_epoch_ = int(config.get("best_epoch", 0))
        enc.pretrained_ = pretrained
        return enc


def _predict(net: nn.Module, X: torch.Tensor, device: torch.device, batch_size: int,
             channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    net.eval()
    embeddings, logits = [], []
    with torch.inference_mode(), exact_math():
        for start in range(0, len(X), batch_size):
            xb = X[start:start + batch_size].to(device=device, dtype=torch.float32)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last_3d)
            emb, logit = net(xb)
            embeddings.append(emb.float().cpu())
            logits.append(logit.float().cpu())
    if not embeddings:
        raise ValueError("no images given")
    return torch.cat(embeddings).numpy(), torch.cat(logits).numpy()


def _flip(x: torch.Tensor, gen: torch.Generator, spatial_dims: int) -> torch.Tensor:
    for axis in range(2, 2 + spatial_dims):
        flip = torch.rand(len(x), generator=gen) < 0.5
        if flip.any():
            x[flip] = x[flip].flip(axis)
    return x


def _bce(logit: np.ndarray, y: np.ndarray) -> float:
    z = np.asarray(logit, dtype=float)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def _bar(iterable: range, show: bool, desc: str) -> Any:
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, unit="batch")
