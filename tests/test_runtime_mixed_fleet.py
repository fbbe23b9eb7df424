"""A mixed fleet of 12 emulated devices at three speeds, with real processes (mosquitto,
redis-server, a Celery worker, four agent processes): one device SIGKILLed mid-session and one
slowed past the deadline, every round completes on quorum and the model is the local run's
without them; with too many devices gone a round is marked failed, retried and given up on in
seconds, never hung."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harmony.engine import LocalEngine
from harmony.rounds import RoundFailedError
from orchestrator.engine import DistributedEngine
from server import state
from testbed.stack import LocalStack
from tests.conftest import same_bits, tiny_config
from tests.runtime_fixtures import paced_class, paced_step_s, when_in_flight

DEADLINE_S = 40.0
CRAWL_FLOPS = 15e6
"""The class of emu-11, paced by its agent: a depth-4 step of the test's config takes 17 s at least, so
its six steps take twice the deadline on any host (slow by construction, not a factor of the host's speed)."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    directory = tmp_path_factory.mktemp("mixed-stack")
    s = LocalStack(directory)
    s.start(agents=0, worker_concurrency=12, registry=False)
    s.add_agent([f"emu-{k}" for k in range(6)])  # agent-0: host speed
    s.add_agent([f"emu-{k}" for k in range(6, 10)], ["--slowdown", "3"])  # agent-1: 3× slower
    s.add_agent(["emu-10"])  # agent-2: killed mid-session
    s.add_agent(["emu-11"], paced_class(directory, "crawler", CRAWL_FLOPS))  # agent-3: far past the deadline
    try:
        yield s
    finally:
        s.stop()


def _engine(stack: LocalStack, cfg: Any, tmp_path: Any, progress: Any, timeout_s: float = 300
            ) -> DistributedEngine:
    assert stack.info is not None
    return DistributedEngine(cfg, tmp_path, progress, mqtt=stack.info.mqtt, redis_url=stack.info.redis_url,
                             devices_timeout_s=90, round_timeout_s=timeout_s)


@pytest.mark.slow
def test_a_killed_and_a_slow_device_leave_every_round_on_quorum(stack, tmp_path):
    cfg = tiny_config(**{"fleet.num_clients": 12, "data.num_shards": 24, "fleet.split_depths": [2, 3, 4],
                         "fleet.quorum": 0.75, "fleet.round_deadline_s": DEADLINE_S, "train.local_steps": 6,
                         "train.rounds": 3})
    assert paced_step_s(cfg, 4, CRAWL_FLOPS) * 6 > 2 * DEADLINE_S  # emu-11 (client 11, depth 4) is late by construction
    assert stack.info is not None
    r = state.connect(stack.info.redis_url)
    killed: dict[str, float] = {}

    def kill() -> None:
        stack.kill("agent-2", signal.SIGKILL)
        killed["at"] = time.time()

    killer = when_in_flight(r, 2, {"emu-10"}, kill, settle_s=0.0, timeout_s=120, poll_s=0.01)
    spans: dict[int, list[float]] = {}

    def progress(event: str, **fields: Any) -> None:
        if event == "round_start":
            spans[fields["round"]] = [time.monotonic()]
            if fields["round"] == 2 and not killer.is_alive() and not killed:
                killer.start()
        if event == "round_end":
            spans[fields["record"].round].append(time.monotonic())

    engine = _engine(stack, cfg, tmp_path, progress, timeout_s=DEADLINE_S + 10)
    try:
        results = engine.run()
    finally:
        engine.close()
    rounds = results["rounds"]
    # the evaluation leaves out the dead device; the slow one is left out at the timeout, or reports
    # when its agent reaches the command in time (its class paces training steps, not evaluation,
    # and how long its last cancelled step sleeps on decides which: seen both ways in the suite)
    unevaluated = results["evaluation"]["unevaluated"]
    assert unevaluated in ([10], [10, 11]), unevaluated
    assert [c["client"] for c in results["evaluation"]["per_client"]] == [i for i in range(12) if i not in unevaluated]
    assert time.monotonic() - spans[3][1] < DEADLINE_S + 10 + 30
    killer.join(timeout=5)
    assert "at" in killed, "emu-10's round-2 session was never seen in flight"
    assert [r_["stragglers"] for r_ in rounds] == [[11], [11], [11]]
    assert [r_["dropouts"] for r_ in rounds] == [[], [10], []]
    assert [r_["offline"] for r_ in rounds] == [[], [], [10]]  # known gone: round 3 does not invite it
    assert [r_["participants"] for r_ in rounds] == [11, 10, 10]
    # rounds end at the deadline (the slow device is stopped there), never waiting it out
    for rnd, (start, end) in spans.items():
        assert end - start < DEADLINE_S + 20, (rnd, end - start)
    # the kill is seen within seconds, not at the deadline (the event stream's ids are ms timestamps)
    drops = [int(eid.split(b"-")[0]) / 1e3 for eid, f in r.xrange(state.events_key())
             if f[b"name"] == b"session_dropped" and json.loads(f[b"device"]) == "emu-10"
             and json.loads(f[b"round"]) == 2]
    assert drops and drops[0] - killed["at"] < 10, (drops, killed)
    # the model is the local run's with those devices left out of those rounds
    left_out = {r_["round"]: set(r_["dropouts"]) | set(r_["stragglers"]) | set(r_["offline"]) for r_ in rounds}
    local = LocalEngine(cfg.with_overrides(**{"fleet.round_deadline_s": None}))
    local.participants = lambda rnd, *_: [i for i in range(12)  # type: ignore[method-assign]
                                          if i not in left_out.get(rnd, set())]
    local.train()
    a, b = local.model_state(), engine.model_state()
    assert all(same_bits(a[s][k], b[s][k]) for s in a for k in a[s])


@pytest.mark.slow
def test_below_quorum_a_round_is_failed_retried_and_given_up_on_in_seconds(stack, tmp_path):
    """Four fast devices; after round 1 their agent process is killed: round 2's tries all fall
    below quorum, each marked failed, and the run stops with the reason, within seconds."""
    cfg = tiny_config(**{"fleet.quorum": 3, "train.rounds": 2, "train.local_steps": 4})
    assert stack.info is not None
    r = state.connect(stack.info.redis_url)
    killed: dict[str, float] = {}

    def progress(event: str, **fields: Any) -> None:
        if event == "round_end" and fields["record"].round == 1:
            stack.kill("agent-0", signal.SIGKILL)
            killed["at"] = time.monotonic()

    engine = _engine(stack, cfg, tmp_path, progress)
    assert engine.device_ids == ["emu-0", "emu-1", "emu-2", "emu-3"]
    try:
        engine.fleet.begin_run(False)
        with pytest.raises(RoundFailedError, match="round 2 fell below quorum in all 3 tries"):
            list(engine.train())
    finally:
        engine.close()
    # each retry waits fleet.retry_grace_s for the lost devices, which do not come back
    assert time.monotonic() - killed["at"] < 30 + 2 * cfg.fleet.retry_grace_s
    failed = [f for _, f in r.xrange(state.events_key()) if f[b"name"] == b"round_failed"
              and json.loads(f[b"round"]) == 2]
    assert len(failed) == 3 and all("0 of" in json.loads(f[b"reason"]) and "quorum 3" in json.loads(f[b"reason"])
                                    for f in failed)
    assert "offline: [0, 1, 2, 3]" in json.loads(failed[-1][b"reason"])  # the retries invite nobody gone
    assert r.hget(state.round_key(2), "state") == b"failed"
