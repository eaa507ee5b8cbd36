"""Which image network ``train`` builds, and why: the record kept in artifact and card.

Order: a network named in the config wins; with ``image.network: auto`` and no
``image.pretrained_path`` the synth recipe (:mod:`pipelines.synth.recipe`) names one for
the default synthetic world's manifests; otherwise :func:`models.image_encoder.resolve_network`
decides: the pretrained backbone when a weights file is given (frozen with a linear
probe, or fine-tuned with ``image.finetune``), else a network trained from scratch, with
a one-line warning (docs/image-weights.md). Nothing is downloaded.
"""

from __future__ import annotations

import logging
from typing import Any

from models.device import resolve_device
from models.image_encoder import resolve_network
from pipelines.synth.recipe import RECIPE_NAME, recipe_image_network

__all__ = ["NO_WEIGHTS_WARNING", "choose_image_network"]

log = logging.getLogger(__name__)

NO_WEIGHTS_WARNING = ("no pretrained weights: training a {what} from scratch; see "
                      "docs/image-weights.md to plug in a site's weights "
                      "(image.pretrained_path)")


def choose_image_network(image_cfg: dict[str, Any], *, device: str, spatial_dims: int,
                         sidecar: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(network name, choice record) for the training config's ``image`` section.

    The record has ``network``, ``reason``, ``pretrained`` (True when a weights file
    is given; its sha256 is in each encoder's config), ``finetune`` and
    ``from_scratch_warning``. Logs the warning when "auto" trains from scratch.
    """
    network = str(image_cfg["network"])
    path = image_cfg.get("pretrained_path")
    finetune = bool(image_cfg.get("finetune", False))
    record: dict[str, Any] = {"requested": network, "pretrained": path is not None,
                              "finetune": finetune if path is not None else None,
                              "from_scratch_warning": False}
    device_type = resolve_device(device).type
    if network != "auto":
        return network, {**record, "network": network, "reason": "named in the config"}
    if path is None:
        named = recipe_image_network(sidecar, device_type)
        if named is not None:
            return named, {**record, "network": named, "reason": RECIPE_NAME}
    name = resolve_network(network, spatial_dims=spatial_dims, device_type=device_type,
                           pretrained_path=path,
                           pretrained_architecture=str(image_cfg.get(
                               "pretrained_architecture", "densenet121")))
    if path is not None:
        how = "fine-tuned" if finetune else "frozen, linear probe"
        return name, {**record, "network": name,
                      "reason": f"auto: pretrained {name} backbone from image.pretrained_path "
                                f"({how})"}
    what = f"small CNN ({name})" if name == "compact" else f"{name} network"
    log.warning(NO_WEIGHTS_WARNING.format(what=what))
    return name, {**record, "network": name, "from_scratch_warning": True,
                  "reason": f"auto: no pretrained weights, {name} trained from scratch"}
