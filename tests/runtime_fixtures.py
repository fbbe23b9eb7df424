"""Fixtures for the distributed-runtime tests: a real local stack (mosquitto, redis-server, a Celery
worker with 2 threads, one agent process hosting 4 emulated devices) on free loopback ports, stopped
by the PIDs it recorded; and the helpers that compare a distributed run with the local run that
left out the same devices."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml

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


def paced_class(directory: Path, name: str, compute_flops: float) -> list[str]:
    """Agent arguments for devices slow *by construction*: a profiles file in ``directory`` with a
    class ``name`` that computes at ``compute_flops`` FLOP/s, which the agent enforces by pacing
    (``--emulate --emulate-limits compute``): every training step takes at least its FLOPs ÷ that
    rate, whatever the host's speed (a slower host only makes it slower). A ``--slowdown`` factor
    instead scales the host's own step time, so a fast host made "50× slower" devices finish
    inside a deadline meant to leave them out."""
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({name: {
        "compute_flops": int(compute_flops), "uplink_bps": 1_000_000_000, "memory_bytes": 4 * 2**30, "cores": 1,
        "source": "a test class: slow by construction (the agent paces each step to this rate)"}}))
    return ["--profiles", str(path), "--device-class", name, "--emulate", "--emulate-limits", "compute"]


def paced_step_s(cfg: Any, depth: int, compute_flops: float) -> float:
    """Seconds one training step at ``depth`` takes at least on a device paced to ``compute_flops``
    (what the agent's pacer targets: ``harmony.assignment.step_needs``)."""
    from harmony.assignment import step_needs
    from harmony.experiment import Experiment

    ex = Experiment.plan(cfg)
    return step_needs(ex.costs[depth], batch_size=cfg.train.batch_size, batches_per_step=ex.algorithm.batches_per_step,
                      momentum=cfg.train.momentum, bits_per_element=cfg.eval.bits_per_element,
                      compute_flops=compute_flops, uplink_bps=1e12).compute_s
