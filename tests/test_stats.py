"""The 95% confidence interval used by `harmony compare`."""

import math

import pytest

from harmony.stats import mean_ci95, t975


def test_three_seed_interval_by_hand():
    mean, half = mean_ci95([90.0, 92.0, 94.0])
    # sample sd = 2, n = 3, t(2) = 4.303: 4.303 · 2/√3 = 4.9687…
    assert mean == 92.0
    assert half == pytest.approx(4.303 * 2 / math.sqrt(3), rel=1e-12)


def test_single_value_has_zero_width_and_large_dof_uses_normal():
    assert mean_ci95([5.0]) == (5.0, 0.0)
    assert t975(1) == 12.706 and t975(100) == 1.96
    with pytest.raises(ValueError):
        mean_ci95([])
