"""The algorithm-name table: which names exist and what each one means, without torch.

Config validation and the CLI check algorithm names here, so validating a YAML file does not
import torch or any model family. :func:`harmony.algorithms.parse_algorithm` builds the
algorithm object from the :class:`AlgorithmSpec` this module returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ALGORITHM_NAMES = [
    "splitfed", "multi-exit", "splitgp", "splitgp(lambda=X)", "splitgp+ft",
    "harmony", "harmony(no-csa)", "harmony(depth-agnostic)", "harmony(max-depth)", "splitgp+csa",
]
_LAMBDA = re.compile(r"^splitgp\(lambda=([0-9.eE+-]+)\)$")


@dataclass(frozen=True)
class AlgorithmSpec:
    """What an algorithm name asks for. ``family`` picks the implementation (SplitGP-style
    hybrid training, or HARMONY's meta-learned client side with CSA); the rest are its switches."""

    name: str
    family: Literal["splitgp", "harmony"]
    lam: float = 0.0
    gamma: float | None = None  # None: train.gamma
    early_exit: bool = True
    finetune: bool = False
    csa: bool = True
    stochastic_depth: bool | None = None  # None: train.harmony.stochastic_depth
    inner_steps: int | None = None  # None: train.harmony.inner_steps
    fixed_max_depth: bool = False
    personalise_after: bool = True


_FIXED = {
    "splitfed": AlgorithmSpec("splitfed", "splitgp", lam=0.0, gamma=0.0, early_exit=False),
    "multi-exit": AlgorithmSpec("multi-exit", "splitgp", lam=0.0),
    "multiexit": AlgorithmSpec("multi-exit", "splitgp", lam=0.0),
    "splitgp+ft": AlgorithmSpec("splitgp+ft", "splitgp", lam=0.0, finetune=True),
    "harmony": AlgorithmSpec("harmony", "harmony"),
    "harmony(no-csa)": AlgorithmSpec("harmony(no-csa)", "harmony", csa=False),
    "harmony(depth-agnostic)": AlgorithmSpec("harmony(depth-agnostic)", "harmony", stochastic_depth=False),
    "harmony(max-depth)": AlgorithmSpec("harmony(max-depth)", "harmony", fixed_max_depth=True),
    "splitgp+csa": AlgorithmSpec("splitgp+csa", "harmony", inner_steps=0, lam=1.0, personalise_after=False),
}


def algorithm_spec(name: str, lam: float | None = None) -> AlgorithmSpec:
    """The spec of algorithm ``name``; ``lam`` is ``train.lam`` (used by plain ``splitgp``).
    ``ValueError`` naming the known algorithms for an unknown name."""
    key = name.strip().lower().replace(" ", "")
    if key in _FIXED:
        return _FIXED[key]
    if key == "splitgp":
        return AlgorithmSpec("splitgp", "splitgp", lam=0.2 if lam is None else lam)
    m = _LAMBDA.match(key)
    if m:
        try:
            value = float(m.group(1))
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"algorithm {name!r}: lambda must lie in [0, 1]")
        return AlgorithmSpec(f"splitgp(lambda={m.group(1)})", "splitgp", lam=value)
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
