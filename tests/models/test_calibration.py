"""Platt scaling keeps the model's ranking (issue 18, small cohorts)."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration import MIN_PLATT_SLOPE, PlattScaling


def test_platt_never_reverses_the_ranking() -> None:
    """Logits that run against their labels on the calibration split (a tiny split by
    chance) give the floor slope: scores shrink to the base rate, in the model's order."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=40)
    y = (z < -0.8).astype(int)  # the higher the logit, the fewer events
    cal = PlattScaling(per_pattern=False).fit(z, y)
    assert cal.slope_ == pytest.approx(MIN_PLATT_SLOPE)
    logit = cal.transform(np.array([-2.0, 0.0, 2.0]))  # calibrated logits
    assert logit[0] < logit[1] < logit[2]
    assert np.allclose(logit, np.log(y.mean() / (1 - y.mean())), atol=0.01)
    # Where the logits do rank, the slope is fitted as before (the class docstring's case).
    rng = np.random.default_rng(0)
    z = rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    assert PlattScaling().fit(2 * z - 1, y).slope_ == pytest.approx(0.5, abs=0.05)
