"""Faults the distributed runtime survives (docs/design.md §5), each ending with the local engine's weights:

- a Celery worker SIGKILLed in the middle of a round, with the default redelivery settings: the
  round driver sees the sessions' heartbeats expire and sends them again, and the devices replay
  the round from the round-start weights, within seconds rather than the visibility timeout;
- the orchestrator (the ``harmony run --runtime distributed`` process) SIGKILLed after round 1
  and started again with ``--resume``: it continues from Redis;
- redis-server restarted between rounds: the round state survives (append-only file) and the
  worker, the orchestrator and the result backend reconnect.

One stack for the module — real mosquitto, redis-server, a Celery worker and an agent process
with 4 devices on free loopback ports, the worker with the default ``HSFL_VISIBILITY_S`` and
``HSFL_RESTORE_INTERVAL_S`` — and one local reference run of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from harmony.engine import LocalEngine
from orchestrator.engine import DistributedEngine
from server import state
from server.app import redelivery_bound_s
from testbed.stack import LocalStack
from tests.conftest import same_bits, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("fault-stack"))
    stack.start(agents=1, devices_per_agent=4, worker_concurrency=2, registry=False)  # default redelivery
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    local = LocalEngine(tiny_config())
    results = local.run()
    return local.model_state(), results


def assert_same_weights(expected: dict[str, dict[str, torch.Tensor]], got: dict[str, dict[str, torch.Tensor]]) -> None:
    for side in ("client", "server"):
        assert expected[side].keys() == got[side].keys()
        differ = [k for k in expected[side] if not same_bits(expected[side][k], got[side][k])]
        assert not differ, f"{side} weights differ from the local run in {differ[:5]}"


def models_in_redis(r: Any, rnd: int) -> dict[str, dict[str, torch.Tensor]]:
    info = r.hgetall(state.round_key(rnd))
    return {"client": state.get_model(r, info[b"client_sha"].decode()),
            "server": state.get_model(r, info[b"server_sha"].decode())}


def engine_for(stack: LocalStack, out: Path, progress: Any = None) -> DistributedEngine:
    assert stack.info is not None
    return DistributedEngine(tiny_config(), out, progress, mqtt=stack.info.mqtt, redis_url=stack.info.redis_url,
                             devices_timeout_s=60, round_timeout_s=150)


@pytest.mark.slow
def test_worker_killed_mid_round_is_redelivered(fault_stack, reference, tmp_path):
    """SIGKILL the worker while sessions of round 1 are in flight, start a new one: the lost sessions
    come back (new session tokens) within seconds of the kill, with the default settings (whose
    visibility timeout alone would take over two minutes), the devices replay, and the weights are
    the local engine's."""
    r = state.connect(fault_stack.info.redis_url)
    killed: dict[str, Any] = {}
    started = threading.Event()

    def kill_mid_round() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = {k.decode(): v for k, v in r.hgetall(state.ready_key(1)).items()}
            done = {d.decode() for d in r.smembers(state.done_key(1))}
            in_flight = {d: t for d, t in ready.items() if d not in done and not d.startswith("infer:")}
            if in_flight:
                time.sleep(0.2)  # let the exchange get going
                done = {d.decode() for d in r.smembers(state.done_key(1))}
                in_flight = {d: t for d, t in in_flight.items() if d not in done}
                if in_flight:
                    killed["pid"] = fault_stack.kill("worker", signal.SIGKILL)
                    killed["at"] = time.monotonic()
                    killed["in_flight"] = in_flight
                    killed["new_pid"] = fault_stack.restart("worker")
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_mid_round, daemon=True)

    def progress(event: str, **fields: Any) -> None:
        if event == "round_start" and fields["round"] == 1 and not started.is_set():
            started.set()
            killer.start()
        if event == "round_end" and fields["record"].round == 1:
            killed["round_1_end"] = time.monotonic()

    engine = engine_for(fault_stack, tmp_path, progress)
    try:
        got = engine.run()
    finally:
        engine.close()
    killer.join(timeout=5)
    assert "pid" in killed, "no session of round 1 was ever seen in flight, so nothing was killed"
    assert killed["new_pid"] != killed["pid"]
    tokens = {k.decode(): v for k, v in r.hgetall(state.ready_key(1)).items()}
    replayed = [d for d, token in killed["in_flight"].items() if tokens.get(d) != token]
    assert sorted(replayed) == sorted(killed["in_flight"]), "a killed session was not redelivered"
    # the heartbeat (ALIVE_TTL_S), the new worker's start and the queued sessions ahead of the resent
    # ones; the visibility timeout alone would have taken redelivery_bound_s() (130 s)
    recovered_s = killed["round_1_end"] - killed["at"]
    assert recovered_s < redelivery_bound_s() / 2, f"round 1 ended {recovered_s:.1f} s after the worker was killed"
    resent = {f[b"device"].decode() for _, f in r.xrange(state.events_key()) if f[b"name"] == b"session_resent"}
    assert {f'"{d}"' for d in killed["in_flight"]} <= resent
    assert_same_weights(reference[0], engine.model_state())
    assert got["evaluation"]["accuracy"] == reference[1]["evaluation"]["accuracy"]


@pytest.mark.slow
def test_orchestrator_killed_after_a_round_resumes_from_redis(fault_stack, reference, tmp_path):
    """SIGKILL ``harmony run --runtime distributed`` once round 1 is done and sessions of round 2 are
    under way, run it again with ``--resume``: round 1 is not redone, round 2 is (its orphaned
    sessions stand down instead of holding the worker's threads), and the weights are the local's."""
    r = state.connect(fault_stack.info.redis_url)
    cfg_path, out = tmp_path / "tiny.yaml", tmp_path / "out"
    cfg_path.write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
    argv = [sys.executable, "-m", "testbed.cli", "run", str(cfg_path), "--runtime", "distributed",
            "--stack", str(fault_stack.run_dir), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    previous_run = r.hget(state.run_key(), "id")
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (r.hget(state.run_key(), "id") != previous_run and r.hget(state.run_key(), "last_round") == b"1"
                   and r.hlen(state.ready_key(2)) > 0):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no session of round 2 started within 90 s"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert r.hget(state.run_key(), "last_round") == b"1", "the orchestrator was killed too late: round 2 was done"
    run_id, round_1_attempt = r.hget(state.run_key(), "id"), r.hget(state.round_key(1), "attempt")
    orphaned_attempt = r.hget(state.round_key(2), "attempt")

    resumed_at = time.monotonic()
    second = subprocess.run([*argv, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert second.returncode == 0, second.stderr[-3000:]
    assert time.monotonic() - resumed_at < 90, "the resumed run waited on orphaned sessions"
    assert r.hget(state.run_key(), "id") == run_id, "the resumed orchestrator started a new run"
    assert r.hget(state.round_key(1), "attempt") == round_1_attempt, "round 1 was run again"
    assert r.hget(state.run_key(), "last_round") == b"2"
    assert r.hget(state.round_key(2), "attempt") != orphaned_attempt, "round 2 was not re-planned"
    assert_same_weights(reference[0], models_in_redis(r, 2))
    results = json.loads((out / "results.json").read_text())
    assert [rec["round"] for rec in results["rounds"]] == [1, 2]
    assert results["evaluation"]["accuracy"] == reference[1]["evaluation"]["accuracy"]


@pytest.mark.slow
def test_redis_restarted_between_rounds(fault_stack, reference, tmp_path):
    """Restart redis-server after round 1 (SIGTERM, then the same command line): round 1's state is
    still there from the append-only file, and round 2 and the evaluation run to the local result."""
    r = state.connect(fault_stack.info.redis_url)
    seen: dict[str, Any] = {}

    def progress(event: str, **fields: Any) -> None:
        if event == "round_end" and fields["record"].round == 1:
            seen["before"] = (r.hgetall(state.round_key(1)), r.hgetall(state.run_key()))
            seen["old_pid"] = fault_stack.pid("redis")
            seen["new_pid"] = fault_stack.restart("redis", signal.SIGTERM)
            seen["after"] = (r.hgetall(state.round_key(1)), r.hgetall(state.run_key()))

    engine = engine_for(fault_stack, tmp_path, progress)
    try:
        got = engine.run()
    finally:
        engine.close()
    assert seen["new_pid"] != seen["old_pid"]
    assert seen["after"] == seen["before"], "round state was lost in the redis-server restart"
    assert seen["before"][0][b"state"] == b"done"
    assert_same_weights(reference[0], engine.model_state())
    assert got["evaluation"]["accuracy"] == reference[1]["evaluation"]["accuracy"]
