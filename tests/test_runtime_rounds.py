"""The round rules over the distributed runtime, with real processes (mosquitto, redis-server, a
Celery worker, two agent processes): the plan's decisions give the local engine's model, and an
agent killed mid-session is dropped within seconds — its devices left out, the round completing
on quorum, the model equal to the local run without them."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harmony.engine import LocalEngine
from orchestrator.engine import DistributedEngine
from server import state
from testbed.stack import LocalStack
from tests.conftest import tiny_config
from tests.runtime_fixtures import (
    left_out,
    local_without,
    paced_class,
    paced_step_s,
    same_weights,
    train_only,
    when_in_flight,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path_factory.mktemp("rounds-stack"))
    s.start(agents=2, devices_per_agent=2, registry=False)
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.slow
def test_planned_dropouts_give_the_local_model(stack, tmp_path):
    cfg = tiny_config(**{"fleet.dropout_probability": 0.4, "fleet.quorum": 0.25, "train.rounds": 3})
    local = LocalEngine(cfg)
    expected = local.run()
    assert any(r["dropouts"] for r in expected["rounds"]), "the seed drops nobody; the test would show nothing"
    assert stack.info is not None
    engine = DistributedEngine(cfg, tmp_path, mqtt=stack.info.mqtt, redis_url=stack.info.redis_url,
                               devices_timeout_s=60, round_timeout_s=120)
    try:
        got = engine.run()
    finally:
        engine.close()
    assert [r["dropouts"] for r in got["rounds"]] == [r["dropouts"] for r in expected["rounds"]]
    assert same_weights(local.model_state(), engine.model_state())
    assert got["evaluation"]["accuracy"] == expected["evaluation"]["accuracy"]


@pytest.mark.slow
def test_devices_slowed_past_the_deadline_are_stragglersleft_out(stack, tmp_path):
    """Two more devices in an agent process paced to a class far slower than the deadline allows
    (slow by construction, on any host): each round they miss the deadline, their sessions are
    stopped (the round does not wait for them), and the model is the local run's without them."""
    assert stack.info is not None
    deadline_s, crawl_flops = 15.0, 50e6
    cfg = tiny_config(**{"fleet.num_clients": 6, "data.num_shards": 12, "fleet.split_depths": [2, 3, 4],
                         "fleet.quorum": 0.5, "fleet.round_deadline_s": deadline_s, "train.local_steps": 20,
                         "train.rounds": 2})
    # clients 4 and 5 (depths 3 and 4) need at least this long for their steps: 3× the deadline
    assert min(paced_step_s(cfg, d, crawl_flops) for d in (3, 4)) * 20 > 3 * deadline_s
    stack.add_agent(["emu-4", "emu-5"], paced_class(tmp_path, "crawler", crawl_flops))
    ends: list[float] = []
    engine = DistributedEngine(cfg, tmp_path, lambda event, **f: ends.append(time.monotonic())
                               if event in ("round_start", "round_end") else None,
                               mqtt=stack.info.mqtt, redis_url=stack.info.redis_url, devices_timeout_s=90,
                               round_timeout_s=120)
    try:
        rounds = train_only(engine)
    finally:
        engine.close()
    for record in rounds:
        assert record["stragglers"] == [4, 5] and record["participants"] == 4, record
    # each round ended at its deadline (plus the aggregation), not after the slow devices finished
    # (their steps alone take over three deadlines)
    assert all(end - start < deadline_s + 10.0 for start, end in zip(ends[0::2], ends[1::2], strict=True)), ends
    r = state.connect(stack.info.redis_url)
    late = [f for _, f in r.xrange(state.events_key()) if f[b"name"] == b"session_late"]
    assert len(late) >= 4
    reference = local_without(cfg, left_out(rounds))
    assert same_weights(reference.model_state(), engine.model_state())


@pytest.mark.slow
def test_an_agent_killed_mid_session_is_dropped_within_seconds(stack, tmp_path):
    """SIGKILL the agent process of two devices while their round-1 sessions run: the broker sends
    their last will, the round completes on quorum within seconds (not at the 120 s timeout), the
    later rounds go on without them, and the model is the local run's without them."""
    assert stack.info is not None
    cfg = tiny_config(**{"fleet.quorum": 0.5, "train.rounds": 2, "train.local_steps": 40})
    r = state.connect(stack.info.redis_url)
    killed: dict[str, float] = {}

    def kill() -> None:
        stack.kill("agent-1", signal.SIGKILL)
        killed["at"] = time.monotonic()

    killer = when_in_flight(r, 1, {"emu-2", "emu-3"}, kill)
    ends: dict[int, float] = {}

    def progress(event: str, **fields: Any) -> None:
        if event == "round_start" and fields["round"] == 1 and not killer.is_alive() and not killed:
            killer.start()
        if event == "round_end":
            ends[fields["record"].round] = time.monotonic()

    engine = DistributedEngine(cfg, tmp_path, progress, mqtt=stack.info.mqtt, redis_url=stack.info.redis_url,
                               devices_timeout_s=60, round_timeout_s=120)
    try:
        rounds = train_only(engine)
    finally:
        engine.close()
    killer.join(timeout=5)
    assert "at" in killed, "the sessions of emu-2/emu-3 were never seen in flight"
    assert ends[1] - killed["at"] < 15, f"round 1 ended {ends[1] - killed['at']:.1f} s after the kill"
    assert rounds[0]["dropouts"] == [2, 3] and rounds[0]["participants"] == 2
    assert rounds[1]["offline"] == [2, 3] and rounds[1]["invited"] == 2  # known gone: not invited again
    reference = local_without(cfg, left_out(rounds))
    assert same_weights(reference.model_state(), engine.model_state())
