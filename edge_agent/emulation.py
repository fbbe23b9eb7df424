"""Device-class limits the agent enforces itself (``--device-class CLASS --emulate``, docs/emulation.md).

Where the host cannot enforce a class's limits from outside (no root, no cgroup ``cpu`` controller,
no network namespaces; ``testbed.emulate`` decides), the agent does:

- **compute pacing**: a training step takes its FLOPs ÷ the class's rate — the step's compute
  phases are timed and the last one sleeps for what is left, less what earlier steps overran (a
  closed loop, :class:`StepPacer`); the ``hello`` micro-benchmark is paced too, so it measures the
  paced rate. Under a CPU quota as well (``harmony fleet emulate``'s ``cgroup+pacing``), the quota
  is raised whenever it, not the class, holds a step up (:class:`QuotaGovernor`);
- **uplink and downlink token buckets**: every publish waits for its bytes' tokens at the class's
  uplink rate, every received message for its bytes at the downlink rate (:class:`TokenBucket`);
- **latency**: every publish is delayed by the round trip, twice the class's one-way latency (a
  request and its reply each cross the link once; the reply side adds nothing).

Which of these a process applies is :attr:`DeviceLimits.enforce` (``--emulate-limits``): with a
cgroup CPU quota and ``tc tbf`` in a namespace only the latency is left to the agent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harmony.profiles import DeviceProfile

log = logging.getLogger(__name__)

LIMITS = ("compute", "uplink", "downlink", "latency")
"""What ``--emulate`` can enforce in the agent (``--emulate-limits`` picks a subset)."""


class TokenBucket:
    """A token bucket in bytes: ``rate_bps`` bits/s sustained, at most ``burst_bytes`` ahead.

    :meth:`consume` blocks until the bytes may go; a message larger than the burst waits for the
    tokens it lacks, so a long transfer takes ``bytes × 8 / rate`` whatever its chunking."""

    def __init__(self, rate_bps: float, burst_bytes: int = 4096) -> None:
        if rate_bps <= 0:
            raise ValueError(f"a token bucket needs a positive rate, got {rate_bps} bit/s")
        self.rate = rate_bps / 8.0  # bytes/s
        self.burst = float(burst_bytes)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, nbytes: int) -> float:
        """Wait until ``nbytes`` may be sent; returns the seconds waited."""
        with self._lock:  # one transfer at a time, in arrival order, as on a link
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                time.sleep(wait)
                # the bucket was empty at now + wait; an oversleep (a busy host) is credited to the
                # next transfer, up to the burst, so the long-run rate holds
                self._last = now + wait
                self._tokens = 0.0
            return wait


@dataclass(frozen=True)
class DeviceLimits:
    """The class a device emulates and which of its limits the agent enforces."""

    profile: DeviceProfile
    enforce: frozenset[str] = frozenset(LIMITS)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.enforce) - set(LIMITS))
        if unknown:
            raise ValueError(f"--emulate-limits: unknown limit {unknown[0]!r}; choose from {', '.join(LIMITS)}")

    @property
    def compute_flops(self) -> float | None:
        """The class's rate, when the agent paces compute."""
        return self.profile.compute_flops if "compute" in self.enforce else None

    @property
    def round_trip_s(self) -> float:
        return 2e-3 * self.profile.latency_ms if "latency" in self.enforce else 0.0

    def uplink_bucket(self) -> TokenBucket | None:
        return TokenBucket(self.profile.uplink_bps) if "uplink" in self.enforce else None

    def downlink_bucket(self) -> TokenBucket | None:
        return TokenBucket(self.profile.downlink) if "downlink" in self.enforce else None

    def describe(self) -> str:
        p = self.profile
        parts = {"compute": f"compute {p.compute_flops / 1e9:g} GFLOP/s (pacing)",
                 "uplink": f"uplink {p.uplink_bps / 1e6:g} Mbit/s (token bucket)",
                 "downlink": f"downlink {p.downlink / 1e6:g} Mbit/s (token bucket)",
                 "latency": f"latency {p.latency_ms:g} ms one-way"}
        return ", ".join(parts[k] for k in LIMITS if k in self.enforce) or "nothing in the agent"


class StepPacer:
    """Closed-loop pacing of training steps to ``target_s`` seconds of compute each (the step's FLOPs ÷
    the class's rate). Time each compute phase of a step with :meth:`phase`; after its last phase,
    :meth:`finish` sleeps so that the device is back on its class's step time.

    The loop: the pad is the target less this step's work less the *debt* — what earlier steps
    realised beyond their target (a sleep that overslept on a busy host, a step whose work alone
    took longer than the target). So a device the host held up catches up in the next steps, at host
    speed, until its steps average the target again. The debt is bounded to ``max_debt_steps``
    targets: after a long stall the device does not race for minutes. The last ``window`` steps'
    realised and work times are kept (:attr:`realised_s`, :attr:`work_s`): when the work alone
    takes longer than the target (:attr:`host_too_slow`), no pacing can bring the device to its
    class — the host (or a CPU quota, :class:`QuotaGovernor`) is too slow for it.

    ``clock`` and ``sleep`` are injectable (a fake clock makes the controller's verdicts exact)."""

    def __init__(self, target_s: float, *, max_debt_steps: float = 2.0, window: int = 8,
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> None:
        self.target_s = target_s
        self.max_debt_s = max_debt_steps * target_s
        self.debt_s = 0.0
        self._clock, self._sleep = clock, sleep
        self._spent = 0.0
        self.last_work_s = 0.0
        """The last finished step's work (its compute phases, unpadded)."""
        self._realised: deque[float] = deque(maxlen=window)
        self._work: deque[float] = deque(maxlen=window)

    @contextlib.contextmanager
    def phase(self) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self._spent += self._clock() - t0

    def finish(self) -> float:
        """Sleep this step's pad (target − work − debt, at least 0); returns the seconds slept, as the
        clock saw them. Resets for the next step."""
        work, self._spent = self._spent, 0.0
        pad = self.target_s - work - self.debt_s
        slept = 0.0
        if pad > 0:
            t0 = self._clock()
            self._sleep(pad)
            slept = self._clock() - t0
        realised = work + slept
        self.last_work_s = work
        self.debt_s = min(self.max_debt_s, max(0.0, self.debt_s + realised - self.target_s))
        self._realised.append(realised)
        self._work.append(work)
        return slept

    @property
    def realised_s(self) -> float:
        """Mean realised seconds per step over the last steps (NaN before the first)."""
        return sum(self._realised) / len(self._realised) if self._realised else math.nan

    @property
    def work_s(self) -> float:
        """Mean seconds the host took for a step's work (unpadded) over the last steps (NaN before the first)."""
        return sum(self._work) / len(self._work) if self._work else math.nan

    @property
    def host_too_slow(self) -> bool:
        """The work alone took longer than the target over the last steps: the host cannot run this class."""
        return bool(self._work) and self.work_s > self.target_s


QUOTA_SLACK = 0.9
"""A CPU quota is raised when a step's work took more than this fraction of its target while the
kernel throttled the device: the pacing has no room left, and the quota, not the class, sets the pace."""
QUOTA_STEP = 1.5
"""Factor a binding quota is raised by."""


def next_quota(cpus: float, *, work_s: float, target_s: float, throttled: bool, ceiling_cpus: float = 1.0) -> float:
    """The CPU quota (in CPUs) after a step whose work took ``work_s`` against a ``target_s`` target:
    raised by :data:`QUOTA_STEP` (up to ``ceiling_cpus``) when the kernel throttled the device and
    the work left the pacing no room (:data:`QUOTA_SLACK`), else unchanged. A quota only caps what a
    device takes of the host; it must never be why a device runs below its class."""
    if throttled and work_s > QUOTA_SLACK * target_s and cpus < ceiling_cpus:
        return min(ceiling_cpus, cpus * QUOTA_STEP)
    return cpus


class QuotaGovernor:
    """Keeps a paced device's cgroup v1 CPU quota (``cgroup``: its ``cpu`` directory) from being the
    reason it runs below its class: after each step, :meth:`after_step` reads the kernel's throttle
    count and raises the quota by :func:`next_quota` (``harmony fleet emulate`` sizes it from a
    start-up measurement of the host, which a loaded host no longer matches). The ceiling is one CPU:
    an agent trains on one torch thread."""

    def __init__(self, cgroup: Path, ceiling_cpus: float = 1.0) -> None:
        self.cgroup = cgroup
        self.ceiling_cpus = ceiling_cpus
        self.period_us = int((cgroup / "cpu.cfs_period_us").read_text())
        quota = int((cgroup / "cpu.cfs_quota_us").read_text())
        self.cpus = quota / self.period_us if quota > 0 else math.inf
        self._throttled = self._throttle_count()
        self._lock = threading.Lock()

    def _throttle_count(self) -> int:
        for line in (self.cgroup / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "nr_throttled":
                return int(value)
        return 0

    def throttled(self) -> bool:
        """Whether the kernel throttled the cgroup since the last call."""
        count = self._throttle_count()
        was, self._throttled = self._throttled, count
        return count > was

    def after_step(self, work_s: float, target_s: float) -> float | None:
        """Raise the quota if it held this step up; returns the new quota in CPUs, or None (unchanged)."""
        with self._lock:
            cpus = next_quota(self.cpus, work_s=work_s, target_s=target_s, throttled=self.throttled(),
                              ceiling_cpus=self.ceiling_cpus)
            if cpus == self.cpus:
                return None
            self.set_cpus(cpus)
            return cpus

    def set_cpus(self, cpus: float) -> None:
        (self.cgroup / "cpu.cfs_quota_us").write_text(str(max(1000, round(cpus * self.period_us))))
        log.info("CPU quota of %s raised from %.3f to %.3f CPU: it, not the class, was setting the pace",
                 self.cgroup.name, self.cpus, cpus)
        self.cpus = cpus
