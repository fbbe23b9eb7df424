"""Wall time (and the timing thread's CPU time) per phase of a repeated exchange, e.g. a distributed
session's steps."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class PhaseClock:
    """Accumulates wall seconds per named phase: ``with clock("compute"): ...``.

    The distributed runtime reports a session's split (compute, waiting for the peer, sending)
    with its ``session_done`` event and log line, which shows where a step's time goes. It also
    keeps the CPU seconds of the calling thread per phase (:meth:`cpu_seconds`): with many
    sessions time-sharing few cores a phase's wall time includes waiting for a core, its thread
    CPU time does not (work done by other threads, e.g. torch's intra-op pool, is not in it).
    """

    def __init__(self, *phases: str) -> None:
        self._totals: dict[str, float] = dict.fromkeys(phases or ("compute", "wait", "send"), 0.0)
        self._cpu: dict[str, float] = dict.fromkeys(self._totals, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self._totals[phase] = self._totals.get(phase, 0.0) + time.perf_counter() - t0
            self._cpu[phase] = self._cpu.get(phase, 0.0) + time.thread_time() - c0

    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far, rounded to 0.1 ms."""
        return {k: round(v, 4) for k, v in self._totals.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds of the timing thread per phase so far, rounded to 0.1 ms."""
        return {k: round(v, 4) for k, v in self._cpu.items()}
