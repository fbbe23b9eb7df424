"""Split depths from measured resources (``fleet.assignment: measured``, docs/design.md §9).

A device gets the deepest allowed split depth whose training step fits it:

- **compute**: one step's client work — forward and backward of ``B_1..B_d`` and ``H_d``, about 3×
  the forward FLOPs, for ``batch × batches_per_step`` samples — at the device's measured rate *for
  the model family's kind of layer* (dense convolutions, depthwise convolutions or attention: a
  board's matmul rate says little about its depthwise-convolution rate) must take at most
  ``fleet.step_budget_s``;
- **uplink**: one step's cut-layer features (elements × ``eval.bits_per_element``) over the
  measured uplink must take at most ``fleet.step_budget_s``;
- **memory**: parameters, their gradients, the optimizer's momentum buffer and the activations a
  step keeps for its backward pass must fit the device's available memory.

Where no depth fits, the shallowest is taken and the reason says so. The same rule serves the
local runtime (figures from ``fleet.profiles``, each profile standing for a measured device) and
the distributed one (figures from each agent's ``hello``); ``Experiment.redecide`` re-runs it when a
device's measured step time drifts (``fleet.reassign_drift``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harmony.models.base import DepthCost
from harmony.profiles import DeviceProfile

FAMILY_KERNELS = {"cnn8": "conv", "vgg11_bn": "conv", "resnet18": "conv", "resnet50": "conv",
                  "mobilenet_v2": "depthwise", "vit_s": "attention"}
"""The kind of layer that dominates each model family's client blocks: the agent measures its
training rate on one small layer of each kind (``edge_agent.probe.kernel_rates``)."""

KERNELS = ("conv", "depthwise", "attention")


@dataclass(frozen=True)
class Measurement:
    """What is known of one device's resources, and where the figures come from."""

    device: str
    compute_flops: float  # sustained training FLOP/s for the run's model family
    memory_bytes: int  # memory available to training
    uplink_bps: float  # device → server, bits/s
    source: str  # "hello: conv 2.1 GFLOP/s (measured)" or "profile pi4 (assumed figures)"

    def describe(self) -> str:
        return (f"{self.compute_flops / 1e9:.2f} GFLOP/s, {self.memory_bytes / 2**20:.0f} MiB, "
                f"{self.uplink_bps / 1e6:.1f} Mbit/s")


@dataclass(frozen=True)
class Needs:
    """What one training step at one depth needs of a device."""

    depth: int
    compute_s: float
    uplink_s: float
    memory_bytes: int


@dataclass(frozen=True)
class Decision:
    """A device's depth and the constraint that decided it."""

    device: str
    depth: int
    reason: str
    needs: Needs  # at the chosen depth
    measurement: Measurement

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "depth": self.depth, "reason": self.reason,
                "step_compute_s": self.needs.compute_s, "step_uplink_s": self.needs.uplink_s,
                "memory_bytes": self.needs.memory_bytes, "compute_flops": self.measurement.compute_flops,
                "uplink_bps": self.measurement.uplink_bps, "available_memory_bytes": self.measurement.memory_bytes,
                "source": self.measurement.source}


def step_needs(cost: DepthCost, *, batch_size: int, batches_per_step: int, momentum: float,
               bits_per_element: int, compute_flops: float, uplink_bps: float) -> Needs:
    """One step's compute time, uplink time and memory at ``cost``'s depth (module docstring)."""
    samples = batch_size * batches_per_step
    params = cost.client_param_bytes  # fp32 weights of B_1..B_d and H_d
    state = params * (2 + (1 if momentum > 0 else 0))  # weights, gradients, momentum buffer
    activations = 4 * samples * cost.activation_elements
    return Needs(
        depth=cost.split_depth,
        compute_s=3.0 * samples * (cost.client_flops + cost.exit_head_flops) / compute_flops,
        uplink_s=samples * cost.cut_elements * bits_per_element / uplink_bps,
        memory_bytes=int(state + activations),
    )


def _misfit(needs: Needs, m: Measurement, budget_s: float) -> str | None:
    """Why a depth does not fit (its first failing constraint), or None."""
    if needs.compute_s > budget_s:
        return f"depth {needs.depth} needs {needs.compute_s:.3g} s/step of compute > budget {budget_s:g} s"
    if needs.uplink_s > budget_s:
        return f"depth {needs.depth} needs {needs.uplink_s:.3g} s/step of uplink > budget {budget_s:g} s"
    if needs.memory_bytes > m.memory_bytes:
        return (f"depth {needs.depth} needs {needs.memory_bytes / 2**20:.1f} MiB > "
                f"{m.memory_bytes / 2**20:.1f} MiB available")
    return None


def choose_depth(costs: Mapping[int, DepthCost], m: Measurement, *, budget_s: float, batch_size: int,
                 batches_per_step: int, momentum: float, bits_per_element: int) -> Decision:
    """The deepest depth of ``costs`` that fits ``m`` (module docstring), with the reason."""
    needs = {d: step_needs(costs[d], batch_size=batch_size, batches_per_step=batches_per_step, momentum=momentum,
                           bits_per_element=bits_per_element, compute_flops=m.compute_flops,
                           uplink_bps=m.uplink_bps) for d in sorted(costs)}
    depths = sorted(costs)
    misfits = {d: _misfit(needs[d], m, budget_s) for d in depths}
    fitting = [d for d in depths if misfits[d] is None]
    if not fitting:
        d = depths[0]
        return Decision(m.device, d, f"depth {d} (the shallowest; nothing fits): {misfits[d]}", needs[d], m)
    d = fitting[-1]
    if d == depths[-1]:
        n = needs[d]
        reason = (f"depth {d}: the deepest allowed fits ({n.compute_s:.3g} s/step of compute, {n.uplink_s:.3g} s "
                  f"of uplink ≤ budget {budget_s:g} s; {n.memory_bytes / 2**20:.1f} MiB ≤ "
                  f"{m.memory_bytes / 2**20:.1f} MiB)")
    else:
        reason = f"depth {d}: {misfits[depths[depths.index(d) + 1]]}"
    return Decision(m.device, d, reason, needs[d], m)


def from_profile(device: str, profile: DeviceProfile) -> Measurement:
    """A profile's figures as the measurement of an emulated device."""
    return Measurement(device, profile.compute_flops, profile.memory_bytes, profile.uplink_bps,
                       f"profile {profile.name}, assumed figures")


class MeasurementError(ValueError):
    """A device's ``hello`` lacks what measured assignment needs; the message names the device and field."""


def from_hello(device: str, hello: Mapping[str, Any], family: str) -> Measurement:
    """A device's ``hello`` (as the registry keeps it) as a measurement for ``family``: its
    measured training rate for the family's kind of layer, its available memory, its measured uplink."""
    kernel = FAMILY_KERNELS[family]
    rates = hello.get("rates") or {}
    rate = rates.get(kernel)
    if not rate or rate <= 0:
        raise MeasurementError(f"device {device}: hello.rates has no measured {kernel!r} rate (model.family "
                               f"{family}); update the agent, or use fleet.split_depths instead of "
                               "fleet.assignment: measured")
    uplink = float(hello.get("uplink_bps") or 0.0)
    if uplink <= 0:
        raise MeasurementError(f"device {device}: hello.uplink_bps is {uplink} (no link probe); update the agent, "
                               "or use fleet.split_depths instead of fleet.assignment: measured")
    return Measurement(device, float(rate), int(hello["memory_bytes"]), uplink,
                       f"hello: {kernel} {float(rate) / 1e9:.2f} GFLOP/s, uplink {uplink / 1e6:.1f} Mbit/s (measured)")
