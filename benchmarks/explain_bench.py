"""Explanation latency for one patient, and the EHR-feature SHAP part vs KernelExplainer.

A small synth cohort is generated and a model trained on it (CPU, seeded). Then:

- **full**: ``Explainer.explain_row`` for one patient with every modality, after one
  warm-up call has cached the image saliency and the sentence embeddings; p50 and
  p90 over repeated calls (goal: p50 <= 200 ms on 2 cores).
- **EHR part**: :func:`models.explain_tabular.ehr_shap` against
  ``shap.KernelExplainer`` (default ``nsamples``) on the same fused model (the
  other modalities held at the patient's values) and the same summarised
  background; time ratio (goal >= 10x) and each one's additivity error
  ``|sum(values) - (f(x) - E f(background))|``, over several patients.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def run(quick: bool = False) -> dict[str, Any]:
    import shap

    from models.explain_tabular import ehr_shap, fused_ehr_function
    from pipelines.explain import Explainer, _one_row
    from pipelines.manifest import read_manifest
    from pipelines.scoring import load_model
    from pipelines.synth import generate_cohort
    from pipelines.training import train

    logging.getLogger("pipelines").setLevel(logging.ERROR)
    np.random.seed(0)
    torch.manual_seed(0)
    n_patients, repeats, n_ehr = (150, 15, 3) if quick else (300, 50, 8)
    config = {"notes": {"encoder": "tfidf"}, "workers": 1, "device": "cpu",
              "image": {"spatial_size": [32, 32, 8], "spatial_size_2d": [32, 32],
                        "max_epochs": 6, "patience": 3, "batch_size": 16}}
    with tempfile.TemporaryDirectory(prefix="clinfuse-explain-bench-") as tmp:
        root = Path(tmp)
        generate_cohort(n_patients, root / "cohort", seed=41, n_slices=8, size=32, workers=1)
        model_dir = train(root / "cohort" / "manifest.csv", root / "model", config=config,
                          cache_dir=root / "cache")
        manifest = read_manifest(root / "cohort" / "manifest.csv")
        explainer = Explainer(load_model(model_dir, trusted_keys=[root / "model.key.pub"],
                                         device="cpu"), root / "cache")
        rows = np.flatnonzero(manifest.modalities_present().all(axis=1).to_numpy())
        row = int(rows[0])
        start = time.perf_counter()
        explainer.explain_row(manifest, row)  # first: saliency + sentence vectors cached
        first_ms = 1000 * (time.perf_counter() - start)
        times, parts = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            doc = explainer.explain_row(manifest, row)
            times.append(1000 * (time.perf_counter() - start))
            parts.append(doc["timings_ms"])
        model = explainer.model
        bg, bg_source = explainer.background(manifest)
        ours_ms: list[float] = []
        kernel_ms: list[float] = []
        ours_err: list[float] = []
        kernel_err: list[float] = []
        max_diff: list[float] = []
        ref_ours: list[float] = []
        ref_kernel: list[float] = []
        for r in rows[:n_ehr]:
            inputs = model.inputs(_one_row(manifest, int(r)), root / "cache")
            X = {k: v[:1] for k, v in inputs.X.items() if k in model.modalities}
            mask = model.mask(inputs.available)[0]
            t = time.perf_counter()
            res = ehr_shap(model.fusion, X, mask, bg)
            ours_ms.append(1000 * (time.perf_counter() - t))
            f = fused_ehr_function(model.fusion, X, mask)
            t = time.perf_counter()
            kernel = shap.KernelExplainer(f, bg)
            kv = np.ravel(kernel.shap_values(X["ehr"], silent=True))
            kernel_ms.append(1000 * (time.perf_counter() - t))
            fx = float(f(X["ehr"])[0])
            ours_err.append(res.additivity_error)
            kernel_err.append(abs(float(kv.sum()) - (fx - float(kernel.expected_value))))
            max_diff.append(float(np.abs(kv - res.values).max()))
            # Reference: 20 antithetic permutations. With a linear EHR branch every
            # permutation gives the same (exact) values, so this is the exact answer.
            ref = ehr_shap(model.fusion, X, mask, bg, n_permutations=20, seed=1).values
            ref_ours.append(float(np.abs(res.values - ref).max()))
            ref_kernel.append(float(np.abs(kv - ref).max()))
    p50 = float(np.percentile(times, 50))
    ratio = float(np.median(kernel_ms) / np.median(ours_ms))
    breakdown = {k: round(float(np.median([p[k] for p in parts])), 2) for k in parts[0]}
    return {
        "summary": (f"full explanation p50 {p50:.0f} ms (goal <= 200); EHR SHAP "
                    f"{np.median(ours_ms):.0f} ms vs KernelExplainer "
                    f"{np.median(kernel_ms):.0f} ms = {ratio:.1f}x (goal >= 10x); additivity "
                    f"{max(ours_err):.1e} vs {max(kernel_err):.1e}"),
        "full_explanation_ms": {"p50": round(p50, 2),
                                "p90": round(float(np.percentile(times, 90)), 2),
                                "first_call_ms": round(first_ms, 1), "repeats": repeats,
                                "median_breakdown_ms": breakdown},
        "ehr_shap": {"method": doc["ehr"]["method"], "n_features": int(bg.shape[1]),
                     "background": bg_source, "n_background": int(bg.shape[0]),
                     "ours_ms_median": round(float(np.median(ours_ms)), 2),
                     "kernel_ms_median": round(float(np.median(kernel_ms)), 2),
                     "speedup": round(ratio, 2),
                     "ours_additivity_error_max": max(ours_err),
                     "kernel_additivity_error_max": max(kernel_err),
                     "max_abs_difference_logit": max(max_diff),
                     "max_abs_error_vs_20_permutation_reference": {
                         "ours": max(ref_ours), "kernel": max(ref_kernel)},
                     "patients": len(ours_ms)},
        "goals_met": {"p50_le_200ms": p50 <= 200.0, "speedup_ge_10x": ratio >= 10.0,
                      # Kernel enforces additivity as a constraint (error ~1e-16); ours
                      # telescopes it; both are at float64 rounding when <= 1e-12.
                      "additivity_equal_or_better": max(ours_err) <= max(max(kernel_err),
                                                                         1e-12)},
        "provenance": {"patients": n_patients, "torch_threads": torch.get_num_threads(),
                       "shap": shap.__version__, "seed": 41, "device": "cpu"},
    }
