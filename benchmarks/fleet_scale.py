"""How the distributed runtime's cost grows with the fleet: one round of N emulated devices over
real mosquitto, redis-server, one Celery worker and agent processes that each host many devices,
all on this machine, for N in ``--sizes`` (default 25, 50, 100, 200).

Each size gets a fresh stack (so one size's processes and Redis state do not weigh on the next):
``ceil(N / --devices-per-agent)`` agent processes, ``--workers`` Celery workers (default 1) with
one session thread per device between them (``harmony up``'s default for one worker), torch at
one intra-op thread in every stack process (``--stack-threads``). The model is tiny — ``cnn8`` at
width 0.125, split depths 2/3/4, 2 local steps of batch 8, ~16 training samples and 4 test
samples per client — so the figures are the runtime's costs, not arithmetic. Every device takes
part in every round (participation 1).
Round 1 is the cold round (the agents and the worker rebuild the plan from the run manifest and
the agents read their devices' rows of the dataset); round 2 is the timed, warm round.

Figures per size (``sizes[N]``):

- ``round_s``: wall time of the warm round, ``Engine.run_round`` as the round driver sees it
  (publish the start models, enqueue the sessions, the sessions' step exchanges and uploads,
  aggregation, loading the result); ``cold_round_s`` the same for round 1.
- ``compute_cpu_s``: the arithmetic of the warm round, summed over its sessions: the thread CPU
  seconds of the devices' compute phases (the agents' per-round log lines, ``compute cpu``) plus
  those of the server halves' compute phases (``session_done`` events, ``compute_cpu_s``). With
  one torch thread per process the kernels run in the thread that times them, so this is the
  CPU time of the forward/backward/optimiser work and nothing else; unlike wall-clock phase
  times it does not grow when hundreds of threads time-share the cores.
- ``overhead_s = round_s − compute_cpu_s / P`` with P the cores this process may use: how much
  longer the round took than its arithmetic alone would on P perfectly packed cores — messaging
  (paho, mosquitto, msgpack), Celery dispatch, Redis round state and buffers, model blobs,
  aggregation, the protocol's Python, thread scheduling, and cores left idle while sessions wait
  for their peers. ``overhead_ms_per_device = 1000 · overhead_s / N``; ``wall_ms_per_device =
  1000 · round_s / N``.
- ``process_cpu_s``: CPU seconds (user + system, all threads) each part of the stack spent during
  the warm round — this process (the round driver), the Celery worker, the agents together,
  mosquitto, redis-server — i.e. where the cores went, arithmetic and overhead alike.
- ``split_s``: the round driver's phases of the warm round (``round_done`` event: publish,
  sessions, aggregate, load).
- Memory, resident set size (psutil) after the warm round: ``rss_mb_per_agent`` (each agent
  process), ``rss_mb_per_device`` (all agents' RSS / N: a device's share, the process baseline
  of torch and Python included), ``worker_rss_mb`` (all workers), ``brokers_rss_mb`` (mosquitto + redis-server).

Summary (the largest size that completed): ``devices_completed``, its ``overhead_ms_per_device``
and ``rss_mb_per_device``, and ``rss_mb_per_hosted_device`` — the slope of agent RSS against the
devices an agent hosts, fitted over every agent of every size (what one more device in an agent
costs, the process baseline excluded; needs agents of at least two different sizes).

    python benchmarks/fleet_scale.py                      # 25, 50, 100, 200 devices (minutes)
    python benchmarks/fleet_scale.py --sizes 200 --devices-per-agent 100
    python benchmarks/fleet_scale.py --smoke              # 4 devices in 2 agents: what the suite runs

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmony.config import validate_config  # noqa: E402
from orchestrator.engine import DistributedEngine  # noqa: E402
from server import state  # noqa: E402
from testbed.stack import LocalStack  # noqa: E402

AGENT_CPU = re.compile(r"device (\S+) round (\d+): \d+ steps in [\d.]+ s \([^)]*\); compute cpu ([\d.]+) s")
TRAIN_SAMPLES = 60_000  # Fashion-MNIST's training split
SAMPLES_PER_CLIENT = 16


def config(devices: int) -> dict:
    """The tiny run of ``devices`` clients (module docstring)."""
    return {
        "name": f"fleet-scale-{devices}", "seed": 1,
        "data": {"num_shards": max(100, 2 * devices), "shards_per_client": 2,
                 "train_fraction": min(1.0, SAMPLES_PER_CLIENT * devices / TRAIN_SAMPLES),
                 "test_per_client": 4, "rhos": [0.0]},
        "model": {"family": "cnn8", "width": 0.125},
        "fleet": {"num_clients": devices, "split_depths": [2, 3, 4]},
        "train": {"algorithm": "splitgp", "rounds": 2, "batch_size": 8, "local_steps": 2},
        "eval": {"measure_latency_samples": 0},
    }


def device_cpu_s(run_dir: Path, rnd: int) -> tuple[float, int]:
    """(Σ device compute CPU seconds, sessions) of round ``rnd`` from every agent's log."""
    total, sessions = 0.0, 0
    for log_path in sorted(run_dir.glob("agent-*.log")):
        for m in AGENT_CPU.finditer(log_path.read_text(errors="replace")):
            if int(m.group(2)) == rnd:
                total += float(m.group(3))
                sessions += 1
    return total, sessions


def server_events(redis_url: str, rnd: int) -> tuple[float, int, dict[str, float]]:
    """(Σ server compute CPU seconds, sessions, the round driver's split) of round ``rnd``."""
    r = state.connect(redis_url)
    total, sessions, split = 0.0, 0, {}
    for _, fields in r.xrange(state.events_key()):
        if json.loads(fields.get(b"round", b"null")) != rnd:
            continue
        if fields[b"name"] == b"session_done":
            total += json.loads(fields[b"compute_cpu_s"])
            sessions += 1
        elif fields[b"name"] == b"round_done":
            split = {k: round(v, 3) for k, v in json.loads(fields[b"split"]).items()}
    r.close()
    return total, sessions, split


def cpu_s(proc: psutil.Process) -> float:
    """User + system CPU seconds of ``proc`` so far (its threads included)."""
    t = proc.cpu_times()
    return t.user + t.system


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def run_size(devices: int, per_agent: int, stack_threads: int, cores: int, workers: int) -> dict:
    cfg = validate_config(config(devices))
    with tempfile.TemporaryDirectory(prefix="hsfl-scale-") as tmp:
        stack = LocalStack(tmp)
        info = stack.start(agents=0, registry=False, worker_concurrency=math.ceil(devices / workers),
                           torch_threads=stack_threads, workers=workers)
        try:
            agents = math.ceil(devices / per_agent)
            for a in range(agents):
                ids = [f"emu-{k}" for k in range(a * per_agent, min(devices, (a + 1) * per_agent))]
                stack.add_agent(ids, ["--log-level", "INFO"])
            t0 = time.perf_counter()
            engine = DistributedEngine(cfg, mqtt=info.mqtt, redis_url=info.redis_url, devices_timeout_s=300.0,
                                       round_timeout_s=1200.0)
            registered_s = time.perf_counter() - t0
            try:
                t0 = time.perf_counter()
                engine.run_round(1)
                cold_s = time.perf_counter() - t0
                procs = {name: psutil.Process(pid) for name, pid in info.pids.items()}
                procs["driver"] = psutil.Process()
                cpu0 = {name: cpu_s(p) for name, p in procs.items()}
                t0 = time.perf_counter()
                record = engine.run_round(2)
                round_s = time.perf_counter() - t0
                process_cpu = {name: cpu_s(p) - cpu0[name] for name, p in procs.items()}
            finally:
                engine.close()
            time.sleep(0.5)  # the agents write their last log lines
            agent_rss = [round(rss_mb(stack.pid(f"agent-{a}")), 1) for a in range(agents)]
            hosted = [min(devices, (a + 1) * per_agent) - a * per_agent for a in range(agents)]
            worker_rss = sum(rss_mb(pid) for name, pid in info.pids.items() if name.startswith("worker"))
            brokers_rss = rss_mb(stack.pid("mosquitto")) + rss_mb(stack.pid("redis"))
            dev_cpu, dev_sessions = device_cpu_s(Path(tmp), 2)
            srv_cpu, srv_sessions, split = server_events(info.redis_url, 2)
        finally:
            stack.stop()
    if record.participants != devices or dev_sessions != devices or srv_sessions != devices:
        raise RuntimeError(f"{devices} devices: the warm round completed {record.participants} sessions "
                           f"({dev_sessions} device and {srv_sessions} server reports)")
    compute = dev_cpu + srv_cpu
    overhead = round_s - compute / cores
    return {
        "devices": devices, "agents": agents, "hosted": hosted, "registered_s": round(registered_s, 2),
        "cold_round_s": round(cold_s, 2), "round_s": round(round_s, 2),
        "compute_cpu_s": {"device": round(dev_cpu, 3), "server": round(srv_cpu, 3)},
        "overhead_s": round(overhead, 2), "overhead_ms_per_device": round(1e3 * overhead / devices, 1),
        "wall_ms_per_device": round(1e3 * round_s / devices, 1), "split_s": split,
        "process_cpu_s": {"driver": round(process_cpu["driver"], 2),
                          "worker": round(sum(v for k, v in process_cpu.items() if k.startswith("worker")), 2),
                          "agents": round(sum(v for k, v in process_cpu.items() if k.startswith("agent-")), 2),
                          "mosquitto": round(process_cpu["mosquitto"], 2), "redis": round(process_cpu["redis"], 2)},
        "rss_mb_per_agent": agent_rss, "rss_mb_per_device": round(sum(agent_rss) / devices, 2),
        "worker_rss_mb": round(worker_rss, 1), "brokers_rss_mb": round(brokers_rss, 1),
    }


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of RSS (MB) against devices hosted; None without two distinct sizes."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="25,50,100,200", help="fleet sizes, comma-separated (default 25,50,100,200)")
    ap.add_argument("--devices-per-agent", type=int, default=50, help="devices per agent process (default 50)")
    ap.add_argument("--stack-threads", type=int, default=1, help="torch threads of the stack's processes (default 1)")
    ap.add_argument("--workers", type=int, default=1,
                    help="Celery worker processes, each with ceil(N / workers) session threads (default 1)")
    ap.add_argument("--smoke", action="store_true", help="4 devices in 2 agents (what the test suite runs)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.devices_per_agent = "4", 2
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        ap.error(f"--sizes: every size must be at least 1, got {args.sizes!r}")
    if args.devices_per_agent < 1 or args.stack_threads < 1 or args.workers < 1:
        ap.error("--devices-per-agent, --stack-threads and --workers must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    cores = len(os.sched_getaffinity(0))
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for n in sizes:
        try:
            res = run_size(n, args.devices_per_agent, args.stack_threads, cores, args.workers)
        except Exception as err:  # a size that does not complete is a result too; report it and go on
            failed[str(n)] = f"{type(err).__name__}: {err}"[:500]
            print(f"{n} devices: FAILED: {failed[str(n)]}", flush=True)
            continue
        results[str(n)] = res
        print(f"{n} devices in {res['agents']} agent(s): warm round {res['round_s']} s (cold {res['cold_round_s']} s), "
              f"compute {res['compute_cpu_s']} CPU-s, overhead {res['overhead_ms_per_device']} ms/device; "
              f"RSS per agent {res['rss_mb_per_agent']} MB, worker {res['worker_rss_mb']} MB; "
              f"driver phases {res['split_s']}; CPU-s by process {res['process_cpu_s']}", flush=True)
    largest = results[str(max(int(k) for k in results))] if results else None
    points = [(h, rss) for res in results.values() for h, rss in zip(res["hosted"], res["rss_mb_per_agent"],
                                                                     strict=True)]
    per_hosted = slope(points)
    summary = {
        "bench": "fleet_scale", "cores": cores, "devices_per_agent": args.devices_per_agent,
        "stack_threads": args.stack_threads,
        "workers": args.workers, "devices_completed": largest["devices"] if largest else 0,
        "round_s": largest["round_s"] if largest else None,
        "overhead_ms_per_device": largest["overhead_ms_per_device"] if largest else None,
        "rss_mb_per_device": largest["rss_mb_per_device"] if largest else None,
        "rss_mb_per_hosted_device": None if per_hosted is None else round(per_hosted, 3),
        "sizes": results, "failed": failed,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
