"""Aggregation of model states: FedAvg, depth-aware partial averaging, the λ mix.

All three are one mechanism: a :class:`WeightedSum` collects ``n_i``-weighted sums per
tensor name over the states that hold that name, in float64 so that the order in which
contributions arrive (local engine, several Celery workers) does not change the float32
result in practice. ``average(previous)`` divides, and a name nobody held keeps its
previous value (HeteroFL-style partial aggregation; FedAvg is the case where every state
holds every name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

State = Mapping[str, torch.Tensor]


class WeightedSum:
    """Running ``Σ n_i·θ_i`` and ``Σ n_i`` per tensor name."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}

    def add(self, state: State, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"aggregation weight must be positive, got {weight}")
        for name, tensor in state.items():
            t = tensor.detach().to("cpu", torch.float64)
            if name in self.sums:
                self.sums[name].add_(t, alpha=weight)
                self.weights[name] += weight
            else:
                self.sums[name] = t.mul(weight)
                self.weights[name] = float(weight)

    def merge(self, other: WeightedSum) -> None:
        """Fold another partial sum in (e.g. one Celery worker's)."""
        for name, s in other.sums.items():
            if name in self.sums:
                self.sums[name].add_(s)
                self.weights[name] += other.weights[name]
            else:
                self.sums[name] = s.clone()
                self.weights[name] = other.weights[name]

    def average(self, previous: State) -> dict[str, torch.Tensor]:
        """The weighted mean per name, in each tensor's previous dtype; unheld names keep ``previous``."""
        out: dict[str, torch.Tensor] = {}
        for name, prev in previous.items():
            if name not in self.sums:
                out[name] = prev.clone()
                continue
            mean = self.sums[name] / self.weights[name]
            if prev.is_floating_point():
                out[name] = mean.to(prev.dtype)
            else:  # counters such as BatchNorm's num_batches_tracked
                out[name] = mean.round().to(prev.dtype)
        for name in self.sums.keys() - previous.keys():
            raise KeyError(f"aggregated tensor {name!r} is not part of the model state")
        return out


def fedavg(states: Iterable[State], weights: Iterable[float]) -> dict[str, torch.Tensor]:
    """FedAvg: ``Σ n_i θ_i / Σ n_i`` over states that all hold the same names."""
    states = list(states)
    acc = WeightedSum()
    for s, w in zip(states, weights, strict=True):
        acc.add(s, w)
    return acc.average(states[0])


def partial_average(previous: State, states: Iterable[State], weights: Iterable[float]) -> dict[str, torch.Tensor]:
    """Depth-aware partial aggregation: each name averaged over its holders only."""
    acc = WeightedSum()
    for s, w in zip(states, weights, strict=True):
        acc.add(s, w)
    return acc.average(previous)


def personalise_mix(local: State, average: State, lam: float) -> dict[str, torch.Tensor]:
    """SplitGP's mix ``θ_i ← λ·θ_i(local) + (1−λ)·avg`` over the names ``local`` holds."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if lam == 0.0:
        return {k: average[k].clone() for k in local}
    if lam == 1.0:
        return {k: v.clone() for k, v in local.items()}
    out = {}
    for k, v in local.items():
        if v.is_floating_point():
            out[k] = (lam * v.double() + (1.0 - lam) * average[k].double()).to(v.dtype)
        else:
            out[k] = v.clone()
    return out
