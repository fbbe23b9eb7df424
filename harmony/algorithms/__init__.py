"""Hybrid-SFL algorithms behind one interface, built by name.

Baselines: ``splitfed``, ``multi-exit``, ``splitgp`` (λ = 0.2 unless ``train.lam`` says),
``splitgp(lambda=X)``, ``splitgp+ft``. HARMONY: ``harmony``; ablations ``harmony(no-csa)``,
``harmony(depth-agnostic)`` (no stochastic early extraction), ``harmony(max-depth)`` (every
client at the largest split depth) and ``splitgp+csa`` (SplitGP at λ = 1 with CSA and no
meta-adaptation).
"""

from __future__ import annotations

from harmony.algorithm_names import ALGORITHM_NAMES, AlgorithmSpec, algorithm_spec, split_algorithm_list
from harmony.algorithms.base import (
    Algorithm,
    BatchStream,
    ClientSide,
    ServerSession,
    SessionContext,
    StepStats,
    run_session,
)
from harmony.algorithms.harmony import Harmony
from harmony.algorithms.splitgp import SplitGP


def build_algorithm(spec: AlgorithmSpec) -> Algorithm:
    """The algorithm object a spec names."""
    if spec.family == "splitgp":
        return SplitGP(spec.name, lam=spec.lam, gamma=spec.gamma, early_exit=spec.early_exit, finetune=spec.finetune)
    return Harmony(spec.name, csa=spec.csa, stochastic_depth=spec.stochastic_depth, inner_steps=spec.inner_steps,
                   fixed_max_depth=spec.fixed_max_depth, lam=spec.lam, personalise_after=spec.personalise_after)


def parse_algorithm(name: str, lam: float | None = None) -> Algorithm:
    """Build an algorithm from its name; ``lam`` is ``train.lam`` (used by plain ``splitgp``)."""
    return build_algorithm(algorithm_spec(name, lam))


__all__ = [
    "ALGORITHM_NAMES",
    "Algorithm",
    "AlgorithmSpec",
    "BatchStream",
    "ClientSide",
    "ServerSession",
    "SessionContext",
    "StepStats",
    "build_algorithm",
    "parse_algorithm",
    "run_session",
    "split_algorithm_list",
]
