"""Per-device ``seq`` de-duplication for QoS 1 redeliveries, with stale-round rejection.

QoS 1 means *at least once*: after a reconnect the broker (or a persistent session) may deliver a
message again. Each sender numbers its messages with ``seq``; the receiver keeps, per
(device, kind), the newest round seen, the highest ``seq`` in that round and the set of ``seq``
values within a sliding ``window`` below it (IPsec-style anti-replay). A new round for a
(device, kind) starts a fresh window, so a sender may restart ``seq`` at every round or keep one
counter for its whole life. Memory is bounded: at most ``window`` seqs per key and at most
``max_keys`` keys (least recently used evicted first, with a log line, since an evicted key
forgets its history). Verdicts say why a message was refused; nothing changes state on refusal.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

ACCEPTED = "ok"
REPLAY = "replay"
TOO_OLD = "too_old"
STALE_ROUND = "stale_round"


@dataclass(frozen=True)
class DedupVerdict:
    """``accepted`` or not; ``code`` is ``ok``, ``replay``, ``too_old`` or ``stale_round``; ``reason`` is prose."""

    accepted: bool
    code: str
    reason: str

    def __bool__(self) -> bool:
        return self.accepted


@dataclass
class _Window:
    round: int
    highest: int
    seen: set[int] = field(default_factory=set)


class SeqDeduplicator:
    """Accepts each (device, kind, round, seq) once; refuses replays, seqs older than the window, stale rounds."""

    def __init__(self, window: int = 1024, max_keys: int = 65536) -> None:
        if window < 1 or max_keys < 1:
            raise ValueError(f"window and max_keys must be >= 1, got window={window}, max_keys={max_keys}")
        self.window = window
        self.max_keys = max_keys
        self._windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()
        self._min_round: dict[str, int] = {}
        self._global_min_round = 0
        self._lock = threading.Lock()

    def set_min_round(self, round: int, dev: str | None = None) -> None:
        """Refuse messages of rounds below ``round`` from ``dev`` (or from every device when ``dev`` is None)."""
        with self._lock:
            if dev is None:
                self._global_min_round = max(self._global_min_round, round)
            else:
                self._min_round[dev] = max(self._min_round.get(dev, 0), round)

    def forget(self, dev: str) -> None:
        """Drop a device's history (e.g. it re-registered with a fresh agent and restarted its seq)."""
        with self._lock:
            for key in [k for k in self._windows if k[0] == dev]:
                del self._windows[key]
            self._min_round.pop(dev, None)

    def check(self, dev: str, kind: str, round: int, seq: int, *, record: bool = True) -> DedupVerdict:
        """Record and accept a new message, or refuse it with a reason (recording nothing).
        ``record=False``: only the verdict, nothing recorded (a receiver with more checks to run)."""
        key = (dev, kind)
        with self._lock:
            floor = max(self._global_min_round, self._min_round.get(dev, 0))
            state = self._windows.get(key)
            if state is not None:
                floor = max(floor, state.round)
            if round < floor:
                return DedupVerdict(False, STALE_ROUND, f"stale round {round} from {dev!r} ({kind}): "
                                    f"round {floor} is current")
            window = state if state is not None and round <= state.round else None  # None: a new round
            if window is not None and record:
                self._windows.move_to_end(key)
            if window is not None and seq <= window.highest:
                if seq <= window.highest - self.window:
                    return DedupVerdict(False, TOO_OLD, f"seq {seq} from {dev!r} ({kind}, round {round}) is older "
                                        f"than the replay window (highest seen {window.highest}, window {self.window})")
                if seq in window.seen:
                    return DedupVerdict(False, REPLAY, f"replayed seq {seq} from {dev!r} ({kind}, round {round}): "
                                        "already delivered")
            if not record:
                return DedupVerdict(True, ACCEPTED, "ok")
            if window is None:
                self._windows[key] = _Window(round=round, highest=seq, seen={seq})
                self._windows.move_to_end(key)
                self._evict()
            elif seq > window.highest:
                window.highest = seq
                window.seen.add(seq)
                low = seq - self.window
                if len(window.seen) > self.window:
                    window.seen = {s for s in window.seen if s > low}
            else:
                window.seen.add(seq)
            return DedupVerdict(True, ACCEPTED, "ok")

    def check_envelope(self, envelope: Any) -> DedupVerdict:
        """``check`` with the fields of a decoded ``broker.codec.Envelope``."""
        return self.check(envelope.dev, envelope.kind, envelope.round, envelope.seq)

    def _evict(self) -> None:
        while len(self._windows) > self.max_keys:
            (dev, kind), _ = self._windows.popitem(last=False)
            log.info("dedup: evicted the history of (%s, %s); max_keys=%d reached", dev, kind, self.max_keys)

    def __len__(self) -> int:
        return len(self._windows)
