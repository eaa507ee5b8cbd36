"""Small score tables for the audit tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def make_scores(n: int = 3000, seed: int = 0, *, repeat: float = 0.2) -> pd.DataFrame:
    """Random cohort: 4 attributes, modalities, some patients with several rows."""
    rng = np.random.default_rng(seed)
    n_pat = int(n * (1 - repeat))
    patient = np.concatenate([np.arange(n_pat), rng.integers(0, n_pat, n - n_pat)])
    race = rng.choice(["White", "Black", "Asian", "Other"], n_pat, p=[0.6, 0.2, 0.12, 0.08])
    sex = rng.choice(["female", "male"], n_pat)
    score = rng.beta(1.2, 5.0, n)
    return pd.DataFrame({
        "example_id": [f"e{i}" for i in range(n)], "patient_id": [f"p{i}" for i in patient],
        "index_time": pd.Timestamp("2024-01-01", tz="UTC")
        + pd.to_timedelta(rng.integers(0, 365 * 24, n), unit="h"),
        "score": score, "label": (rng.random(n) < score).astype(int),
        "sex": sex[patient], "race": race[patient],
        "has_image": rng.random(n) < 0.8, "has_ehr": rng.random(n) < 0.97,
        "has_note": rng.random(n) < 0.9, "model_version": "m-1.0", "threshold": 0.25,
    })


@pytest.fixture(scope="module")
def scores() -> pd.DataFrame:
    return make_scores()
