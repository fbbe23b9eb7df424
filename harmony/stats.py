"""Summary statistics for results over seeds: mean and a 95% confidence half-width."""

from __future__ import annotations

import math

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (standard tables).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof: int) -> float:
    """Student's t quantile for a 95% two-sided interval (1.96 beyond 30 dof)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); the half-width is 0 for a single value."""
    if not values:
        raise ValueError("mean_ci95 needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t975(n - 1) * math.sqrt(var / n)


def paired_difference(a: list[list[float]], b: list[list[float]]) -> list[tuple[float, float]]:
    """Per column (e.g. per ρ), the mean and 95% half-width of ``a − b`` over paired rows (seeds).

    Runs of one seed share the data partition, so the seed-to-seed spread that dominates each
    algorithm's own interval cancels in the difference; this is the interval to judge "A beats B"
    by, rather than whether A's and B's own intervals overlap."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs the same seeds on both sides, got {len(a)} and {len(b)} rows")
    if any(len(ra) != len(rb) for ra, rb in zip(a, b, strict=True)):
        raise ValueError("paired_difference: rows of different lengths")
    return [mean_ci95([ra[k] - rb[k] for ra, rb in zip(a, b, strict=True)]) for k in range(len(a[0]))]
