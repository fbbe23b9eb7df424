"""The rules that decide a round (harmony.rounds) and the simulated clock of the local engine:
deadlines leave stragglers out, dropouts are discarded, a round below quorum is tried again or
fails visibly, and every decision is a seeded function of the plan."""

from __future__ import annotations

import json

import pytest
import torch

from harmony.config import ConfigError
from harmony.engine import Engine, LocalEngine
from harmony.experiment import Experiment
from harmony.fleet import InProcessFleet
from harmony.rounds import DERIVED_DEADLINE_FLOOR_S, RoundFailedError, derived_deadline_s, plan_round, quorum_count
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


def test_failures_are_accepted_by_default():
    """With the default ``fleet.quorum`` (0.5, Flower's accept_failures with a minimum) a round with
    dropouts completes with the sessions that finished; 1.0 asks for every participant again."""
    cfg = tiny_config(**{"fleet.dropout_probability": 0.3, "train.rounds": 3})
    assert cfg.fleet.quorum == 0.5
    records = LocalEngine(cfg).run()["rounds"]
    assert any(r["dropouts"] for r in records), "the seed drops nobody; the test would show nothing"
    assert all(r["attempts"] == 1 and r["participants"] == 4 - len(r["dropouts"]) >= 2 for r in records), records


def test_plan_leaves_unreachable_devices_uninvited_and_counts_them_against_the_quorum():
    ex = Experiment.plan(tiny_config(**{"fleet.quorum": 0.75}))
    plan = plan_round(ex, 1, unreachable={1})
    assert plan.participants == [0, 2, 3] and plan.offline == [1]
    assert plan.quorum == 3  # 0.75 of the 4 drawn, not of the 3 invited
    assert not plan.hopeless(0, 0) and plan.hopeless(2, 1) and not plan.hopeless(3, 0)
    assert plan_round(ex, 1, unreachable={1, 2}).hopeless(0, 0)  # 2 reachable, quorum 3: no session starts


def test_derived_deadline_needs_a_stack_and_no_configured_deadline():
    ex = Experiment.plan(tiny_config())
    assert plan_round(ex, 1).quorum_slack is None  # one process: sessions one after another, nothing derived
    plan = plan_round(ex, 1, derive_deadline=True)
    assert plan.deadline_s is None and plan.quorum_slack == 5.0
    assert derived_deadline_s(plan, 1.0) == DERIVED_DEADLINE_FLOOR_S
    assert derived_deadline_s(plan, 20.0) == 100.0 and derived_deadline_s(plan, 2.0) == 30.0
    fixed = plan_round(Experiment.plan(tiny_config(**{"fleet.round_deadline_s": 5.0})), 1, derive_deadline=True)
    assert fixed.deadline_s == 5.0 and derived_deadline_s(fixed, 20.0) is None


class _GoneFleet(InProcessFleet):
    """Every device in this process, but the fleet says client ``gone`` is unreachable and records
    every session it starts and every wait for lost devices."""

    def __init__(self, experiment: Experiment, gone: set[int]) -> None:
        super().__init__(experiment)
        self.gone = gone
        self.started: list[tuple[int, list[int]]] = []
        self.waits: list[tuple[list[int], float]] = []

    def unreachable(self) -> set[int]:
        return set(self.gone)

    def wait_back(self, clients: list[int], timeout_s: float) -> None:
        self.waits.append((clients, timeout_s))
        self.gone.clear()  # it came back during the grace

    def train(self, rnd, starts, server_start, plan):
        self.started.append((rnd, sorted(starts)))
        return super().train(rnd, starts, server_start, plan)


def test_a_device_known_gone_is_not_invited_and_a_retry_waits_for_it_then_readmits_it():
    cfg = tiny_config(**{"fleet.quorum": 4, "train.rounds": 1})
    ex = Experiment.plan(cfg)
    fleet = _GoneFleet(ex, {2})
    events: list[str] = []
    engine = Engine(ex, fleet, progress=lambda e, **f: events.append(e))
    record = engine.run_round(1)
    # try 1: client 2 is gone, so quorum 4 is out of reach: no session starts at all; the retry waits
    # up to fleet.retry_grace_s for it, it is back, and try 2 runs every device
    assert fleet.started == [(1, [0, 1, 2, 3])]
    assert fleet.waits == [([2], cfg.fleet.retry_grace_s)]
    assert record.attempts == 2 and record.participants == 4 and record.offline == []
    assert events.count("round_retry") == 1


def test_a_try_that_can_no_longer_reach_its_quorum_ends_at_once():
    """Quorum 4 of 4: the first dropout makes the try hopeless, and no further session of that try
    runs (today every session of a lost try runs to its end before the next try)."""
    cfg = tiny_config(**{"fleet.quorum": 4, "fleet.dropout_probability": 0.3, "fleet.round_retries": 20,
                         "train.rounds": 1})
    events: list[tuple[str, dict]] = []
    engine = LocalEngine(cfg, progress=lambda e, **f: events.append((e, f)))
    record = engine.run()["rounds"][0]
    assert record["attempts"] > 1
    tries: list[list[str]] = []
    for name, _ in events:
        if name == "round_start":
            tries.append([])
        elif name.startswith("session_"):
            tries[-1].append(name)
    for failed in tries[:-1]:  # each failed try stopped at its first dropout
        assert failed[-1] == "session_dropped" and failed.count("session_dropped") == 1, tries
    assert tries[-1] == ["session_done"] * 4
