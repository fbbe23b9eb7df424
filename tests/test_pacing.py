"""The emulated devices' compute pacing as a closed loop (edge_agent/emulation.py), on a fake clock:
each verdict is exact arithmetic, whatever the host's speed or load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edge_agent.emulation import QUOTA_STEP, QuotaGovernor, StepPacer, next_quota


class FakeClock:
    """Time that moves only when a step's work or the pacer's sleep says so; ``oversleep`` is added
    to every sleep (a busy host wakes the device late)."""

    def __init__(self, oversleep: float = 0.0) -> None:
        self.now = 0.0
        self.oversleep = oversleep
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds + self.oversleep


def run_steps(pacer: StepPacer, clock: FakeClock, works: list[float]) -> list[float]:
    """Each step's realised time (work + the pacer's sleep) for the given work times."""
    realised = []
    for work in works:
        t0 = clock.now
        with pacer.phase():
            clock.now += work
        pacer.finish()
        realised.append(clock.now - t0)
    return realised


def test_steps_faster_than_the_class_are_padded_to_its_step_time():
    clock = FakeClock()
    pacer = StepPacer(0.2, clock=clock, sleep=clock.sleep)
    assert run_steps(pacer, clock, [0.05, 0.12, 0.01]) == pytest.approx([0.2, 0.2, 0.2])
    assert pacer.work_s == pytest.approx((0.05 + 0.12 + 0.01) / 3) and not pacer.host_too_slow


def test_a_late_wake_up_is_taken_back_from_the_next_steps_so_the_mean_holds():
    """A busy host wakes every sleep 30 ms late: open-loop pacing ran 15 % slow; the loop pads less."""
    target, work = 0.2, 0.05
    clock = FakeClock(oversleep=0.03)
    pacer = StepPacer(target, clock=clock, sleep=clock.sleep)
    realised = run_steps(pacer, clock, [work] * 40)
    assert sum(realised) / len(realised) == pytest.approx(target, rel=0.01)
    assert realised[0] == pytest.approx(0.23)  # the first step cannot know
    assert clock.slept[1] == pytest.approx(target - work - 0.03)


def test_a_step_held_up_by_the_host_is_caught_up_within_the_debt_bound():
    clock = FakeClock()
    pacer = StepPacer(0.2, max_debt_steps=2, clock=clock, sleep=clock.sleep)
    realised = run_steps(pacer, clock, [0.05, 0.35, 0.05, 0.05, 0.05])
    # 0.15 s late at step 2, caught up at step 3 (work 0.05, no pad): the device is back on its class
    assert realised == pytest.approx([0.2, 0.35, 0.05, 0.2, 0.2])
    assert sum(realised) == pytest.approx(5 * 0.2)
    # a long stall: at most two targets' worth is caught up afterwards
    clock2 = FakeClock()
    pacer2 = StepPacer(0.2, max_debt_steps=2, clock=clock2, sleep=clock2.sleep)
    after = run_steps(pacer2, clock2, [3.0] + [0.05] * 6)[1:]
    assert after == pytest.approx([0.05, 0.05, 0.1, 0.2, 0.2, 0.2])  # 0.15 + 0.15 + 0.1 = two targets
    assert pacer2.debt_s == pytest.approx(0.0)


def test_work_longer_than_the_target_is_reported_as_a_host_too_slow_for_the_class():
    clock = FakeClock()
    pacer = StepPacer(0.06, window=4, clock=clock, sleep=clock.sleep)
    run_steps(pacer, clock, [0.135] * 4)
    assert pacer.host_too_slow and pacer.realised_s == pytest.approx(0.135) and clock.slept == []
    run_steps(pacer, clock, [0.02] * 8)  # the load went: it catches up, then holds the class again
    assert not pacer.host_too_slow and pacer.realised_s == pytest.approx(0.06)
    assert math.isnan(StepPacer(0.1).work_s)


def test_a_quota_that_holds_a_device_below_its_class_is_raised_and_never_lowered():
    # throttled, and the work left the pacing no room (>= 90 % of the target): raised
    assert next_quota(0.06, work_s=0.46, target_s=0.239, throttled=True) == pytest.approx(0.06 * QUOTA_STEP)
    # not throttled: the host is slow, not the quota; unchanged
    assert next_quota(0.06, work_s=0.46, target_s=0.239, throttled=False) == 0.06
    # throttled but with room to pace (the quota only capped a burst): unchanged
    assert next_quota(0.06, work_s=0.10, target_s=0.239, throttled=True) == 0.06
    # never above the ceiling (one torch thread: one CPU)
    assert next_quota(0.9, work_s=1.0, target_s=0.2, throttled=True, ceiling_cpus=1.0) == 1.0
    assert next_quota(1.0, work_s=1.0, target_s=0.2, throttled=True, ceiling_cpus=1.0) == 1.0


def test_the_governor_reads_the_throttle_count_and_writes_the_raised_quota(tmp_path: Path):
    """A cgroup directory's files as the kernel lays them out (a plain directory here: the file
    protocol is what is tested; the real cgroup is exercised by the fleet tests)."""
    cg = tmp_path / "hemu-test-0"
    cg.mkdir()
    (cg / "cpu.cfs_period_us").write_text("20000\n")
    (cg / "cpu.cfs_quota_us").write_text("1200\n")
    (cg / "cpu.stat").write_text("nr_periods 10\nnr_throttled 3\nthrottled_time 100\n")
    governor = QuotaGovernor(cg)
    assert governor.cpus == pytest.approx(0.06)
    assert governor.after_step(0.46, 0.239) is None  # no throttling since the start: nothing to blame
    (cg / "cpu.stat").write_text("nr_periods 30\nnr_throttled 9\nthrottled_time 900\n")
    assert governor.after_step(0.46, 0.239) == pytest.approx(0.09)
    assert (cg / "cpu.cfs_quota_us").read_text() == "1800"
    assert governor.after_step(0.46, 0.239) is None  # throttled no more since the last step
