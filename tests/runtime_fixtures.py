"""Fixtures for the distributed-runtime tests: a real local stack (mosquitto, redis-server, a Celery
worker with 2 threads, one agent process hosting 4 emulated devices) on free loopback ports, stopped
by the PIDs it recorded; and the helpers that compare a distributed run with the local run that
left out the same devices."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import pytest

from harmony.engine import LocalEngine
from server import state
from testbed.stack import LocalStack, StackInfo
from tests.conftest import same_bits


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    stack = LocalStack(tmp_path_factory.mktemp("stack"))
    # an open broker (`harmony up --insecure`): the tests talk to it anonymously
    info = stack.start(agents=1, devices_per_agent=4, worker_concurrency=2, registry=False, auth=False)
    try:
        yield info
    finally:
        stack.stop()


def same_weights(a: dict, b: dict) -> bool:
    """Client and server weights bit for bit equal."""
    return all(same_bits(a[s][k], b[s][k]) for s in a for k in a[s])


def left_out(rounds: list[dict[str, Any]]) -> dict[int, set[int]]:
    """Round → the clients its record says were dropped, late or offline (known gone at its start)."""
    return {r["round"]: set(r["dropouts"]) | set(r["stragglers"]) | set(r["offline"]) for r in rounds}


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


def when_in_flight(r: Any, rnd: int, devices: set[str], action: Callable[[], None], *, settle_s: float = 0.3,
                   timeout_s: float = 60.0, poll_s: float = 0.02) -> threading.Thread:
    """A thread (not yet started) that runs ``action()`` once, as soon as the round-``rnd`` sessions
    of every one of ``devices`` are subscribed (Redis) and none of them is done, ``settle_s`` later
    (to let the exchange get going); it gives up after ``timeout_s``."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = {k.decode() for k in r.hkeys(state.ready_key(rnd))}
            done = {d.decode() for d in r.smembers(state.done_key(rnd))}
            if devices <= ready and not devices & done:
                time.sleep(settle_s)
                action()
                return
            time.sleep(poll_s)

    return threading.Thread(target=watch, daemon=True)
