"""What the monitor knows about a run: one :class:`MonitorState` that folds events (from Redis or
a run directory, :mod:`testbed.monitor.sources`) and registry rows into a JSON-able snapshot, read
by the web page, the terminal view and ``/metrics`` alike.

Events are dicts ``{"event": name, "t": unix s, ...fields}``; unknown events and missing fields
are ignored. A device is named by its id on a stack (``emu-3``) and by ``client-{i}`` in a local
run (where the events carry the client index); :meth:`MonitorState.device_name` maps one to the
other once a ``run_start``/``run_started`` event or the registry has given the device ids.
Thread-safe: sources call :meth:`fold` and :meth:`set_device` from their own threads."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

SESSION_OUTCOMES = ("done", "late", "dropped")
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Upper bounds (s) of ``harmony_session_duration_seconds``."""
LOG_LINES = 300
ROUNDS_KEPT = 1000
"""Rounds whose record the state keeps (the charts)."""
TIMELINE_ROUNDS = 30
"""Rounds whose sessions a snapshot carries (the timeline grid)."""

# event → (log level, how it reads); events not listed here do not go to the event log
LOGGED = {
    "session_dropped": "warning", "session_late": "warning", "session_failed": "error",
    "session_replayed": "info", "session_resent": "warning", "round_retry": "warning", "round_failed": "error",
    "message_rejected": "warning", "device_refused": "error", "device_offline": "warning",
    "device_online": "info", "device_reassigned": "info", "depth_reassigned": "info", "depth_assigned": "info",
    "reassigned": "info", "rejoined": "info", "device_rejoined": "info", "evaluation_skipped": "warning",
    "evaluation_late": "warning", "evaluation_incomplete": "warning", "broker_reconnected": "warning",
    "run_start": "info", "run_started": "info", "run_done": "info", "run_failed": "error",
    "source_down": "error", "source_up": "info",
}


@dataclass
class DeviceRow:
    """One device of the fleet, as the dashboard's fleet table shows it."""

    device: str
    client: int | None = None
    device_class: str | None = None
    split_depth: int | None = None
    status: str = "unknown"  # online/idle/training/evaluating/offline/refused/… (its last status)
    online: bool | None = None
    detail: str = ""
    last_seen: float | None = None  # unix s of its latest status or session
    step_s: float | None = None  # seconds per step of its latest finished session
    bytes_up: int = 0
    bytes_down: int = 0
    agent_version: str | None = None
    profile: str | None = None  # the profile the run's plan gave its client (fleet.profiles)
    refused: str | None = None
    sessions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SESSION_OUTCOMES, 0))
    offline_since: float | None = None


@dataclass
class RoundView:
    """One round: its sessions as they finish and, once done, its record (losses, accuracies)."""

    round: int
    sessions_total: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)  # device → done/late/dropped
    seconds: dict[str, float] = field(default_factory=dict)  # device → session seconds
    deadline: float | None = None  # unix s
    state: str = "running"
    attempt: int = 0
    record: dict[str, Any] | None = None
    started: float | None = None


class MonitorState:
    """Folds events into the monitor's picture of the fleet and the run (module docstring)."""

    def __init__(self, source: str = "") -> None:
        self._lock = threading.RLock()
        self.version = 0
        """Bumped on every change (the web page's stream sends a snapshot when it moves)."""
        self.source = {"name": source, "up": False, "error": None, "since": time.time()}
        self.components: dict[str, bool] = {}
        """The stack's services this monitor checks (``redis``, ``broker``) → reachable."""
        self.devices: dict[str, DeviceRow] = {}
        self.clients: dict[int, str] = {}  # client index → device id
        self.run: dict[str, Any] = {}
        self.rounds: dict[int, RoundView] = {}
        self.current: int | None = None
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_LINES)
        # counters since the monitor started (Prometheus counters never go down)
        self.rounds_completed: set[tuple[str, int]] = set()
        self.rounds_failed = 0
        self.round_retries = 0
        self.session_counts = dict.fromkeys(SESSION_OUTCOMES, 0)
        self.rejected: dict[str, int] = {}
        self.bytes_total: dict[tuple[str, str], int] = {}
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.duration_count = 0
        self.evaluation: dict[str, Any] | None = None

    # ------------------------------------------------------------------ updates
    def _changed(self) -> None:
        self.version += 1

    def device_name(self, device: Any) -> str:
        """A device id from an event's ``device`` field: an id as it is, a client index mapped to its
        device (``client-{i}`` when no device ids are known)."""
        if isinstance(device, bool) or device is None:
            return "?"
        if isinstance(device, int):
            return self.clients.get(device, f"client-{device}")
        return str(device)

    def _row(self, device: str) -> DeviceRow:
        row = self.devices.get(device)
        if row is None:
            row = self.devices[device] = DeviceRow(device)
        return row

    def set_source(self, up: bool, error: str | None = None) -> None:
        """The source came back (``up``) or was lost (``error`` says why: "stack down")."""
        with self._lock:
            if self.source["up"] == up and (up or self.source["error"] == error):
                return
            self.source.update(up=up, error=error, since=time.time())
            if self.source["name"].startswith("redis"):
                self.components["redis"] = up
            self._log("source_up" if up else "source_down", time.time(),
                      f"{self.source['name']}: connected" if up else f"{self.source['name']}: {error}")
            self._changed()

    def set_component(self, name: str, up: bool) -> None:
        """Whether the stack's service ``name`` (e.g. ``broker``) is reachable now."""
        with self._lock:
            if self.components.get(name) != up:
                self.components[name] = up
                self._log(f"{name}_up" if up else f"{name}_down", time.time(),
                          f"{name}: {'reachable' if up else 'unreachable'}")
                self._changed()

    def set_run(self, **fields: Any) -> None:
        with self._lock:
            new = {k: v for k, v in fields.items() if v is not None and self.run.get(k) != v}
            if new:
                self.run.update(new)
                self._changed()

    def set_device(self, device: str, **fields: Any) -> None:
        """Registry fields of one device (``status``, ``split_depth``, ``client``, ``device_class``,
        ``agent_version``, ``refused``, ``last_seen``); ``None`` values leave a field as it is."""
        with self._lock:
            row = self._row(device)
            changed = device not in self.devices
            for key, value in fields.items():
                if value is None and key != "refused":
                    continue
                if getattr(row, key) != value:
                    setattr(row, key, value)
                    changed = True
            if "client" in fields and isinstance(fields["client"], int):
                self.clients[fields["client"]] = device
            online = None if row.status == "unknown" else row.status != "offline" and not row.refused
            if online is not row.online:
                if online is False:
                    row.offline_since = time.time()
                elif online:
                    row.offline_since = None
                row.online = online
                changed = True
            if changed:
                self._changed()

    def _log(self, event: str, t: float, text: str, level: str | None = None) -> None:
        self.log.append({"t": t, "event": event, "level": level or LOGGED.get(event, "info"), "text": text})

    def fold(self, doc: dict[str, Any]) -> None:
        """One event (module docstring)."""
        name = doc.get("event")
        if not isinstance(name, str):
            return
        t = doc.get("t") if isinstance(doc.get("t"), (int, float)) else time.time()
        with self._lock:
            device = self.devices.get(self.device_name(doc.get("device")))
            was_online = None if device is None else device.online
            handler = getattr(self, f"_on_{name}", None)
            if handler is not None:
                handler(doc, t)
            # a device's coming and going once, though each registry (the stack's, the run's) reports it
            repeated = name in ("device_online", "device_offline") and device is not None and (
                was_online is self.devices[device.device].online)
            if name in LOGGED and name not in ("source_down", "source_up") and not repeated:
                self._log(name, t, describe(name, doc, self))
            self._changed()

    # -- run
    def _on_run_start(self, doc: dict[str, Any], t: float) -> None:
        """A ``harmony run``'s plan (run directory); ``resume``: the same run goes on."""
        if not (doc.get("resume") and self.run.get("id")):
            self._new_run(str(doc.get("t", t)))
        devices = doc.get("devices") or [f"client-{i}" for i in range(int(doc.get("clients") or 0))]
        depths = doc.get("split_depths") or []
        profiles = doc.get("profiles") or []
        for i, dev in enumerate(devices):
            self.clients[i] = dev
            row = self._row(dev)
            row.client = i
            if i < len(depths):
                row.split_depth = depths[i]
            if i < len(profiles):
                row.profile = profiles[i]
        self.run.update({k: doc[k] for k in ("name", "algorithm", "runtime", "rounds") if doc.get(k) is not None})
        self.run["state"] = "running"

    def _on_run_started(self, doc: dict[str, Any], t: float) -> None:
        """A stack's new run (``hsfl:run`` reset by the orchestrator)."""
        self._new_run(str(doc.get("id", t)))
        for i, dev in enumerate(doc.get("devices") or []):
            self.clients[i] = dev
            self._row(dev).client = i
        if doc.get("rounds") is not None:
            self.run["rounds"] = doc["rounds"]
        self.run["state"] = "running"

    def _new_run(self, run_id: str) -> None:
        if self.run.get("id") == run_id:
            return
        self.run = {"id": run_id, "started": time.time()}
        self.rounds.clear()
        self.current = None
        self.evaluation = None
        self.clients.clear()
        for row in self.devices.values():
            row.sessions = dict.fromkeys(SESSION_OUTCOMES, 0)

    def _on_run_done(self, doc: dict[str, Any], t: float) -> None:
        self.run["state"] = "done"

    def _on_run_failed(self, doc: dict[str, Any], t: float) -> None:
        self.run["state"] = "failed"

    def _on_evaluate_start(self, doc: dict[str, Any], t: float) -> None:
        self.run["state"] = "evaluating"

    # -- rounds
    def _round(self, rnd: Any) -> RoundView | None:
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            return None
        view = self.rounds.get(rnd)
        if view is None:
            view = self.rounds[rnd] = RoundView(rnd)
            for old in sorted(self.rounds)[:-ROUNDS_KEPT]:
                del self.rounds[old]
        if self.current is None or rnd >= self.current:
            self.current = rnd
        return view

    def _start_round(self, doc: dict[str, Any], t: float) -> None:
        view = self._round(doc.get("round"))
        if view is None:
            return
        attempt = int(doc.get("attempt") or 0)
        if view.started is not None and (attempt > view.attempt or view.state == "failed"):
            self.round_retries += 1
            view.outcomes.clear()
            view.seconds.clear()
        view.attempt = max(view.attempt, attempt)
        view.state, view.started = "running", t
        if isinstance(doc.get("sessions"), int):
            view.sessions_total = doc["sessions"]
        if isinstance(doc.get("deadline"), (int, float)):
            view.deadline = float(doc["deadline"])
        elif isinstance(doc.get("deadline_s"), (int, float)):  # the engine's plan: seconds from the round's start
            view.deadline = t + float(doc["deadline_s"])
        if isinstance(doc.get("rounds"), int):
            self.run["rounds"] = doc["rounds"]
        self.run["state"] = "running"

    _on_round_start = _start_round  # run directory
    _on_round_running = _start_round  # stack

    def _session(self, doc: dict[str, Any], t: float, outcome: str) -> None:
        view = self._round(doc.get("round"))
        dev = self.device_name(doc.get("device"))
        row = self._row(dev)
        # the device's own session: ``train_s`` (the run's events) leaves out the time it queued for a
        # worker thread; a server task's ``seconds`` (a stack's events) never counted it
        seconds = doc.get("train_s", doc.get("seconds"))
        if view is not None:
            if view.outcomes.get(dev) == outcome:
                return  # the same session reported twice (the engine's and the task's event)
            view.outcomes[dev] = outcome
            if isinstance(seconds, (int, float)) and (outcome == "done" or seconds > 0):
                view.seconds[dev] = float(seconds)
        self.session_counts[outcome] += 1
        row.sessions[outcome] += 1
        if outcome != "dropped":
            row.last_seen = max(row.last_seen or 0.0, t)
        if outcome == "done" and isinstance(seconds, (int, float)):
            self.duration_count += 1
            self.duration_sum += float(seconds)
            k = next((i for i, b in enumerate(DURATION_BUCKETS) if seconds <= b), len(DURATION_BUCKETS))
            self.duration_buckets[k] += 1
            steps = doc.get("steps")
            if isinstance(steps, int) and steps > 0:
                row.step_s = float(seconds) / steps
        for key, direction in (("bytes_up", "up"), ("bytes_down", "down")):
            value = doc.get(key)
            if isinstance(value, int) and value > 0:
                setattr(row, key, getattr(row, key) + value)
                self.bytes_total[(dev, direction)] = self.bytes_total.get((dev, direction), 0) + value

    def _on_session_done(self, doc: dict[str, Any], t: float) -> None:
        self._session(doc, t, "done")

    def _on_session_late(self, doc: dict[str, Any], t: float) -> None:
        self._session(doc, t, "late")

    def _on_session_dropped(self, doc: dict[str, Any], t: float) -> None:
        self._session(doc, t, "dropped")

    def _on_session_failed(self, doc: dict[str, Any], t: float) -> None:
        self._session(doc, t, "dropped")

    def round_record(self, record: dict[str, Any]) -> None:
        """A finished round's record (``RoundRecord`` as a dict: from a ``round_end`` event or the
        ``record`` field of ``hsfl:round:{r}``)."""
        with self._lock:
            view = self._round(record.get("round"))
            if view is None or view.record == record:
                return
            view.record, view.state = record, "done"
            key = (str(self.run.get("id", "")), view.round)
            if key not in self.rounds_completed:
                self.rounds_completed.add(key)
                self._log("round_done", time.time(), _round_line(record))
            if view.round == self.run.get("rounds") and self.run.get("state") == "running":
                self.run["state"] = "trained"  # the last round is done; the evaluation (if any) follows
            # a device already offline at the round's start is dropped without a session event
            for outcome, key in (("late", "stragglers"), ("dropped", "dropouts")):
                for i in record.get(key) or []:
                    if view.outcomes.get(self.device_name(i)) != outcome:
                        self._session({"round": view.round, "device": i}, time.time(), outcome)
            if not view.sessions_total and isinstance(record.get("invited"), int):
                view.sessions_total = record["invited"]
            self._changed()

    def round_running(self, rnd: int, sessions: int, deadline: float | None) -> None:
        """What ``hsfl:round:{r}`` says of a running round (the stack's registry poll)."""
        with self._lock:
            view = self._round(rnd)
            if view is None or view.record is not None:
                return
            if (view.sessions_total, view.deadline) != (sessions or view.sessions_total, deadline or view.deadline):
                view.sessions_total = sessions or view.sessions_total
                view.deadline = deadline or view.deadline
                self._changed()

    def has_record(self, rnd: int) -> bool:
        with self._lock:
            view = self.rounds.get(rnd)
            return view is not None and view.record is not None

    def _on_round_end(self, doc: dict[str, Any], t: float) -> None:
        if isinstance(doc.get("record"), dict):
            self.round_record(doc["record"])

    def _on_round_failed(self, doc: dict[str, Any], t: float) -> None:
        view = self._round(doc.get("round"))
        self.rounds_failed += 1
        if view is not None:
            view.state = "failed"

    def _on_round_retry(self, doc: dict[str, Any], t: float) -> None:
        self._on_round_failed(doc, t)

    # -- devices
    def _on_device_offline(self, doc: dict[str, Any], t: float) -> None:
        self.set_device(self.device_name(doc.get("device")), status=doc.get("state") or "offline")

    def _on_device_online(self, doc: dict[str, Any], t: float) -> None:
        self.set_device(self.device_name(doc.get("device")), status=doc.get("state") or "online", last_seen=t)

    def _on_device_refused(self, doc: dict[str, Any], t: float) -> None:
        self.set_device(self.device_name(doc.get("device")), refused=str(doc.get("reason") or "refused"),
                        agent_version=doc.get("agent_version"))

    def _on_depth_reassigned(self, doc: dict[str, Any], t: float) -> None:
        if isinstance(doc.get("depth"), int):
            self._row(self.device_name(doc.get("device"))).split_depth = doc["depth"]

    _on_depth_assigned = _on_depth_reassigned

    def _on_reassigned(self, doc: dict[str, Any], t: float) -> None:
        if isinstance(doc.get("depth"), int) and doc.get("client") is not None:
            self._row(self.device_name(doc.get("client"))).split_depth = doc["depth"]

    def _on_message_rejected(self, doc: dict[str, Any], t: float) -> None:
        code = str(doc.get("code") or "unknown")
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def evaluation_result(self, evaluation: dict[str, Any]) -> None:
        with self._lock:
            if self.evaluation != evaluation:
                self.evaluation = evaluation
                self.run["state"] = "done"
                self._changed()

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> dict[str, Any]:
        """Everything the views show, as plain JSON types."""
        with self._lock:
            now = time.time()
            devices = sorted(self.devices.values(), key=lambda d: _natural(d.device))
            current = self.rounds.get(self.current) if self.current is not None else None
            recent = sorted(self.rounds)[-TIMELINE_ROUNDS:]
            history = [self._round_doc(v, sessions=r in recent) for r, v in sorted(self.rounds.items())]
            return {
                "version": self.version,
                "now": now,
                "source": dict(self.source),
                "components": dict(self.components),
                "run": dict(self.run),
                "devices": [{**asdict(d), "state": shown_state(d)} for d in devices],
                "devices_online": sum(1 for d in devices if d.online),
                "current": None if current is None else self._round_doc(current, now),
                "rounds": history,
                "depths": self._by_depth(devices),
                "log": list(self.log)[-100:][::-1],
                "evaluation": self.evaluation,
                "counters": {
                    "rounds_completed": len(self.rounds_completed), "rounds_failed": self.rounds_failed,
                    "round_retries": self.round_retries, "sessions": dict(self.session_counts),
                    "rejected": dict(self.rejected),
                },
            }

    def _round_doc(self, view: RoundView, now: float | None = None, sessions: bool = True) -> dict[str, Any]:
        out = {k: v for k, v in asdict(view).items() if k not in ("outcomes", "seconds")}
        out["sessions"] = [{"device": d, "outcome": o, "seconds": view.seconds.get(d)}
                           for d, o in sorted(view.outcomes.items(), key=lambda kv: _natural(kv[0]))
                           ] if sessions else []
        counts = dict.fromkeys(SESSION_OUTCOMES, 0)
        for outcome in view.outcomes.values():
            counts[outcome] += 1
        out["counts"] = counts
        out["stragglers"] = sorted((d for d, o in view.outcomes.items() if o == "late"), key=_natural)
        out["dropouts"] = sorted((d for d, o in view.outcomes.items() if o == "dropped"), key=_natural)
        if now is not None and view.deadline is not None and view.state == "running":
            out["deadline_in_s"] = view.deadline - now
        return out

    @staticmethod
    def _by_depth(devices: list[DeviceRow]) -> list[dict[str, Any]]:
        groups: dict[int, list[DeviceRow]] = {}
        for d in devices:
            if d.split_depth is not None:
                groups.setdefault(d.split_depth, []).append(d)
        out = []
        for depth, rows in sorted(groups.items()):
            steps = [d.step_s for d in rows if d.step_s is not None]
            out.append({"split_depth": depth, "devices": len(rows), "online": sum(1 for d in rows if d.online),
                        "step_s": sum(steps) / len(steps) if steps else None,
                        "sessions": {o: sum(d.sessions[o] for d in rows) for o in SESSION_OUTCOMES},
                        "bytes_up": sum(d.bytes_up for d in rows), "bytes_down": sum(d.bytes_down for d in rows)})
        return out


def _round_line(record: dict[str, Any]) -> str:
    try:
        left_out = len(record.get("stragglers") or []) + len(record.get("dropouts") or [])
        return (f"round {record['round']} done: {record.get('participants')} sessions"
                + (f", {left_out} left out" if left_out else "")
                + f"; train acc {100 * record['train_acc_exit']:.1f}% / {100 * record['train_acc_server']:.1f}% "
                f"(exit / server)")
    except (KeyError, TypeError, ValueError):
        return f"round {record.get('round')} done"


def shown_state(row: DeviceRow) -> str:
    """What the fleet table's status column says: ``refused``, ``offline``, or the last status."""
    if row.refused:
        return "refused"
    return "offline" if row.online is False else row.status


def _natural(name: str) -> list[Any]:
    import re

    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name)]


def describe(name: str, doc: dict[str, Any], state: MonitorState) -> str:
    """One line of the event log for event ``name``."""
    dev = state.device_name(doc.get("device")) if doc.get("device") is not None else None
    rnd = f"round {doc['round']}: " if isinstance(doc.get("round"), int) else ""
    who = f"{dev} " if dev else ""
    why = doc.get("reason") or doc.get("error") or doc.get("detail") or ""
    if name == "message_rejected":
        parts = [f"code {doc.get('code')}"] + [f"{k} {doc[k]}" for k in ("kind", "field", "topic") if doc.get(k)]
        return f"{who or 'a device '}message rejected: " + ", ".join(parts)
    if name == "device_offline":
        return f"{who}went offline" + (f" ({why})" if why else "")
    if name == "device_online":
        return f"{who}is online ({doc.get('state', 'online')})"
    if name in ("depth_reassigned", "depth_assigned"):
        return f"{who}split depth {doc.get('depth')}" + (f": {why}" if why else "")
    if name == "reassigned":
        return f"{rnd}client {doc.get('client')} re-assigned to depth {doc.get('depth')}"
    if name == "run_start":
        return (f"run {doc.get('name')} started ({doc.get('algorithm')}, {doc.get('runtime')}, "
                f"{doc.get('rounds')} rounds)")
    if name == "run_started":
        return f"new run on the stack ({doc.get('rounds')} rounds, {len(doc.get('devices') or [])} devices)"
    if name == "evaluation_incomplete":
        return f"evaluation incomplete: missing {doc.get('missing')}"
    text = name.replace("_", " ")
    return f"{rnd}{who}{text}" + (f": {why}" if why else "")
