"""Modelled per-sample inference latency (docs/design.md §6, the paper's eq. 12 from SplitGP).

Per test sample on client ``i`` at split depth ``d``::

    T_i = (F_c(d) + F_head(d)) / P_i  +  Pr_i(offload) · ( E(d)·q / R_i  +  F_s(d) / P_s )

``F_c``/``F_head``/``F_s`` are the client-block, exit-head and server FLOPs of
:class:`~harmony.models.base.DepthCost`, ``P_i``/``P_s`` compute rates (FLOP/s), ``E`` the
cut-layer elements, ``q`` bits per element (16: fp16 transfer) and ``R_i`` the uplink (bit/s).

Choice: the exit head's FLOPs are in the client term. docs/design.md §6 writes ``F_c(d_i)/P_i``;
here the client always runs ``H_d`` on every sample, since its entropy decides whether to
offload, so its cost is paid whether or not the sample is offloaded. (For the families here
the head is a small fraction of ``F_c``.) SplitFed has no exit head: with
``has_exit_head=False`` the client term is ``F_c/P_i`` alone and every sample is offloaded.

Pure float functions, no I/O; also :func:`assign_profiles_by_depth`, which gives clients with
smaller split depths the lower-power device profiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harmony.models.base import DepthCost
from harmony.profiles import DeviceProfile


@dataclass(frozen=True)
class LatencyBreakdown:
    """Eq. 12's terms, in seconds per sample. ``uplink_s`` and ``server_compute_s`` are
    expectations over samples: already multiplied by the offload probability."""

    client_compute_s: float  # (F_c + F_head) / P_i
    uplink_s: float  # Pr(offload) · E·q / R_i
    server_compute_s: float  # Pr(offload) · F_s / P_s
    total_s: float


def _as_float(value: float) -> float:
    """``value`` as a float (numpy scalars welcome); NaN for anything non-numeric or bool."""
    if isinstance(value, (bool, str)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _positive_rate(name: str, value: float) -> float:
    v = _as_float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _check_cost(cost: DepthCost, has_exit_head: bool) -> None:
    names = ["client_flops", "cut_elements", "server_flops"]
    if has_exit_head:
        names.append("exit_head_flops")
    for name in names:
        value = getattr(cost, name)
        v = _as_float(value)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"cost.{name} must be a non-negative finite number, got {value!r}")


def latency_breakdown(
    cost: DepthCost,
    offload_probability: float,
    client_flops_per_s: float,
    uplink_bps: float,
    server_flops_per_s: float,
    bits_per_element: int = 16,
    has_exit_head: bool = True,
) -> LatencyBreakdown:
    """Eq. 12 term by term for one client at depth ``cost.split_depth``.

    ``offload_probability`` is ``Pr_i(offload)`` in [0, 1] (the fraction of the client's test
    samples whose exit entropy is at or above ``τ``). With ``has_exit_head=False`` (SplitFed)
    it must be 1. Raises ``ValueError`` naming the argument for any out-of-range input.
    """
    p = _as_float(offload_probability)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"offload_probability must lie in [0, 1], got {offload_probability!r}")
    if not has_exit_head and p != 1.0:
        raise ValueError(
            f"offload_probability must be 1 without an exit head (every sample goes to the server), "
            f"got {offload_probability!r}"
        )
    p_client = _positive_rate("client_flops_per_s", client_flops_per_s)
    r_uplink = _positive_rate("uplink_bps", uplink_bps)
    p_server = _positive_rate("server_flops_per_s", server_flops_per_s)
    if isinstance(bits_per_element, bool) or not isinstance(bits_per_element, int) or bits_per_element <= 0:
        raise ValueError(f"bits_per_element must be a positive integer, got {bits_per_element!r}")
    _check_cost(cost, has_exit_head)

    client_flops = cost.client_flops + (cost.exit_head_flops if has_exit_head else 0)
    client_compute_s = client_flops / p_client
    uplink_s = p * (cost.cut_elements * bits_per_element / r_uplink)
    server_compute_s = p * (cost.server_flops / p_server)
    return LatencyBreakdown(
        client_compute_s=client_compute_s,
        uplink_s=uplink_s,
        server_compute_s=server_compute_s,
        total_s=client_compute_s + uplink_s + server_compute_s,
    )


def modelled_latency_s(
    cost: DepthCost,
    offload_probability: float,
    client_flops_per_s: float,
    uplink_bps: float,
    server_flops_per_s: float,
    bits_per_element: int = 16,
    has_exit_head: bool = True,
) -> float:
    """Eq. 12's ``T_i`` in seconds per sample; see :func:`latency_breakdown`."""
    return latency_breakdown(
        cost, offload_probability, client_flops_per_s, uplink_bps, server_flops_per_s,
        bits_per_element, has_exit_head,
    ).total_s


def assign_profiles_by_depth(depths: list[int], profile_names_low_to_high: list[str]) -> list[str]:
    """One profile name per client: smaller split depth → lower-power profile.

    The paper: "clients with smaller model assignments operate under lower power budgets".
    The distinct depths, sorted, are ranked 0, 1, 2, …; rank ``k`` gets
    ``profile_names_low_to_high[k]``. With more distinct depths than profiles the deeper ones
    all get the last (highest-power) profile (clamped); with fewer, only the first profiles
    are used. E.g. depths ``[3, 1, 3, 2]`` with ``["a", "b"]`` give ``["b", "a", "b", "b"]``.
    """
    if not profile_names_low_to_high:
        raise ValueError("profile_names_low_to_high must name at least one profile")
    rank = {d: k for k, d in enumerate(sorted(set(depths)))}
    last = len(profile_names_low_to_high) - 1
    return [profile_names_low_to_high[min(rank[d], last)] for d in depths]


def session_time_s(cost: DepthCost, steps: int, batch_size: int, batches_per_step: int, profile: DeviceProfile,
                   server_flops_per_s: float, bits_per_element: int = 16) -> float:
    """Modelled wall time of one training session (the simulated clock): per step and batch, the
    client's forward and backward (≈ 3× the forward FLOPs of its prefix and exit head) at the
    device's compute rate, the cut-layer features at ``bits_per_element`` over its uplink, and the
    server's forward and backward at the server's rate. The downlink and link latency are not in
    the profiles and are not modelled (the gradients' bytes equal the features')."""
    samples = steps * batch_size * batches_per_step
    client_s = 3.0 * samples * (cost.client_flops + cost.exit_head_flops) / profile.compute_flops
    uplink_s = samples * cost.cut_elements * bits_per_element / profile.uplink_bps
    server_s = 3.0 * samples * cost.server_flops / server_flops_per_s
    return client_s + uplink_s + server_s
