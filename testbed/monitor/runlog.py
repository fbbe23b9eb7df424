"""The run directory's event log ``OUT/events.jsonl``: every progress event of ``harmony run``
(either runtime), one JSON object a line, ``{"t": <unix s>, "event": "<name>", ...fields}``.

The file is flushed per event so a monitor can tail it while the run goes on
(``harmony monitor --run-dir OUT``). Fields are the engine's progress fields made JSON-able
(a ``RoundRecord`` becomes its ``dataclasses.asdict``); session events carry ``round``,
``device`` (the client index) and ``seconds`` (from the round's start) where known, and
``queued_s``/``train_s`` (before and after the device was told to start) where the runtime knows.
Writing it reads the events only, so it changes no trained bit. Readers must tolerate unknown
events and missing fields."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

EVENTS_FILE = "events.jsonl"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: dataclasses as dicts, tuples and sets as lists, numpy and
    torch scalars as numbers, anything else as its ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


class RunEventLog:
    """A progress callback (``progress(event, **fields)``) that appends each event to
    ``OUT/events.jsonl`` and passes it on to ``then`` (e.g. the progress bar).

    A fresh run truncates the file; ``resume=True`` appends to it. :meth:`begin` records what the
    run is (its name, algorithm, runtime, rounds, split depths and, on a stack, the device ids)."""

    def __init__(self, out_dir: str | Path, then: Callable[..., None] | None = None, resume: bool = False) -> None:
        self.path = Path(out_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.then = then
        self._file: TextIO | None = open(self.path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        doc = {"t": time.time(), "event": event, **{k: jsonable(v) for k, v in fields.items()}}
        self._file.write(json.dumps(doc) + "\n")
        self._file.flush()

    def __call__(self, event: str, **fields: Any) -> None:
        self.write(event, **fields)
        if self.then is not None:
            self.then(event, **fields)

    def begin(self, engine: Any, resume: bool = False) -> None:
        """Record the run's plan (``run_start``) from an engine about to run."""
        cfg, ex = engine.cfg, engine.experiment
        devices = getattr(engine.fleet, "device_ids", None)
        self.write("run_start", name=cfg.name, algorithm=engine.algorithm.name, runtime=engine.fleet.runtime,
                   rounds=cfg.train.rounds, clients=ex.num_clients, split_depths=list(ex.depths),
                   profiles=list(ex.profiles) if ex.profiles is not None else None,
                   figures=[_figures(ex, i) for i in range(ex.num_clients)],
                   devices=list(devices) if devices is not None else None, resume=resume)

    def end(self, status: str, error: str | None = None) -> None:
        """Record how the run ended (``run_done`` or ``run_failed``) and close the file."""
        if status == "done":
            self.write("run_done")
        else:
            self.write("run_failed", error=(error or "")[:1000])
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _figures(ex: Any, client: int) -> dict[str, Any]:
    """The compute rate and uplink the run models ``client`` with: its device's measured ones (its
    ``hello``) where they decided its depth, else its class's."""
    profile = ex.client_profile(client)
    return {"compute_flops": profile.compute_flops, "uplink_bps": profile.uplink_bps, "source": profile.source}


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of ``events.jsonl`` from byte ``offset`` on (a line still being written is
    left for the next call) and the offset after them. A line that is not a JSON object is skipped."""
    events: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("event"), str):
            events.append(doc)
    return events, offset + end


def iter_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every event of a finished run's ``events.jsonl``."""
    yield from read_events(path)[0]
