"""Random streams derived from (seed, round, device, purpose).

Every random choice in the project draws from a generator made here, never from a global
generator whose order depends on scheduling, so that the local engine and the distributed
runtime make the same choices whatever order the clients run in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``parts``."""
    text = "/".join([str(int(seed)), *(str(p) for p in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def torch_generator(seed: int, *parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from (seed, *parts)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *parts))
    return gen


def numpy_rng(seed: int, *parts: object) -> np.random.Generator:
    """A numpy generator seeded from (seed, *parts)."""
    return np.random.default_rng(derive_seed(seed, *parts))


@contextmanager
def seeded_torch(seed: int, *parts: object) -> Iterator[None]:
    """Run a block (e.g. model construction) under torch's global RNG seeded from parts,
    restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *parts))
        yield
