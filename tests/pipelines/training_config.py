"""A training config small enough for the test suite's 8-slice, 32x32 synth cohorts."""

from __future__ import annotations

from typing import Any


def small_training_config(image_epochs: int) -> dict[str, Any]:
    return {"notes": {"encoder": "tfidf"}, "workers": 1, "device": "cpu",
            "image": {"spatial_size": [32, 32, 8], "spatial_size_2d": [32, 32],
                      "max_epochs": image_epochs, "patience": 3, "batch_size": 16},
            "fusion": {"max_epochs": 150, "patience": 20}}
