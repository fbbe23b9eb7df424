"""``PhaseClock``: the per-phase split a distributed session reports."""

from __future__ import annotations

import time

import pytest

from harmony.timing import PhaseClock


def test_phases_accumulate_their_own_wall_time():
    clock = PhaseClock()
    for _ in range(2):
        with clock("wait"):
            time.sleep(0.02)
        with clock("compute"):
            pass
    split = clock.seconds()
    assert set(split) == {"compute", "wait", "send"} and split["send"] == 0.0
    assert 0.04 <= split["wait"] < 0.5
    assert split["compute"] < split["wait"]


def test_a_phase_that_raises_still_counts():
    clock = PhaseClock("io")
    with pytest.raises(TimeoutError), clock("io"):
        time.sleep(0.01)
        raise TimeoutError
    assert clock.seconds()["io"] >= 0.01


def test_cpu_seconds_count_work_not_waiting():
    clock = PhaseClock()
    with clock("wait"):
        time.sleep(0.05)
    with clock("compute"):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.05:
            pass
    cpu = clock.cpu_seconds()
    assert set(cpu) == {"compute", "wait", "send"}
    assert cpu["wait"] < 0.02 and cpu["compute"] > 0.01
    assert cpu["compute"] <= clock.seconds()["compute"] + 1e-3
