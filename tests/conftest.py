"""Shared fixtures: a tiny experiment on the real Fashion-MNIST files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harmony.config import ExperimentConfig, validate_config

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: dtype, shape and every byte. ``torch.equal`` compares values, and in a thread
    that flushes denormals (every engine thread does) it reads a denormal as 0 — two runs that
    differ there would pass it."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def tiny_config(**overrides) -> ExperimentConfig:
    """4 clients at depths 2,3,4,2 on 3% of their Shard-2 data, quarter-width cnn8, 2 rounds."""
    raw = {
        "name": "tiny",
        "seed": 7,
        "data": {"num_shards": 8, "train_fraction": 0.03, "test_per_client": 40, "rhos": [0.0, 0.5]},
        "model": {"family": "cnn8", "width": 0.25},
        "fleet": {"num_clients": 4, "split_depths": [2, 3, 4, 2]},
        "train": {"algorithm": "splitgp", "rounds": 2, "batch_size": 16, "lr": 0.01},
        "eval": {"measure_latency_samples": 2},
    }
    cfg = validate_config(raw)
    return cfg.with_overrides(**overrides) if overrides else cfg


# Tests that take many minutes run only when asked for by their marker (``-m boards``, ``-m containers``).
ON_REQUEST = {"boards": "emulated arm64 boards: run them with `make test-boards`",
              "containers": "images and the compose fleet on a Docker engine: run them with `make test-containers`"}


def pytest_collection_modifyitems(config, items):
    """The emulated-board and container tests run only when their marker is selected (``make
    test-boards``, ``make test-containers``)."""
    selected = config.getoption("-m") or ""
    for marker, reason in ON_REQUEST.items():
        if marker in selected:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _needs_fashion_mnist():
    if not FMNIST.exists():
        pytest.exit("Fashion-MNIST is missing: run `make test` (it apt-get installs dataset-fashion-mnist)", 3)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A config with ``threads`` sets torch's thread count for the whole process (the engine
    calls ``torch.set_num_threads``); restore it so that no test runs on another test's
    setting — the thread count changes a run's bits."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
