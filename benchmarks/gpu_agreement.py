"""CPU and GPU predictions of the same fitted models agree: ``python -m benchmarks.gpu_agreement``.

Fits a small image encoder (each of the CPU image networks: ``compact`` and the
CPU default ``threshold``) and the fusion model on the CPU on synthetic data
with planted signal, then predicts the same inputs on the CPU and on CUDA and
reports the largest probability difference (goal: < 5e-3). It also runs an
untrained DenseNet121-3D (the GPU default) both ways, in float32 and in bf16
autocast. Without CUDA it exits 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.device import autocast, exact_math
from models.fusion import FusionRiskModel
from models.image_encoder import ImageEncoder, build_network

GOAL = 5e-3


def planted_cohort(n: int, seed: int) -> tuple[torch.Tensor, dict[str, np.ndarray], np.ndarray,
                                                np.ndarray]:
    """Images with a bright cube whose size carries signal, tabular and note vectors."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    y = (rng.random(n) < 1 / (1 + np.exp(-(z.sum(axis=1) - 1.0)))).astype(np.int64)
    images = rng.normal(0.2, 0.05, size=(n, 1, 32, 32, 16)).astype(np.float32)
    for i, half in enumerate(np.clip(3 + 2 * z[:, 0], 1, 7).astype(int)):
        depth = slice(8 - half // 2, 8 + half // 2 + 1)
        images[i, 0, 16 - half:16 + half, 16 - half:16 + half, depth] = 0.8
    ehr = (z[:, [1]] + rng.normal(0, 0.7, size=(n, 12))).astype(np.float32)
    note = (z[:, [2]] * rng.normal(size=(1, 32)) + rng.normal(0, 1, (n, 32))).astype(np.float32)
    mask = rng.random((n, 3)) > 0.2
    return torch.from_numpy(images), {"ehr": ehr, "note": note}, y, mask


#: The CPU image networks whose fitted models are compared.
NETWORKS = ("compact", "threshold")


def fitted_models(seed: int, network: str = "compact"
                  ) -> tuple[ImageEncoder, FusionRiskModel, torch.Tensor,
                             dict[str, np.ndarray], np.ndarray]:
    images, tab, y, mask = planted_cohort(600, seed)
    train, val = slice(0, 400), slice(400, 600)
    encoder = ImageEncoder(network=network, max_epochs=4, device="cpu", seed=seed).fit(
        images[train], y[train], images[val], y[val])
    inputs = {"image": encoder.predict_logit(images, device="cpu").reshape(-1, 1), **tab}
    fusion = FusionRiskModel(max_epochs=60, patience=10, device="cpu", seed=seed)
    fusion.fit({k: v[train] for k, v in inputs.items()}, y[train], mask[train],
               X_val={k: v[val] for k, v in inputs.items()}, y_val=y[val], mask_val=mask[val])
    fusion.calibrate({k: v[val] for k, v in inputs.items()}, y[val], mask[val])
    return encoder, fusion, images, tab, mask


def run(seed: int = 0) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device (torch {torch.__version__}); run this on a GPU host")
    started = time.perf_counter()
    by_network = {}
    for network in NETWORKS:
        encoder, fusion, images, tab, mask = fitted_models(seed, network)
        image_cpu = encoder.predict_logit(images, device="cpu")
        image_gpu = encoder.predict_logit(images, device="cuda")
        p_cpu = fusion.predict_proba({"image": image_cpu.reshape(-1, 1), **tab}, mask,
                                     device="cpu")[:, 1]
        p_gpu = fusion.predict_proba({"image": image_gpu.reshape(-1, 1), **tab}, mask,
                                     device="cuda")[:, 1]
        by_network[network] = {
            "fused_probability_max_abs_diff": float(np.abs(p_cpu - p_gpu).max()),
            "image_logit_max_abs_diff": float(np.abs(image_cpu - image_gpu).max())}

    torch.manual_seed(seed)
    dense = build_network("densenet121", spatial_dims=3).eval()
    x = torch.randn(8, 1, 96, 96, 96)
    with torch.inference_mode(), exact_math():
        dense_cpu = torch.sigmoid(dense(x)[1].float()).numpy()
        gpu_net = dense.to("cuda")
        dense_gpu32 = torch.sigmoid(gpu_net(x.cuda())[1].float()).cpu().numpy()
        with autocast(torch.device("cuda")):
            dense_bf16 = torch.sigmoid(
                gpu_net(x.cuda().to(memory_format=torch.channels_last_3d))[1].float()
            ).cpu().numpy()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fused_probability_max_abs_diff": max(r["fused_probability_max_abs_diff"]
                                              for r in by_network.values()),
        "image_logit_max_abs_diff": max(r["image_logit_max_abs_diff"]
                                        for r in by_network.values()),
        "by_image_network": by_network,
        "densenet121_fp32_probability_max_abs_diff": float(np.abs(dense_cpu - dense_gpu32).max()),
        "densenet121_bf16_probability_max_abs_diff": float(np.abs(dense_cpu - dense_bf16).max()),
        "n_examples": len(p_cpu), "goal": GOAL,
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["passed"] = (result["fused_probability_max_abs_diff"] < GOAL
                        and result["densenet121_fp32_probability_max_abs_diff"] < GOAL)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_agreement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                        "gpu_agreement.json")
    args = parser.parse_args()
    result = run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
