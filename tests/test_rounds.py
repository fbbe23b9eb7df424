"""The rules that decide a round (harmony.rounds) and the simulated clock of the local engine:
deadlines leave stragglers out, dropouts are discarded, a round below quorum is tried again or
fails visibly, and every decision is a seeded function of the plan."""

from __future__ import annotations

import json

import pytest
import torch

from harmony.config import ConfigError
from harmony.engine import LocalEngine
from harmony.experiment import Experiment
from harmony.rounds import RoundFailedError, plan_round, quorum_count
from tests.conftest import tiny_config

MIXED = {"fleet.split_depths": None, "fleet.profiles": ["pi_zero_2", "laptop"], "fleet.clock": "simulated",
         "fleet.step_budget_s": 100.0}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])


@pytest.mark.parametrize(("quorum", "participants", "need"), [
    (1.0, 10, 10), (0.5, 10, 5), (0.55, 10, 6), (0.01, 10, 1), (3, 10, 3), (30, 10, 10), (0.5, 0, 1),
])
def test_quorum_count(quorum, participants, need):
    assert quorum_count(quorum, participants) == need


def test_bad_round_settings_are_named():
    with pytest.raises(ConfigError, match="quorum 2.5: above 1 it is a count"):
        tiny_config(**{"fleet.quorum": 2.5})
    with pytest.raises(ConfigError, match="availability_trace runs on the simulated clock"):
        tiny_config(**{"fleet.availability_trace": "trace.json"})
    with pytest.raises(ConfigError, match="fleet.offline_probability"):
        tiny_config(**{"fleet.offline_probability": 1.0})


def test_plan_is_seeded_and_draws_participants_among_the_available():
    cfg = tiny_config(**{"fleet.num_clients": 8, "data.num_shards": 16, "fleet.offline_probability": 0.4,
                         "train.participation": 0.5})
    ex = Experiment.plan(cfg)
    plans = [plan_round(ex, r) for r in range(1, 9)]
    assert plans == [plan_round(Experiment.plan(cfg), r) for r in range(1, 9)]  # the same decisions every time
    assert any(p.offline for p in plans) and all(len(p.offline) < 8 for p in plans)
    for p in plans:
        assert not set(p.participants) & set(p.offline)
        assert len(p.participants) == min(4, 8 - len(p.offline))
    assert plan_round(ex, 1, attempt=1) != plans[0]  # a retry draws again
    # with everything available and no rules set, the plan is the old participant draw
    plain = Experiment.plan(tiny_config(**{"train.participation": 0.5}))
    assert [plan_round(plain, r).participants for r in range(1, 4)] == [plain.participants(r) for r in range(1, 4)]


@pytest.mark.slow  # long: out of make test-fast
def test_deadline_leaves_stragglers_out_and_the_model_is_the_run_without_them():
    cfg = tiny_config(**MIXED)
    ex = Experiment.plan(cfg)
    estimates = [ex.session_estimate_s(i) for i in range(4)]
    slow = [i for i in range(4) if ex.profiles[i] == "pi_zero_2"]
    assert min(estimates[i] for i in slow) > max(estimates[i] for i in range(4) if i not in slow)
    deadline = (min(estimates[i] for i in slow) + max(e for i, e in enumerate(estimates) if i not in slow)) / 2
    with_deadline = LocalEngine(cfg.with_overrides(**{"fleet.round_deadline_s": deadline, "fleet.quorum": 0.5}))
    results = with_deadline.run()
    for record in results["rounds"]:
        assert record["stragglers"] == slow and record["participants"] == 4 - len(slow)
        assert record["invited"] == 4 and record["deadline_s"] == deadline
    assert results["rounds"][-1]["clock_s"] == pytest.approx(2 * deadline)
    without = LocalEngine(cfg)
    without.participants = lambda rnd, *_: [i for i in range(4) if i not in slow]  # type: ignore[method-assign]
    without.train()
    assert _same(with_deadline.model_state(), without.model_state())
    # a slack factor derives the deadline from the estimates: 1.0 keeps everybody
    slack = LocalEngine(cfg.with_overrides(**{"fleet.deadline_slack": 1.0, "train.rounds": 1})).run()
    assert slack["rounds"][0]["stragglers"] == [] and slack["rounds"][0]["deadline_s"] == pytest.approx(max(estimates))


@pytest.mark.slow  # long: out of make test-fast
def test_dropouts_are_discarded_and_deterministic():
    cfg = tiny_config(**{"fleet.dropout_probability": 0.4, "fleet.quorum": 0.25, "train.rounds": 3})
    first, second = LocalEngine(cfg), LocalEngine(cfg)
    a, b = first.run(), second.run()
    dropped = [r["dropouts"] for r in a["rounds"]]
    assert dropped == [r["dropouts"] for r in b["rounds"]] and any(dropped)
    assert _same(first.model_state(), second.model_state())
    for r in a["rounds"]:
        assert r["participants"] == 4 - len(r["dropouts"])


@pytest.mark.slow  # long: out of make test-fast
def test_below_quorum_the_round_is_retried_then_fails_visibly():
    cfg = tiny_config(**{"fleet.dropout_probability": 0.5, "fleet.quorum": 4, "fleet.round_retries": 30,
                         "train.rounds": 1})
    record = LocalEngine(cfg).run()["rounds"][0]
    assert record["attempts"] > 1 and record["dropouts"] == [] and record["participants"] == 4
    events: list[str] = []
    stuck = LocalEngine(cfg.with_overrides(**{"fleet.round_retries": 1, "fleet.dropout_probability": 0.9}),
                        progress=lambda event, **f: events.append(event))
    with pytest.raises(RoundFailedError, match=r"round 1 fell below quorum in all 2 tries.*lower fleet.quorum"):
        stuck.train()
    assert events.count("round_retry") == 2


def test_an_availability_trace_takes_devices_off_and_drops_them_mid_session(tmp_path):
    cfg = tiny_config(**MIXED)
    ex = Experiment.plan(cfg)
    fast = next(i for i in range(4) if ex.profiles[i] == "laptop")
    other = next(i for i in range(4) if i != fast)
    trace = tmp_path / "trace.json"
    # `fast` is off for the first round's start; `other` goes off half-way through its first session
    half = ex.session_estimate_s(other) / 2
    trace.write_text(json.dumps({str(fast): [[0.0, 1.0]], str(other): [[half, half + 1.0]]}))
    result = LocalEngine(cfg.with_overrides(**{"fleet.availability_trace": str(trace), "train.rounds": 1,
                                               "fleet.quorum": 0.5})).run()
    record = result["rounds"][0]
    assert record["offline"] == [fast] and record["dropouts"] == [other]
    assert record["participants"] == 2
    with pytest.raises(FileNotFoundError, match="fleet.availability_trace"):
        Experiment.plan(cfg.with_overrides(**{"fleet.availability_trace": str(tmp_path / "missing.json")}))


def test_a_device_that_comes_back_is_recorded_as_rejoined():
    cfg = tiny_config(**{"fleet.offline_probability": 0.4, "fleet.dropout_probability": 0.2, "fleet.quorum": 0.25,
                         "train.rounds": 5, "train.local_steps": 1})
    engine = LocalEngine(cfg)
    events: list[tuple[str, dict]] = []
    engine.progress = lambda e, **f: events.append((e, f))
    records = engine.train()
    gone: set[int] = set()
    rejoins = 0
    for r in records:
        completed = set(range(4)) - set(r.offline) - set(r.dropouts) - set(r.stragglers)
        assert r.rejoined == sorted(completed & gone), r
        rejoins += len(r.rejoined)
        gone = (gone - completed) | set(r.dropouts) | set(r.offline)
    assert rejoins > 0, "the seed brings nobody back; the test would show nothing"
    assert sum(1 for e, _ in events if e == "rejoined") == rejoins
