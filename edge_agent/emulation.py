"""Device-class limits the agent enforces itself (``--device-class CLASS --emulate``, docs/emulation.md).

Where the host cannot enforce a class's limits from outside (no root, no cgroup ``cpu`` controller,
no network namespaces; ``testbed.emulate`` decides), the agent does:

- **compute pacing**: a training step takes at least its FLOPs ÷ the class's rate — the step's
  compute phases are timed and the last one sleeps for what is left (:class:`StepPacer`); the
  ``hello`` micro-benchmark is paced the same way, so it measures the paced rate;
- **uplink and downlink token buckets**: every publish waits for its bytes' tokens at the class's
  uplink rate, every received message for its bytes at the downlink rate (:class:`TokenBucket`);
- **latency**: every publish is delayed by the round trip, twice the class's one-way latency (a
  request and its reply each cross the link once; the reply side adds nothing).

Which of these a process applies is :attr:`DeviceLimits.enforce` (``--emulate-limits``): with a
cgroup CPU quota and ``tc tbf`` in a namespace only the latency is left to the agent.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from harmony.profiles import DeviceProfile

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
    """Pads a training step's compute to ``target_s`` seconds (its FLOPs ÷ the class's rate): time
    each compute phase of the step with :meth:`phase`, and after the step's last phase call
    :meth:`finish`, which sleeps for the rest (still inside the device's compute clock)."""

    def __init__(self, target_s: float) -> None:
        self.target_s = target_s
        self._spent = 0.0

    @contextlib.contextmanager
    def phase(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._spent += time.perf_counter() - t0

    def finish(self) -> float:
        """Sleep what is left of the step's target; returns the seconds slept. Resets for the next step."""
        left = self.target_s - self._spent
        self._spent = 0.0
        if left > 0:
            time.sleep(left)
            return left
        return 0.0
