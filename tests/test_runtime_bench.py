"""Runs that survive what a bench of boards does, under the default round rules, with real
processes (mosquitto, redis-server, a Celery worker, agent processes; `harmony run --stack` as a
user starts it): seven devices, one of whose agent is SIGKILLed in round 2 and started again by
hand — the run completes (exit 0) with the dropout recorded, the device back in a later round and
the final model the local engine's given the same participation record; a second run on the same
stack is refused, naming the first, which is not disturbed; an agent restarted just before the
final evaluation is assigned again on its ``hello`` and evaluated within seconds; a device far
slower than the others is a straggler of every round without any deadline configured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from broker.client import BrokerClient
from orchestrator.engine import DistributedEngine
from server import state
from testbed.stack import LocalStack
from tests.conftest import tiny_config
from tests.runtime_fixtures import left_out, local_without, paced_class, paced_step_s, same_weights, when_in_flight

ROOT = Path(__file__).resolve().parents[1]
SEVEN = {"fleet.num_clients": 7, "data.num_shards": 14, "train.local_steps": 20}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """emu-0…emu-5 in one agent process, emu-6 alone in a second (agent-1), seven session threads."""
    stack = LocalStack(tmp_path_factory.mktemp("bench"))
    stack.start(agents=1, devices_per_agent=6, worker_concurrency=7, registry=False)
    stack.add_agent(["emu-6"])
    try:
        yield stack
    finally:
        stack.stop()


def _harmony_run(stack: LocalStack, cfg: Any, out: Path, log: Path) -> subprocess.Popen:
    cfg_path = out.parent / f"{out.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(cfg_path), "--runtime", "distributed",
                                 "--stack", str(stack.run_dir), "--out", str(out), "--round-timeout", "300"],
                                cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_until(check: Any, timeout_s: float, what: str, proc: subprocess.Popen | None = None,
                log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n"
                                 + (log.read_text()[-3000:] if log else ""))
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def _await_hello(stack: LocalStack, dev: str, after: float, timeout_s: float = 90) -> None:
    """Block until ``dev`` announced a ``hello`` of an agent started after ``after`` (unix s)."""
    assert stack.info is not None
    watcher = BrokerClient(f"test-hello-{dev}-{os.getpid()}", *stack.info.mqtt, clean_start=True, session_expiry_s=0)
    watcher.connect()
    try:
        hellos = watcher.subscribe(watcher.topics.hello(dev))
        hellos.wait_for("hello", lambda e: (e.body.started_at or 0) > after, timeout=timeout_s)
    finally:
        watcher.close()


def _new_run(r: Any, previous: bytes | None) -> bool:
    return r.hget(state.run_key(), "id") not in (None, previous)


def _checkpoint_model(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    return {"client": payload["client_global"], "server": payload["server_global"]}


@pytest.mark.slow
def test_seven_devices_one_agent_killed_mid_round(bench, tmp_path):
    """Default round rules (no fleet.quorum, no deadline): emu-6's agent is SIGKILLed while its
    round-2 session runs and started again by hand. The run completes; round 2 records emu-6 as a
    dropout and completes with the other six; emu-6 takes part again from the round after its new
    agent said hello; the final model equals the local engine's with the same participation."""
    cfg = tiny_config(**{**SEVEN, "train.rounds": 4})
    r = state.connect(bench.info.redis_url)
    killed: dict[str, float] = {}

    def kill() -> None:
        bench.kill("agent-1", signal.SIGKILL)
        killed["at"] = time.time()
        bench.restart("agent-1")  # by hand: `fleet emulate` restarts its devices itself

    killer = when_in_flight(r, 2, {"emu-6"}, kill, timeout_s=240)

    def progress(event: str, **fields: Any) -> None:
        if event == "round_end" and fields["record"].round == 1:
            killer.start()
        if event == "round_end" and fields["record"].round == 2:
            killer.join(timeout=60)  # (round 2 may end on the last will before the killer has noted the time)
            if "at" in killed:
                _await_hello(bench, "emu-6", killed["at"])  # (a round takes seconds; an agent's start more)

    engine = DistributedEngine(cfg, tmp_path, progress, mqtt=bench.info.mqtt, redis_url=bench.info.redis_url,
                               devices_timeout_s=120, round_timeout_s=300)
    try:
        results = engine.run()
    finally:
        engine.close()
    killer.join(timeout=5)
    assert "at" in killed, "emu-6's round-2 session was never seen in flight"
    rounds = results["rounds"]
    assert rounds[0]["participants"] == 7 and all(r_["attempts"] == 1 for r_ in rounds), rounds
    assert rounds[1]["dropouts"] == [6] and rounds[1]["participants"] == 6, rounds[1]
    assert rounds[2]["rejoined"] == [6] and rounds[2]["offline"] == [], rounds[2]
    assert results["evaluation"]["unevaluated"] == []
    reference = local_without(cfg, left_out(rounds))
    assert same_weights(reference.model_state(), engine.model_state())


@pytest.mark.slow
def test_a_second_run_on_the_stack_is_refused_and_the_first_is_undisturbed(bench, tmp_path):
    """`harmony run --stack S` twice, the second a few seconds after the first: the second exits 2
    naming the first (its output directory and process) and how to stop it, changing nothing; the
    first completes with the local engine's model."""
    cfg = tiny_config(**{**SEVEN, "train.rounds": 3})
    r = state.connect(bench.info.redis_url)
    previous = r.hget(state.run_key(), "id")
    first_out, second_out = tmp_path / "first", tmp_path / "second"
    first = _harmony_run(bench, cfg, first_out, tmp_path / "first.log")
    try:
        _wait_until(lambda: _new_run(r, previous) and r.hlen(state.ready_key(1)) > 0, 240, "the first run's round 1",
                    first, tmp_path / "first.log")
        run_id = r.hget(state.run_key(), "id")
        second = _harmony_run(bench, cfg, second_out, tmp_path / "second.log")
        assert second.wait(120) == 2, (tmp_path / "second.log").read_text()[-3000:]
        said = " ".join((tmp_path / "second.log").read_text().split())
        assert "busy" in said and str(first_out.resolve()) in said and f"kill -INT {first.pid}" in said, said
        assert r.hget(state.run_key(), "id") == run_id, "the refused run touched the stack's run"
        assert first.wait(400) == 0, (tmp_path / "first.log").read_text()[-4000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (second_out / "results.json").exists()
    rounds = json.loads((first_out / "results.json").read_text())["rounds"]
    reference = local_without(cfg, left_out(rounds))
    assert same_weights(reference.model_state(), _checkpoint_model(first_out))
    assert r.get(state.lease_key()) is None, "the finished run kept the stack's lease"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["splitgp", "splitgp+ft"])  # evaluation alone; personalisation first
def test_an_agent_restarted_just_before_the_final_evaluation_is_assigned_again_on_its_hello(bench, tmp_path,
                                                                                           algorithm):
    """emu-6's agent is killed and started again as the final evaluation begins, and the evaluation
    starts once its new agent is connected (``online``) — before or after its ``hello``: the driver
    sends it ``assign`` again when the hello comes (and the command it missed, ``personalise`` or
    ``evaluate``), and it is evaluated within seconds, not after the round timeout."""
    cfg = tiny_config(**{**SEVEN, "train.rounds": 1, "train.algorithm": algorithm})
    seen: dict[str, float] = {}

    def progress(event: str, **fields: Any) -> None:
        if event != "evaluate_start":
            return
        watcher = BrokerClient(f"test-status-{os.getpid()}", *bench.info.mqtt, clean_start=True, session_expiry_s=0)
        watcher.connect()
        try:
            statuses = watcher.subscribe(watcher.topics.status("emu-6"))
            bench.kill("agent-1", signal.SIGKILL)
            seen["killed"] = time.time()
            bench.restart("agent-1")
            statuses.wait_for("status", lambda e: e.body.state == "online", timeout=60)  # its new agent connected
        finally:
            watcher.close()
        time.sleep(1.0)  # the driver has the status too; the new agent measures itself for seconds before its hello
        seen["evaluating"] = time.monotonic()

    engine = DistributedEngine(cfg, tmp_path, progress, mqtt=bench.info.mqtt, redis_url=bench.info.redis_url,
                               devices_timeout_s=120, round_timeout_s=300)
    try:
        results = engine.run()
    finally:
        engine.close()
    took = time.monotonic() - seen["evaluating"]
    assert took < 60, f"the evaluation took {took:.0f} s after the restart (round timeout 300 s)"
    assert results["evaluation"]["unevaluated"] == [], "the restarted device was left out of the evaluation"
    r = state.connect(bench.info.redis_url)
    assert any(f[b"name"] == b"device_reassigned" and json.loads(f[b"device"]) == "emu-6"
               for _, f in r.xrange(state.events_key(), min=f"{int(seen['killed'] * 1000)}-0"))


@pytest.mark.slow
def test_a_far_slower_device_is_a_straggler_without_any_deadline_configured(bench, tmp_path):
    """An eighth device paced to a crawl, no fleet.round_deadline_s: once the quorum is in, the others
    get max(30 s, fleet.quorum_slack × that time), so the slow device — whose steps take longer than
    that by construction, whatever the host's speed — is a straggler of every round; without the
    derived deadline the round would wait for it."""
    cfg = tiny_config(**{**SEVEN, "fleet.num_clients": 8, "data.num_shards": 16, "train.rounds": 2})
    assert cfg.fleet.round_deadline_s is None and cfg.fleet.deadline_slack is None
    crawl_flops = 1e7  # steps of 9 s or more: 20 of them outlast a derived deadline of 30 s
    depths = set(cfg.fleet.split_depths)
    assert min(paced_step_s(cfg, d, crawl_flops) for d in depths) * cfg.train.local_steps > 150
    bench.add_agent(["emu-7"], paced_class(tmp_path, "crawler", crawl_flops))
    ends: list[float] = []
    engine = DistributedEngine(cfg, tmp_path, lambda event, **f: ends.append(time.monotonic())
                               if event in ("round_start", "round_end") else None,
                               mqtt=bench.info.mqtt, redis_url=bench.info.redis_url, devices_timeout_s=120,
                               round_timeout_s=600)
    try:
        engine.fleet.begin_run(False)
        rounds = [vars(rec) for rec in engine.train()]
    finally:
        engine.close()
    for record in rounds:
        assert record["stragglers"] == [7] and record["participants"] == 7, record
    reference = local_without(cfg, left_out(rounds))
    assert same_weights(reference.model_state(), engine.model_state())
