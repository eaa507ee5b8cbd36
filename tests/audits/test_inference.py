"""The tests behind the flags hold their error rate in small groups and have power."""

from __future__ import annotations

import numpy as np
import pytest

from audits._inference import (
    adjust_families,
    calibration_intercept_test,
    design_effect,
    rate_equality_test,
    rate_ratio_test,
)


def test_rate_test_is_not_fooled_by_a_group_without_events() -> None:
    # 0 of 40 missing where 3 % are missing elsewhere: 1.2 expected, nothing unusual.
    # (An empirical-variance z-test put this at p < 1e-6.)
    assert rate_equality_test(0, 40, 300, 10_000) > 0.5
    assert rate_equality_test(450, 1000, 1500, 10_000) < 1e-40  # 45 % vs 15 %


def test_rate_test_type_one_error_in_small_groups() -> None:
    rng = np.random.default_rng(0)
    p = np.array([rate_equality_test(rng.binomial(35, 0.05), 35, rng.binomial(2000, 0.05),
                                     2000) for _ in range(3000)])
    assert (p < 0.05).mean() <= 0.05 and (p < 0.01).mean() <= 0.01


def test_four_fifths_test_boundary() -> None:
    # Rates exactly at the 0.8 boundary are not evidence of a violation.
    assert rate_ratio_test(400, 1000, 500, 1000, 0.8) == pytest.approx(1.0)
    assert rate_ratio_test(250, 1000, 500, 1000, 0.8) < 1e-10


def _hist(n: int, shift: float, rng: np.random.Generator, reps: int,
          bins: np.ndarray) -> np.ndarray:
    s = rng.beta(2.0, 6.0, (reps, n))
    logit = np.log(s) - np.log1p(-s)
    y = rng.random((reps, n)) < 1.0 / (1.0 + np.exp(-(logit + shift)))
    b = np.clip(np.searchsorted(bins, s) - 1, 0, bins.size - 2)
    out = np.zeros((reps, bins.size - 1, 2))
    for k in range(reps):
        np.add.at(out[k], (b[k], y[k].astype(int)), 1.0)
    return out


def test_calibration_intercept_test_size_and_power() -> None:
    rng = np.random.default_rng(1)
    bins = np.linspace(0.0, 1.0, 201)
    mid = 0.5 * (bins[:-1] + bins[1:])
    logit = np.log(mid) - np.log1p(-mid)
    ref = _hist(2000, 0.0, rng, 1000, bins)
    _, p_null = calibration_intercept_test(_hist(100, 0.0, rng, 1000, bins), ref, logit)
    assert (p_null < 0.05).mean() <= 0.07 and (p_null < 0.01).mean() <= 0.02
    # -0.4 log-odds in 1000 patients: z about 0.4 sqrt(W_g W_r / W) = 4.2 on average.
    z, p_alt = calibration_intercept_test(_hist(1000, -0.4, rng, 1000, bins), ref, logit)
    assert (z < 0).all() or (z < 0).mean() > 0.99  # overstated risk: fewer events
    assert (p_alt < 0.01).mean() > 0.9


def test_design_effect_and_family_split() -> None:
    assert design_effect(10.0, 10.0) == 1.0 and design_effect(5.0, 10.0) == 1.0
    assert design_effect(30.0, 10.0) == 3.0 and design_effect(1.0, 0.0) == 1.0
    p = np.array([0.001, 0.01, 0.001, 0.2])
    second = np.array([False, False, True, True])
    adj = adjust_families(p, second, "holm", 0.2)
    # Holm within each family, divided by the family's share of alpha.
    assert adj == pytest.approx([0.002 / 0.8, 0.01 / 0.8, 0.002 / 0.2, 0.2 / 0.2])
    # A family with no tests leaves its share to the other.
    assert adjust_families(p[:2], second[:2], "holm", 0.2) == pytest.approx([0.002, 0.01])
