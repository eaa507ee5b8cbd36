"""Per-patient inference latency on the CPU, image and note embeddings cached (goal p50 <= 30 ms).

A synth cohort is generated and the default model trained on it (CPU, seeded;
the default MiniLM note encoder when installed, TF-IDF otherwise, small images so
the set-up stays short). One pass over the cohort then fills the caches the way a
serving host keeps them warm: preprocessed image tensors and image-encoder logits
per series key, sentence vectors per sentence hash. The timed unit is one
patient, end to end through the public scoring path -- one manifest row ->
``LoadedModel.inputs`` (tabular encoding and scaling, note sentence split and
cached-vector pooling, image cache lookups) -> ``LoadedModel.predict`` (the fusion
head and the calibrator) -- repeated over patients with every modality present;
p50/p90/p99 are reported. Model loading (once per process) is not timed.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

GOAL_P50_MS = 30.0


def run(quick: bool = False) -> dict[str, Any]:
    from models.note_encoder import NoteEncoderUnavailableError, load_note_encoder
    from pipelines.explain import _one_row
    from pipelines.manifest import read_manifest
    from pipelines.scoring import load_model
    from pipelines.synth import generate_cohort
    from pipelines.training import train

    logging.getLogger("pipelines").setLevel(logging.ERROR)
    logging.getLogger("models").setLevel(logging.ERROR)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one request, one core: how a serving worker runs
    n_patients, n_timed, repeats = (120, 20, 2) if quick else (400, 200, 3)
    try:
        load_note_encoder("minilm", strict=True)
        note_encoder = "minilm"
    except NoteEncoderUnavailableError:
        note_encoder = "tfidf"
    config = {"notes": {"encoder": note_encoder}, "workers": 1, "device": "cpu",
              "image": {"spatial_size": [32, 32, 8], "spatial_size_2d": [32, 32],
                        "max_epochs": 4, "patience": 2, "batch_size": 16}}
    with tempfile.TemporaryDirectory(prefix="clinfuse-inference-bench-") as tmp:
        root = Path(tmp)
        generate_cohort(n_patients, root / "cohort", seed=51, n_slices=8, size=32, workers=1)
        model_dir = train(root / "cohort" / "manifest.csv", root / "model", config=config,
                          cache_dir=root / "cache")
        manifest = read_manifest(root / "cohort" / "manifest.csv")
        started = time.perf_counter()
        model = load_model(model_dir, trusted_keys=[root / "model.key.pub"], device="cpu")
        load_ms = 1000 * (time.perf_counter() - started)
        cache = root / "serve-cache"
        model.inputs(manifest, cache)  # warm: every series and sentence cached once
        full = np.flatnonzero(manifest.modalities_present().all(axis=1).to_numpy())
        rows = [int(r) for r in full[:n_timed]]
        one_rows = {r: _one_row(manifest, r) for r in rows}
        times: list[float] = []
        scores: dict[int, float] = {}
        for _ in range(repeats):
            for r in rows:
                t = time.perf_counter()
                inputs = model.inputs(one_rows[r], cache)
                p = float(model.predict(inputs, np.array([0]))[0])
                times.append(1000 * (time.perf_counter() - t))
                scores[r] = p
        # The per-patient path must score exactly as the batch path does.
        batch = model.inputs(manifest, cache)
        p_batch = model.predict(batch, np.array(rows))
        max_diff = float(np.max(np.abs(p_batch - np.array([scores[r] for r in rows]))))
    ms = np.array(times)
    p50, p90, p99 = (float(np.percentile(ms, q)) for q in (50, 90, 99))
    summary = (f"p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms per patient "
               f"(goal p50 <= {GOAL_P50_MS:g} ms: {'met' if p50 <= GOAL_P50_MS else 'NOT met'}); "
               f"{len(rows)} patients x {repeats}, all 3 modalities, caches warm, "
               f"{note_encoder} notes, 1 torch thread; model load {load_ms:.0f} ms once; "
               f"per-patient vs batch max diff {max_diff:.1e}")
    return {"summary": summary, "p50_ms": round(p50, 2), "p90_ms": round(p90, 2),
            "p99_ms": round(p99, 2), "mean_ms": round(float(ms.mean()), 2),
            "goal_p50_ms": GOAL_P50_MS, "met": p50 <= GOAL_P50_MS, "n_patients": len(rows),
            "repeats": repeats, "cohort_patients": n_patients, "note_encoder": note_encoder,
            "model_load_ms": round(load_ms, 1), "max_abs_diff_vs_batch": max_diff,
            "timed_path": "manifest row -> LoadedModel.inputs -> LoadedModel.predict"}
