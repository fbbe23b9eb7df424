"""Hybrid-SFL algorithms behind one interface, built by name.

Baselines: ``splitfed``, ``multi-exit``, ``splitgp`` (λ = 0.2 unless ``train.lam`` says),
``splitgp(lambda=X)``, ``splitgp+ft``. HARMONY: ``harmony``; ablations ``harmony(no-csa)``,
``harmony(depth-agnostic)`` (no stochastic early extraction), ``harmony(max-depth)`` (every
client at the largest split depth) and ``splitgp+csa`` (SplitGP at λ = 1 with CSA and no
meta-adaptation).
"""

from __future__ import annotations

import re

from harmony.algorithms.base import (
    Algorithm,
    BatchStream,
    ClientSide,
    ServerSession,
    SessionContext,
    run_session,
)
from harmony.algorithms.harmony import Harmony
from harmony.algorithms.splitgp import SplitGP

ALGORITHM_NAMES = [
    "splitfed", "multi-exit", "splitgp", "splitgp(lambda=X)", "splitgp+ft",
    "harmony", "harmony(no-csa)", "harmony(depth-agnostic)", "harmony(max-depth)", "splitgp+csa",
]
_HARMONY = {
    "harmony": lambda: Harmony("harmony"),
    "harmony(no-csa)": lambda: Harmony("harmony(no-csa)", csa=False),
    "harmony(depth-agnostic)": lambda: Harmony("harmony(depth-agnostic)", stochastic_depth=False),
    "harmony(max-depth)": lambda: Harmony("harmony(max-depth)", fixed_max_depth=True),
    "splitgp+csa": lambda: Harmony("splitgp+csa", inner_steps=0, lam=1.0, personalise_after=False),
}
_LAMBDA = re.compile(r"^splitgp\(lambda=([0-9.eE+-]+)\)$")


def parse_algorithm(name: str, lam: float | None = None) -> Algorithm:
    """Build an algorithm from its name; ``lam`` is ``train.lam`` (used by plain ``splitgp``)."""
    key = name.strip().lower().replace(" ", "")
    if key == "splitfed":
        return SplitGP("splitfed", lam=0.0, gamma=0.0, early_exit=False)
    if key in ("multi-exit", "multiexit"):
        return SplitGP("multi-exit", lam=0.0)
    if key == "splitgp":
        return SplitGP("splitgp", lam=0.2 if lam is None else lam)
    if key == "splitgp+ft":
        return SplitGP("splitgp+ft", lam=0.0, finetune=True)
    if key in _HARMONY:
        return _HARMONY[key]()
    m = _LAMBDA.match(key)
    if m:
        try:
            value = float(m.group(1))
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"algorithm {name!r}: lambda must lie in [0, 1]")
        return SplitGP(f"splitgp(lambda={m.group(1)})", lam=value)
    raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHM_NAMES)}")


def split_algorithm_list(text: str) -> list[str]:
    """Split ``a,b(c=1),d`` on commas outside parentheses."""
    names, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            names.append(current.strip())
            current = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        current += ch
    if current.strip():
        names.append(current.strip())
    return [n for n in names if n]


__all__ = [
    "ALGORITHM_NAMES",
    "Algorithm",
    "BatchStream",
    "ClientSide",
    "ServerSession",
    "SessionContext",
    "parse_algorithm",
    "run_session",
    "split_algorithm_list",
]
