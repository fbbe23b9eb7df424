"""Fixtures for the distributed-runtime tests: a real local stack (mosquitto, redis-server, a Celery
worker with 2 threads, one agent process hosting 4 emulated devices) on free loopback ports, stopped
by the PIDs it recorded; and the helpers that compare a distributed run with the local run that
left out the same devices."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
import torch

from harmony.engine import LocalEngine
from testbed.stack import LocalStack, StackInfo


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    stack = LocalStack(tmp_path_factory.mktemp("stack"))
    info = stack.start(agents=1, devices_per_agent=4, worker_concurrency=2, registry=False)
    try:
        yield info
    finally:
        stack.stop()


def same_weights(a: dict, b: dict) -> bool:
    """Client and server weights bit for bit equal."""
    return all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])


def left_out(rounds: list[dict[str, Any]]) -> dict[int, set[int]]:
    """Round → the clients its record says were dropped or late."""
    return {r["round"]: set(r["dropouts"]) | set(r["stragglers"]) for r in rounds}


def local_without(cfg: Any, leave_out: dict[int, set[int]]) -> LocalEngine:
    """The local run (training only) with those clients left out of those rounds."""
    local = LocalEngine(cfg.with_overrides(**{"fleet.dropout_probability": 0.0}))
    local.participants = lambda rnd, *_: [i for i in range(cfg.fleet.num_clients)  # type: ignore[method-assign]
                                          if i not in leave_out.get(rnd, set())]
    local.train()
    return local


def train_only(engine: Any) -> list[dict[str, Any]]:
    """Train a distributed engine (no evaluation: killed devices cannot evaluate) and return the
    round records."""
    engine.fleet.begin_run(False)
    return [asdict(rec) for rec in engine.train()]
