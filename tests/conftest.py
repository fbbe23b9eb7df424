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


# --------------------------------------------------------------------------- the `slow` marker's guard
SERVICE_PROGRAMS = ("mosquitto", "redis-server", "celery", "edge_agent", "orchestrator", "testbed.cli", "sshd",
                    "chromium", "playwright", "dockerd")
"""Words in a command line that make a process a real one of the stack or the bench (a broker, Redis, a
Celery worker, an agent, the registry, a ``harmony`` command, sshd, a browser, a container engine): a
test that starts one is a ``slow`` test, left out of ``make test-fast``."""

_spawned: dict[str, list[str]] = {}
_current: list[str] = []


def _service_program(args: object) -> str | None:
    """The word of :data:`SERVICE_PROGRAMS` that ``args`` (Popen's first argument) runs, if any: the
    program itself (``mosquitto``, not ``mosquitto_passwd``) or a ``python -m`` module (not a user or
    service named ``orchestrator`` among the arguments); playwright's driver by its path."""
    words = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    if not words:
        return None
    runs = [Path(words[0]).name] + [words[k + 1] for k, w in enumerate(words[:-1]) if w == "-m"]
    for program in SERVICE_PROGRAMS:
        if program in runs or (program == "playwright" and program in words[0]):
            return program
    return None


def pytest_configure(config: pytest.Config) -> None:
    import subprocess

    original = subprocess.Popen.__init__

    def recording_init(self, args, *a, **kw):  # noqa: ANN001 - Popen's own signature
        program = _service_program(args)
        if program is not None and _current:
            _spawned.setdefault(_current[-1], []).append(program)
        original(self, args, *a, **kw)

    subprocess.Popen.__init__ = recording_init  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _current.append(item.nodeid)
    try:
        yield
    finally:
        _current.pop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test that started a real process (its own or a fixture's, set up for it) without the
    ``slow`` marker fails at its teardown, naming the processes: `make test-fast` must not start any."""
    outcome = yield
    report = outcome.get_result()
    programs = _spawned.get(item.nodeid)
    if call.when == "teardown" and programs and item.get_closest_marker("slow") is None and report.passed:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} started real processes ({', '.join(sorted(set(programs)))}) but is not "
                           "marked @pytest.mark.slow: mark it, so that `make test-fast` leaves it out")


@pytest.fixture
def broker_and_redis(tmp_path):
    """A real mosquitto and redis-server on free loopback ports, for tests that talk to both without a
    whole stack: (the broker's port, the Redis URL)."""
    import shutil
    import subprocess
    import time

    from broker.mosquitto import MosquittoConfig, MosquittoProcess, free_port
    from server import state

    mosquitto = MosquittoProcess(tmp_path / "mosquitto", MosquittoConfig(port=free_port())).start()
    redis_port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(redis_port),
                              "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{redis_port}/0"
    r = state.connect(url)
    for _ in range(200):
        try:
            r.ping()
            break
        except Exception:
            time.sleep(0.05)
    try:
        yield mosquitto.port, url
    finally:
        redis.terminate()
        redis.wait(10)
        mosquitto.stop()
