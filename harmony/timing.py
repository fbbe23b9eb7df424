"""Wall time per phase of a repeated exchange, e.g. a distributed session's steps."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class PhaseClock:
    """Accumulates wall seconds per named phase: ``with clock("compute"): ...``.

    The distributed runtime reports a session's split (compute, waiting for the peer, sending)
    with its ``session_done`` event and log line, which shows where a step's time goes.
    """

    def __init__(self, *phases: str) -> None:
        self._totals: dict[str, float] = dict.fromkeys(phases or ("compute", "wait", "send"), 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._totals[phase] = self._totals.get(phase, 0.0) + time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far, rounded to 0.1 ms."""
        return {k: round(v, 4) for k, v in self._totals.items()}
