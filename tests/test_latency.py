"""The latency model (docs/design.md §6, eq. 12) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from harmony.latency import (
    LatencyBreakdown,
    assign_profiles_by_depth,
    latency_breakdown,
    modelled_latency_s,
)
from harmony.models.base import DepthCost

# F_c = 1e6, F_head = 1e3, E = 1000 elements, F_s = 2e6 FLOPs.
COST = DepthCost(
    split_depth=2,
    client_flops=1_000_000,
    exit_head_flops=1_000,
    client_params=10,
    exit_head_params=1,
    client_param_bytes=44,
    cut_elements=1_000,
    server_flops=2_000_000,
    server_params=100,
)
P_I, R_I, P_S = 1e9, 1e6, 1e10  # FLOP/s, bit/s, FLOP/s


def test_eq12_by_hand():
    # client: (1e6 + 1e3) / 1e9            = 1.001e-3 s
    # uplink: 1000 elements · 16 bit / 1e6 = 1.6e-2 s
    # server: 2e6 / 1e10                   = 2e-4 s
    # T = 1.001e-3 + 0.5 · (1.6e-2 + 2e-4) = 1.001e-3 + 8.1e-3 = 9.101e-3 s
    t = modelled_latency_s(COST, 0.5, P_I, R_I, P_S, bits_per_element=16)
    assert t == pytest.approx(9.101e-3, rel=1e-12)


def test_breakdown_terms_are_offload_weighted():
    b = latency_breakdown(COST, 0.5, P_I, R_I, P_S)
    assert isinstance(b, LatencyBreakdown)
    assert b.client_compute_s == pytest.approx(1.001e-3, rel=1e-12)
    assert b.uplink_s == pytest.approx(0.5 * 1.6e-2, rel=1e-12)  # 8e-3
    assert b.server_compute_s == pytest.approx(0.5 * 2e-4, rel=1e-12)  # 1e-4
    assert b.total_s == pytest.approx(9.101e-3, rel=1e-12)
    assert b.total_s == modelled_latency_s(COST, 0.5, P_I, R_I, P_S)


def test_no_offload_is_client_term_only():
    # Pr = 0: T = (1e6 + 1e3) / 1e9 = 1.001e-3 s
    b = latency_breakdown(COST, 0.0, P_I, R_I, P_S)
    assert b.uplink_s == 0.0 and b.server_compute_s == 0.0
    assert b.total_s == pytest.approx(1.001e-3, rel=1e-12)


def test_always_offload_with_head():
    # Pr = 1: T = 1.001e-3 + 1.6e-2 + 2e-4 = 1.7201e-2 s
    assert modelled_latency_s(COST, 1.0, P_I, R_I, P_S) == pytest.approx(1.7201e-2, rel=1e-12)


def test_splitfed_has_no_exit_head_and_always_offloads():
    # client: 1e6 / 1e9 = 1e-3 s (no head); T = 1e-3 + 1 · (1.6e-2 + 2e-4) = 1.72e-2 s
    b = latency_breakdown(COST, 1.0, P_I, R_I, P_S, has_exit_head=False)
    assert b.client_compute_s == pytest.approx(1e-3, rel=1e-12)
    assert b.total_s == pytest.approx(1.72e-2, rel=1e-12)
    with pytest.raises(ValueError, match="offload_probability"):
        latency_breakdown(COST, 0.5, P_I, R_I, P_S, has_exit_head=False)


def test_fp32_transfer_doubles_uplink():
    # q = 32: uplink 1000 · 32 / 1e6 = 3.2e-2 s; T = 1.001e-3 + 0.5 · (3.2e-2 + 2e-4) = 1.7101e-2
    assert modelled_latency_s(COST, 0.5, P_I, R_I, P_S, bits_per_element=32) == pytest.approx(
        1.7101e-2, rel=1e-12
    )


def test_numpy_scalars_accepted():
    t = modelled_latency_s(COST, np.float64(0.5), np.float32(1e9), np.int64(1_000_000), np.float64(1e10))
    assert t == pytest.approx(9.101e-3, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"offload_probability": -0.1}, "offload_probability"),
        ({"offload_probability": 1.5}, "offload_probability"),
        ({"offload_probability": float("nan")}, "offload_probability"),
        ({"client_flops_per_s": 0.0}, "client_flops_per_s"),
        ({"client_flops_per_s": -1e9}, "client_flops_per_s"),
        ({"uplink_bps": 0}, "uplink_bps"),
        ({"uplink_bps": float("inf")}, "uplink_bps"),
        ({"server_flops_per_s": -1.0}, "server_flops_per_s"),
        ({"server_flops_per_s": None}, "server_flops_per_s"),
        ({"bits_per_element": 0}, "bits_per_element"),
        ({"bits_per_element": 16.0}, "bits_per_element"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, argument):
    args = {
        "cost": COST, "offload_probability": 0.5, "client_flops_per_s": P_I, "uplink_bps": R_I,
        "server_flops_per_s": P_S,
    } | kwargs
    with pytest.raises(ValueError, match=argument):
        modelled_latency_s(**args)


def test_negative_cost_field_is_named():
    bad = DepthCost(**{**COST.__dict__, "cut_elements": -1})
    with pytest.raises(ValueError, match="cost.cut_elements"):
        modelled_latency_s(bad, 0.5, P_I, R_I, P_S)


def test_assign_profiles_by_depth_hand_example():
    # distinct depths sorted: 1, 2, 3 → ranks 0, 1, 2 → low, mid, high
    assert assign_profiles_by_depth([3, 1, 2, 1, 3], ["low", "mid", "high"]) == [
        "high", "low", "mid", "low", "high"
    ]


def test_assign_profiles_clamps_when_more_depths_than_profiles():
    # depths 1, 2, 3, 4 → ranks 0..3; only two profiles: ranks ≥ 1 clamp to the last
    assert assign_profiles_by_depth([4, 1, 3, 2], ["pi4", "pi5"]) == ["pi5", "pi4", "pi5", "pi5"]


def test_assign_profiles_fewer_depths_use_the_first_profiles():
    assert assign_profiles_by_depth([5, 2, 5], ["a", "b", "c"]) == ["b", "a", "b"]
    assert assign_profiles_by_depth([], ["a"]) == []


def test_assign_profiles_needs_a_profile():
    with pytest.raises(ValueError, match="profile_names_low_to_high"):
        assign_profiles_by_depth([1, 2], [])
