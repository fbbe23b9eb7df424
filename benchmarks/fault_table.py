"""The five-fault table: each fault injected mid-round into a real local stack, with its outcome.

One stack (mosquitto, redis-server with its append-only file, one Celery worker with the default
redelivery settings, two agent processes hosting emu-0/emu-1 and emu-2/emu-3) and a tiny config of
two rounds of 40 local steps (``fleet.quorum`` 0.5). For each fault a fresh run of the config is
trained; the fault is injected once all four sessions of round 1 are subscribed and none is done:

- ``agent``: ``kill -9`` the agent process of emu-2/emu-3, start it again;
- ``worker``: ``kill -9`` the Celery worker, start it again;
- ``mosquitto``: ``kill -9`` mosquitto, start it again on its port (persistence directory kept);
- ``redis``: restart redis-server (SIGTERM, then the same command line: it reloads its AOF);
- ``orchestrator``: ``kill -9`` the ``harmony run --stack`` process, run it again with ``--resume``.

Reported per fault: the outcome (which devices each round aggregated, rounds failed and retried,
the recovery events the driver recorded), whether the final model equals the fault-free local run
with the same devices aggregated (bit for bit), and the seconds from the fault to the end of the
round it hit. The last line printed is one JSON object.

    python benchmarks/fault_table.py                  # all five (RESULTS §11)
    python benchmarks/fault_table.py --faults worker,redis
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmony.config import validate_config  # noqa: E402
from harmony.engine import LocalEngine  # noqa: E402
from orchestrator.engine import DistributedEngine  # noqa: E402
from server import state  # noqa: E402
from testbed.stack import LocalStack  # noqa: E402

FAULTS = ("agent", "worker", "mosquitto", "redis", "orchestrator")
DEVICES = {"emu-0", "emu-1", "emu-2", "emu-3"}
CONFIG = {
    "name": "faults", "seed": 7,
    "data": {"num_shards": 8, "train_fraction": 0.03, "test_per_client": 40, "rhos": [0.0, 0.5]},
    "model": {"family": "cnn8", "width": 0.25},
    "fleet": {"num_clients": 4, "split_depths": [2, 3, 4, 2], "quorum": 0.5},
    "train": {"algorithm": "splitgp", "rounds": 2, "batch_size": 16, "lr": 0.01, "local_steps": 40},
    "eval": {"measure_latency_samples": 0},
}
RECOVERY_EVENTS = ("session_resent", "session_replayed", "session_dropped", "session_failed", "round_failed",
                   "device_reassigned", "broker_reconnected")


def in_flight(r: Any, rnd: int = 1) -> bool:
    ready = {k.decode() for k in r.hkeys(state.ready_key(rnd)) if not k.startswith(b"infer:")}
    done = {d.decode() for d in r.smembers(state.done_key(rnd))}
    return DEVICES <= ready and not DEVICES & done


def when_in_flight(r: Any, action: Callable[[], None], settle_s: float = 0.3, timeout_s: float = 120.0
                   ) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if in_flight(r):
                    time.sleep(settle_s)
                    action()
                    return
            except Exception:  # noqa: BLE001 — Redis busy: look again
                pass
            time.sleep(0.02)

    return threading.Thread(target=watch, daemon=True)


class Table:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._references: dict[tuple, dict[str, dict[str, torch.Tensor]]] = {}

    def reference(self, leave_out: dict[int, set[int]]) -> dict[str, dict[str, torch.Tensor]]:
        """The local run (training only) with those clients left out of those rounds."""
        key = tuple(sorted((r, tuple(sorted(c))) for r, c in leave_out.items() if c))
        if key not in self._references:
            local = LocalEngine(self.cfg)
            local.participants = lambda rnd, *_: [i for i in range(4)  # type: ignore[method-assign]
                                                  if i not in leave_out.get(rnd, set())]
            local.train()
            self._references[key] = local.model_state()
        return self._references[key]


def same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])


def events_since(r: Any, since: bytes) -> list[dict[str, Any]]:
    out = []
    for _, fields in r.xrange(state.events_key(), min=f"({since.decode()}"):
        out.append({k.decode(): (v.decode() if k == b"name" else json.loads(v)) for k, v in fields.items()})
    return out


def last_event(r: Any) -> bytes:
    last = r.xrevrange(state.events_key(), count=1)
    return last[0][0] if last else b"0-0"


def run_in_process(stack: LocalStack, table: Table, fault: str, out: Path) -> dict[str, Any]:
    info = stack.info
    assert info is not None
    r = state.connect(info.redis_url)
    since = last_event(r)
    hit: dict[str, float] = {}

    def inject() -> None:
        hit["at"] = time.monotonic()
        if fault == "agent":
            stack.kill("agent-1", signal.SIGKILL)
            stack.restart("agent-1")
        elif fault == "worker":
            stack.kill("worker", signal.SIGKILL)
            stack.restart("worker")
        elif fault == "mosquitto":
            stack.kill("mosquitto", signal.SIGKILL)
            stack.restart("mosquitto")
        elif fault == "redis":
            stack.restart("redis", signal.SIGTERM)
        hit["restarted"] = time.monotonic()

    injector = when_in_flight(r, inject)
    ends: dict[int, float] = {}

    def progress(event: str, **fields: Any) -> None:
        if event == "round_start" and fields["round"] == 1 and not hit and not injector.is_alive():
            injector.start()
        if event == "round_end":
            ends[fields["record"].round] = time.monotonic()

    engine = DistributedEngine(table.cfg, out, progress, mqtt=info.mqtt, redis_url=info.redis_url,
                               devices_timeout_s=60, round_timeout_s=300)
    error = None
    try:
        engine.fleet.begin_run(False)
        rounds = [asdict(rec) for rec in engine.train()]
    except Exception as err:  # noqa: BLE001 — reported in the table
        rounds, error = [], f"{type(err).__name__}: {err}"
    finally:
        engine.close()
    injector.join(5)
    return summarise(fault, table, r, since, rounds, engine.model_state() if not error else None, hit, ends, error)


def run_orchestrator_fault(stack: LocalStack, table: Table, out: Path) -> dict[str, Any]:
    info = stack.info
    assert info is not None
    r = state.connect(info.redis_url)
    since = last_event(r)
    cfg_path = out / "faults.yaml"
    out.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(table.cfg.model_dump(mode="json")))
    argv = [sys.executable, "-m", "testbed.cli", "run", str(cfg_path), "--runtime", "distributed", "--stack",
            str(stack.run_dir), "--out", str(out / "run"), "--round-timeout", "300"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    previous = r.hget(state.run_key(), "id")
    hit: dict[str, float] = {}
    ends: dict[int, float] = {}
    with open(out / "first.log", "wb") as log:
        first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    error = None
    try:
        deadline = time.monotonic() + 180
        while not (r.hget(state.run_key(), "id") != previous and in_flight(r)):
            if first.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("round 1 never ran: " + (out / "first.log").read_text()[-500:])
            time.sleep(0.02)
        time.sleep(0.3)
        first.send_signal(signal.SIGKILL)
        hit["at"] = time.monotonic()
        first.wait(10)
        second = subprocess.Popen([*argv, "--resume"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while second.poll() is None:
            if 1 not in ends and r.hget(state.run_key(), "last_round") in (b"1", b"2"):
                ends[1] = time.monotonic()
            time.sleep(0.05)
        if second.returncode != 0:
            error = f"the resumed run exited {second.returncode}: {second.stdout.read().decode()[-500:]}"
        ends.setdefault(1, time.monotonic())
    except Exception as err:  # noqa: BLE001
        error = f"{type(err).__name__}: {err}"
    finally:
        if first.poll() is None:
            first.kill()
    results = out / "run" / "results.json"
    rounds = json.loads(results.read_text())["rounds"] if results.is_file() and not error else []
    model = None
    if rounds:
        info_round = r.hgetall(state.round_key(len(rounds)))
        model = {"client": state.get_model(r, info_round[b"client_sha"].decode()),
                 "server": state.get_model(r, info_round[b"server_sha"].decode())}
    return summarise("orchestrator", table, r, since, rounds, model, hit, ends, error)


def summarise(fault: str, table: Table, r: Any, since: bytes, rounds: list[dict[str, Any]],
              model: dict[str, dict[str, torch.Tensor]] | None, hit: dict[str, float], ends: dict[int, float],
              error: str | None) -> dict[str, Any]:
    events = events_since(r, since)
    counts: dict[str, int] = {}
    for e in events:
        if e["name"] in RECOVERY_EVENTS:
            counts[e["name"]] = counts.get(e["name"], 0) + 1
    leave_out = {rec["round"]: set(rec["dropouts"]) | set(rec["stragglers"]) for rec in rounds}
    equal = model is not None and same(table.reference(leave_out), model)
    aggregated = [4 - len(leave_out.get(k, set())) for k in range(1, len(rounds) + 1)]
    retried = sum(1 for e in events if e["name"] == "round_failed")
    dropped = "".join(f"; round {k} left out clients {sorted(c)}" for k, c in sorted(leave_out.items()) if c)
    outcome = ("run failed: " + error) if error else (
        f"rounds aggregated {'/'.join(map(str, aggregated))} of 4 devices{dropped}"
        + (f"; {retried} try failed and was retried" if retried else ""))
    return {"fault": fault, "injected": "at" in hit, "outcome": outcome, "events": counts,
            "left_out": {k: sorted(c) for k, c in sorted(leave_out.items()) if c},
            "model_equal": bool(equal), "recovery_s": round(ends[1] - hit["at"], 1) if "at" in hit and 1 in ends
            else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", default=",".join(FAULTS))
    args = ap.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        ap.error(f"unknown fault(s) {unknown}; expected some of {', '.join(FAULTS)}")
    logging.basicConfig(level=logging.ERROR)
    table = Table(validate_config(CONFIG))
    run_dir = Path(tempfile.mkdtemp(prefix="faults-"))
    stack = LocalStack(run_dir / "stack")
    stack.start(agents=2, devices_per_agent=2, registry=False, auth=False)
    rows = []
    try:
        for fault in faults:
            out = run_dir / fault
            row = (run_orchestrator_fault(stack, table, out) if fault == "orchestrator"
                   else run_in_process(stack, table, fault, out))
            rows.append(row)
            print(f"{row['fault']:<13} {row['outcome']:<60} model equal: {row['model_equal']!s:<5} "
                  f"recovery {row['recovery_s']} s  events {row['events']}", flush=True)
    finally:
        stack.stop()
    result = {"bench": "fault_table", "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
