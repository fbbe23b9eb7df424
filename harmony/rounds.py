"""The rules that decide a round, written once for both runtimes: who is available, who takes
part, the deadline, the quorum, and which sessions are dropped.

Everything here is a pure function of the plan, the round, the try (``attempt``) and — on the
simulated clock — the run's simulated time, so the same seed gives the same decisions in the
local and the distributed runtime. The engine (:mod:`harmony.engine`) applies them; a fleet only
reports what happened.

- **Availability**: a device is offline for a round with probability ``fleet.offline_probability``
  (a seeded draw per round, try and device), or while an interval of ``fleet.availability_trace``
  covers the round's start on the simulated clock. Participants are drawn among the available.
- **Dropouts**: a participant vanishes mid-session with probability ``fleet.dropout_probability``
  (or when a trace interval begins before its session would end); its partial work is discarded.
- **Deadline**: ``fleet.round_deadline_s``, or ``fleet.deadline_slack`` × the slowest
  participant's estimated session time. A session that takes longer is a straggler, left out.
  Without either, a fleet whose sessions run side by side in real time derives one from the try
  itself (:func:`derived_deadline_s`): once the quorum is in, the sessions still running get
  ``fleet.quorum_slack`` × the time the quorum took; a slow device is a straggler, not a
  failed run.
- **Unreachable devices**: participants the fleet knows to be gone (e.g. their MQTT last will
  arrived) are not invited; they count against the quorum, which is taken over the participants
  drawn, and are recorded as offline.
- **Quorum**: ``fleet.quorum`` (≤ 1 a fraction of the participants, > 1 a count; default 0.5:
  failures are accepted as long as half the participants complete); a try that can no longer
  reach it ends at once, and the round is tried again (``fleet.round_retries``) with the devices
  then available, after a grace of ``fleet.retry_grace_s`` for devices that are restarting.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harmony.seeding import numpy_rng

if TYPE_CHECKING:
    from harmony.experiment import Experiment


class RoundFailedError(RuntimeError):
    """A round stayed below its quorum in every try, or a fleet could not run it; the run stops."""


@dataclass(frozen=True)
class RoundPlan:
    """One try of one round, as the engine decided it before any session ran."""

    round: int
    attempt: int
    participants: list[int]
    offline: list[int]  # unavailable at the round's start, not selected
    drops: dict[int, float] = field(default_factory=dict)  # participant → fraction of its session when it vanishes
    deadline_s: float | None = None
    quorum: int = 1
    start_s: float = 0.0  # the round's start on the run's simulated clock (0 on the wall clock)
    estimates: dict[int, float] = field(default_factory=dict)  # participant → modelled session time, s
    quorum_slack: float | None = None  # without deadline_s: derived_deadline_s's factor (None: none derived)

    def hopeless(self, completed: int, left_out: int) -> bool:
        """Whether the try can no longer reach its quorum with ``completed`` sessions done and
        ``left_out`` participants dropped or late: it ends at once."""
        return completed + (len(self.participants) - completed - left_out) < self.quorum


DERIVED_DEADLINE_FLOOR_S = 30.0
"""The least time :func:`derived_deadline_s` gives a try: a quorum that came in within seconds
does not make a device a few seconds slower a straggler, and a session recovering from a lost
worker or broker (seconds to notice, seconds to start again) is not cut off as late."""


def derived_deadline_s(plan: RoundPlan, quorum_in_s: float) -> float | None:
    """The deadline of a try without a configured one, once its quorum came in ``quorum_in_s``
    seconds after its start: ``plan.quorum_slack`` × that, at least
    :data:`DERIVED_DEADLINE_FLOOR_S` (None when the plan has a deadline or derives none)."""
    if plan.deadline_s is not None or plan.quorum_slack is None:
        return None
    return max(DERIVED_DEADLINE_FLOOR_S, plan.quorum_slack * quorum_in_s)


def quorum_count(quorum: float, participants: int) -> int:
    """Sessions a round of ``participants`` needs: ``quorum`` ≤ 1 is a fraction (rounded up), > 1 a
    count (capped at the participants); at least one."""
    if participants <= 0:
        return 1
    need = math.ceil(quorum * participants - 1e-9) if quorum <= 1 else int(quorum)
    return max(1, min(participants, need))


def load_trace(path: str | Path) -> dict[int, list[tuple[float, float]]]:
    """An availability trace: ``{client: [[off_from_s, off_to_s], ...]}`` (JSON, simulated seconds)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fleet.availability_trace: {p} not found")
    try:
        raw = json.loads(p.read_text())
        trace = {int(k): [(float(a), float(b)) for a, b in v] for k, v in raw.items()}
    except (ValueError, TypeError) as err:
        raise ValueError(f"fleet.availability_trace: {p} is not {{client: [[off_from_s, off_to_s], ...]}}: {err}"
                         ) from None
    for client, spans in trace.items():
        for a, b in spans:
            if not b > a:
                raise ValueError(f"fleet.availability_trace: client {client} has an empty interval [{a}, {b}]")
    return trace


def _offline_at(trace: dict[int, list[tuple[float, float]]], client: int, t: float) -> bool:
    return any(a <= t < b for a, b in trace.get(client, ()))


def _next_off(trace: dict[int, list[tuple[float, float]]], client: int, t: float) -> float | None:
    starts = [a for a, _ in trace.get(client, ()) if a > t]
    return min(starts) if starts else None


def plan_round(experiment: Experiment, rnd: int, attempt: int = 0, start_s: float = 0.0,
               draw: Callable[[int, list[int], int], list[int]] | None = None,
               unreachable: Collection[int] = (), derive_deadline: bool = False) -> RoundPlan:
    """The decisions of try ``attempt`` of round ``rnd`` starting at ``start_s`` (simulated clock);
    ``draw(rnd, available, attempt)`` picks the participants (default: the plan's own draw).
    ``unreachable``: devices the fleet knows to be gone; drawn as usual, then not invited (offline),
    the quorum still counted over the draw. ``derive_deadline``: the fleet runs sessions side by
    side in real time, so without a configured deadline one is derived (:func:`derived_deadline_s`)."""
    cfg = experiment.cfg
    fleet, seed, n = cfg.fleet, cfg.seed, experiment.num_clients
    trace = experiment.trace
    offline = []
    for i in range(n):
        if fleet.offline_probability > 0 and numpy_rng(seed, rnd, attempt, i, "offline").random() < \
                fleet.offline_probability:
            offline.append(i)
        elif trace and _offline_at(trace, i, start_s):
            offline.append(i)
    gone = set(offline)
    available = [i for i in range(n) if i not in gone]
    drawn = (draw or experiment.participants)(rnd, available, attempt)
    participants = [i for i in drawn if i not in unreachable]
    offline = sorted(set(offline) | (set(drawn) - set(participants)))
    estimates = {i: experiment.session_estimate_s(i) for i in participants}
    drops: dict[int, float] = {}
    for i in participants:
        if fleet.dropout_probability > 0:
            rng = numpy_rng(seed, rnd, attempt, i, "dropout")
            if rng.random() < fleet.dropout_probability:
                drops[i] = float(rng.random())
                continue
        if trace:
            off = _next_off(trace, i, start_s)
            if off is not None and off < start_s + estimates[i]:
                drops[i] = (off - start_s) / estimates[i]
    deadline = fleet.round_deadline_s
    if deadline is None and fleet.deadline_slack is not None and participants:
        deadline = fleet.deadline_slack * max(estimates.values())
    slack = fleet.quorum_slack if derive_deadline and deadline is None else None
    return RoundPlan(rnd, attempt, participants, offline, drops, deadline,
                     quorum_count(fleet.quorum, len(drawn)), start_s, estimates, slack)
