"""A small fake artifact's contents, shared by the artifact and model-card tests."""

from __future__ import annotations

from typing import Any

import torch


def fake_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model_name": "deterioration-fusion",
        "model_version": "0.3.0",
        "outcome": {"name": "deterioration",
                    "definition": "death or ICU transfer within 30 days of the index time",
                    "horizon_days": 30},
        "population": "adult inpatients (age >= 18)",
        "feature_source": {"kind": "fhir-spec", "spec_version": "1"},
        "input_modalities": ["tabular", "image", "notes"],
        "decision_thresholds": {"high_risk": 0.3},
        "note_encoder": "hashing-tfidf-512",
    }
    config.update(overrides)
    return config


def fake_tensors() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {
        "fusion": {"head.weight": torch.randn(2, 8, generator=gen), "head.bias": torch.zeros(2)},
        "tabular_scaler": {"mean": torch.arange(4.0), "scale": torch.ones(4)},
    }


def fake_documents() -> dict[str, Any]:
    return {
        "feature_spec": {"version": "1", "include_age": True,
                         "features": [{"name": "sodium"}, {"name": "lactate"}]},
        "calibration": {"method": "isotonic", "x": [0.0, 0.5, 1.0], "y": [0.0, 0.4, 1.0]},
        "metrics": {"overall": {"n": 400, "auroc": 0.812, "brier": 0.101},
                    "by_group": {"sex": {"female": {"n": 210, "auroc": 0.801},
                                         "male": {"n": 190, "auroc": 0.824}},
                                 "age_band": {"18-64": {"auroc": 0.83},
                                              "65+": {"auroc": float("nan")}}}},
        "training_data": {"fingerprint": "sha256:" + "ab" * 32, "n_examples": 2000,
                          "n_patients": 1500, "prevalence": 0.12,
                          "membership": {"id_hash": "hmac-sha256", "n_train_patients": 2,
                                         "train_patients": ["aa", "bb"],
                                         "test_patients": ["cc"]}},
    }
