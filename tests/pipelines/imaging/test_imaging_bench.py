"""The imaging benchmark in quick mode: both pipelines agree (speed is not asserted)."""

from __future__ import annotations

import pytest

from benchmarks.imaging_bench import run


@pytest.mark.slow
def test_quick_run_agrees_with_monai() -> None:
    result = run(quick=True)
    assert result["series"] == 4
    assert result["max_abs_diff_fraction"] < 0.01  # the bar: 1% of the range
    assert result["max_abs_diff_fraction"] < 1e-5  # what float32 rounding leaves
    assert all(s["affine_max_diff_mm"] < 1e-6 for s in result["per_series"])
    assert result["clinfuse_series_per_s"] > 0 and result["monai_series_per_s"] > 0
