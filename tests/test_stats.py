"""The 95% confidence interval used by `harmony compare`."""

import math

import pytest

from harmony.stats import mean_ci95, paired_difference, t975


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


def test_paired_difference_cancels_the_shared_seed_spread():
    # B trails A by exactly 1 point on every seed, while the seeds themselves spread by 10
    a = [[90.0, 60.0], [80.0, 70.0], [85.0, 50.0]]
    b = [[89.0, 58.0], [79.0, 68.0], [84.0, 48.0]]
    (d0, h0), (d1, h1) = paired_difference(a, b)
    assert (d0, h0) == (1.0, 0.0) and (d1, h1) == (2.0, 0.0)
    assert mean_ci95([r[0] for r in a])[1] > 10  # each side's own interval is wide
    mean, half = paired_difference([[3.0], [1.0]], [[1.0], [1.0]])[0]
    assert mean == 1.0 and half == pytest.approx(12.706 * 1.0)  # differences 2, 0: sd √2, se 1


def test_paired_difference_refuses_unpaired_rows():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([[1.0]], [[1.0], [2.0]])
