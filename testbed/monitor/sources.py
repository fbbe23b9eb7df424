"""Where the monitor's events come from, each a daemon thread feeding a :class:`MonitorState`:

- :class:`RedisSource`: a running stack's Redis, read only: the ``hsfl:events`` stream (XREAD,
  from the latest ``run_started`` on at start-up), the registry hashes ``hsfl:devices`` /
  ``hsfl:dev:{id}``, ``hsfl:run`` and ``hsfl:round:{r}`` (polled). A lost connection (Redis down,
  the stack restarted) marks the source down ("stack down") and is tried again every second; a
  Redis that came back empty (a fresh stack) is read from its start.
- :class:`RunDirSource`: a run directory: ``events.jsonl`` tailed (a file that shrank is a new run,
  read again from its start) and ``results.json`` once the run wrote it."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from testbed.monitor.runlog import EVENTS_FILE, read_events
from testbed.monitor.state import MonitorState

log = logging.getLogger(__name__)

RETRY_S = 1.0
BROKER_PROBE_S = 5.0


class Source:
    """A thread feeding ``state`` until :meth:`stop`."""

    name = "source"

    def __init__(self, state: MonitorState, poll_s: float = 0.5) -> None:
        self.state, self.poll_s = state, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"monitor-{self.name}", daemon=True)

    def start(self) -> Source:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One ``hsfl:events`` entry (``server.state.event``: ``name`` plus JSON-encoded fields) as an
    event dict; ``t`` from the entry id (its milliseconds)."""
    doc: dict[str, Any] = {"t": int(entry_id.split(b"-")[0]) / 1000.0}
    for key, raw in fields.items():
        k = key.decode()
        if k == "name":
            doc["event"] = raw.decode()
            continue
        try:
            doc[k] = json.loads(raw)
        except ValueError:
            doc[k] = raw.decode(errors="replace")
    return doc


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisSource(Source):
    """A stack's Redis (module docstring); ``url`` may carry the stack's password."""

    name = "redis"

    def __init__(self, url: str, state: MonitorState, poll_s: float = 0.5, block_ms: int = 250,
                 broker: tuple[str, int] | None = None) -> None:
        super().__init__(state, poll_s)
        self.url, self.block_ms = url, block_ms
        self.broker = broker
        """The stack's MQTT broker (host, port), when known: its reachability is checked too."""
        self._next_probe = 0.0
        self.last_id: bytes | None = None
        self._plans: dict[str, dict[str, Any]] = {}  # manifest sha → the run manifest (no data)

    def _run(self) -> None:
        import redis

        from server import state as keys

        r = None
        next_poll = 0.0
        while not self._stop.is_set():
            self._probe_broker()
            try:
                if r is None:
                    # not keys.connect: the runtime's client rides out a restart by retrying for
                    # seconds, while a monitor must say "stack down" at once and retry on its own
                    r = redis.Redis.from_url(self.url, decode_responses=False)
                    r.ping()
                    self._catch_up(r, keys)
                    self.state.set_source(True)
                if time.monotonic() >= next_poll:
                    self._poll(r, keys)
                    next_poll = time.monotonic() + self.poll_s
                entries = r.xread({keys.events_key(): self.last_id or b"0-0"}, count=500, block=self.block_ms)
                for _stream, items in entries or []:
                    for entry_id, fields in items:
                        self.last_id = entry_id
                        self.state.fold(decode_entry(entry_id, fields))
            except redis.RedisError as err:
                self.state.set_source(False, f"stack down: Redis {_redact(self.url)}: {err}")
                if r is not None:
                    r.close()
                r = None
                self._stop.wait(RETRY_S)
            except Exception:  # a bug must not end the monitor; log it and go on
                log.exception("monitor: Redis source")
                self._stop.wait(RETRY_S)

    def _probe_broker(self) -> None:
        """Every ``BROKER_PROBE_S``: whether the broker accepts a TCP connection."""
        if self.broker is None or time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + BROKER_PROBE_S
        try:
            with socket.create_connection(self.broker, timeout=2.0):
                up = True
        except OSError:
            up = False
        self.state.set_component("broker", up)

    def _catch_up(self, r: Any, keys: Any) -> None:
        """On (re)connect: the first time, fold the stream from the latest ``run_started`` on; after
        a reconnect, go on from the last entry read unless the stream is now behind it (a fresh Redis)."""
        last = r.xrevrange(keys.events_key(), count=1)
        if self.last_id is not None:
            if not last or _id_tuple(last[0][0]) < _id_tuple(self.last_id):
                self.last_id = None  # an emptied or new Redis: its stream from the start
            else:
                return
        entries = r.xrange(keys.events_key())
        start = 0
        for k in range(len(entries) - 1, -1, -1):
            if entries[k][1].get(b"name") == b"run_started":
                start = k
                break
        for entry_id, fields in entries[start:]:
            self.state.fold(decode_entry(entry_id, fields))
        self.last_id = entries[-1][0] if entries else b"0-0"

    def _poll(self, r: Any, keys: Any) -> None:
        run = {k.decode(): v.decode() for k, v in r.hgetall(keys.run_key()).items()}
        if run.get("id") and self.state.run.get("id") != run["id"]:
            self.state.fold({"event": "run_started", "id": run["id"]})
        manifest = run.get("manifest")
        if manifest and manifest not in self._plans:
            raw = r.get(keys.config_key(manifest))
            if raw is not None:
                self._plans[manifest] = json.loads(raw)
        plan = self._plans.get(manifest or "", {})
        self.state.set_run(manifest=manifest, rounds=plan.get("config", {}).get("train", {}).get("rounds"),
                           name=plan.get("config", {}).get("name"), runtime="distributed")
        profiles = {dev: (plan.get("profiles") or [])[i] for dev, i in (plan.get("clients") or {}).items()
                    if i < len(plan.get("profiles") or [])}
        devices = sorted(d.decode() for d in r.smembers(keys.devices_key()))
        pipe = r.pipeline(transaction=False)
        for dev in devices:
            pipe.hgetall(keys.dev_key(dev))
        for dev, raw in zip(devices, pipe.execute(), strict=True):
            self._device(dev, {k.decode(): v.decode(errors="replace") for k, v in raw.items()}, profiles.get(dev))
        last = int(run.get("last_round") or 0)
        if not run:
            return
        for rnd in range(max(1, last - 2), last + 2):
            info = {k.decode(): v for k, v in r.hgetall(keys.round_key(rnd)).items()}
            if not info:
                continue
            if "record" in info:
                try:
                    self.state.round_record(json.loads(info["record"]))
                except (KeyError, ValueError):
                    pass
            elif info.get("state") == b"running":
                deadline = float(info.get("deadline", b"0") or 0) or None
                participants = json.loads(info.get("participants", b"[]"))
                self.state.round_running(rnd, len(participants), deadline)
        for rnd in range(1, max(1, last - 2)):  # a monitor started late: the records of the earlier rounds
            if not self.state.has_record(rnd):
                raw = r.hget(keys.round_key(rnd), "record")
                if raw is not None:
                    self.state.round_record(json.loads(raw))

    def _device(self, dev: str, fields: dict[str, str], planned_profile: str | None) -> None:
        profile: dict[str, Any] = {}
        try:
            profile = json.loads(fields.get("profile", "{}"))
        except ValueError:
            pass

        def as_int(key: str) -> int | None:
            try:
                return int(fields[key])
            except (KeyError, ValueError):
                return None

        seen = fields.get("status_ts") if fields.get("status") != "offline" else None  # (a last will is not seen)
        self.state.set_device(dev, status=fields.get("status"), client=as_int("client"),
                              split_depth=as_int("split_depth"), device_class=profile.get("device_class"),
                              agent_version=profile.get("agent_version"), refused=fields.get("refused"),
                              profile=planned_profile, last_seen=float(seen) if seen else None)


def _redact(url: str) -> str:
    from testbed.stack import redact_url

    return redact_url(url)


class RunDirSource(Source):
    """A run directory's ``events.jsonl`` and ``results.json`` (module docstring)."""

    name = "run-dir"

    def __init__(self, run_dir: str | Path, state: MonitorState, poll_s: float = 0.25) -> None:
        super().__init__(state, poll_s)
        self.run_dir = Path(run_dir)
        self.offset = 0
        self._results_mtime: float | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug must not end the monitor
                log.exception("monitor: run-dir source")
            self._stop.wait(self.poll_s)

    def poll_once(self) -> None:
        """Fold what was appended to ``events.jsonl`` since the last call; once the run is done (or
        for a run directory from before the event log), its ``results.json``."""
        path = self.run_dir / EVENTS_FILE
        results = self.run_dir / "results.json"
        if not path.exists():
            if results.exists():
                self.state.set_source(True)
                self._results(results)
            else:
                self.state.set_source(False, f"no {EVENTS_FILE} in {self.run_dir} yet (is `harmony run --out "
                                      f"{self.run_dir}` running?)")
            return
        if path.stat().st_size < self.offset:  # truncated: a new run in this directory
            self.offset = 0
            self._results_mtime = None
        self.state.set_source(True)
        events, self.offset = read_events(path, self.offset)
        for doc in events:
            self.state.fold(doc)
            if doc.get("event") == "run_start":
                for i in range(int(doc.get("clients") or 0)):
                    self.state.set_device(self.state.device_name(i), status="online")
        if self.state.run.get("state") == "done" and results.exists():
            self._results(results)

    def _results(self, results: Path) -> None:
        mtime = results.stat().st_mtime
        if mtime == self._results_mtime:
            return
        try:
            doc = json.loads(results.read_text())
        except ValueError:
            return  # being written: the next poll
        self._results_mtime = mtime
        for record in doc.get("rounds") or []:
            self.state.round_record(record)
        if isinstance(doc.get("evaluation"), dict):
            self.state.evaluation_result(doc["evaluation"])
