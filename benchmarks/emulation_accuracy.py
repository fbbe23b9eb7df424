"""How closely emulated devices run at their class's figures, per enforcement method (docs/emulation.md).

For each method pair (compute/link: ``pacing``, ``cgroup``, ``cgroup+pacing`` × ``netns``, ``agent``)
a fresh local stack (mosquitto, redis-server, a Celery worker) serves one emulated device per class
(``testbed.emulate.EmulatedFleet``); the benchmark records what each device's ``hello`` measured
(uplink, conv rate, CPU quota) and runs ``--rounds`` distributed rounds of half-width cnn8 at fixed
split depths, comparing every session's device compute per step (what the agent reports) with the
step's FLOPs ÷ the class's rate. Prints a table and, last, one JSON line.

    python benchmarks/emulation_accuracy.py                       # all methods (root), ~5 min
    python benchmarks/emulation_accuracy.py --methods pacing/agent --classes pi4 --rounds 1 --steps 3  # smoke

``--fleet pi4:3,pi-zero2:2,jetson-nano:2`` instead runs that fleet at once (this host's default
methods, as ``harmony fleet emulate`` picks them) twice: on the host as it is, and with ``--load``
processes competing for the CPU (busy single-thread loops of float work, as another stack's
workers would be); per class it prints the measured / expected step-time ratio (median over the
class's devices and rounds, with the range) and says plainly when the host is too slow for the
class: the plan could not emulate it (faster than one host core), or the agents' pacing found
that the work alone took longer than the class's step time.

    python benchmarks/emulation_accuracy.py --fleet pi4:3,pi-zero2:2,jetson-nano:2 --load 2
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.client import BrokerClient  # noqa: E402
from harmony.assignment import step_needs  # noqa: E402
from harmony.config import validate_config  # noqa: E402
from harmony.profiles import get_profile  # noqa: E402
from orchestrator.engine import DistributedEngine  # noqa: E402
from orchestrator.registry import online_profiles  # noqa: E402
from server import state  # noqa: E402
from testbed.emulate import EmulatedFleet, Host, detect_host, parse_profile_option, plan_fleet  # noqa: E402
from testbed.stack import LocalStack  # noqa: E402


def config(n: int, depths: list[int], steps: int, width: float) -> object:
    return validate_config({
        "name": "emulation-accuracy", "seed": 3,
        "data": {"num_shards": 2 * n, "train_fraction": 0.05, "test_per_client": 20, "rhos": [0.0]},
        "model": {"family": "cnn8", "width": width},
        "fleet": {"num_clients": n, "split_depths": depths},
        "train": {"algorithm": "splitgp", "rounds": 1, "batch_size": 16, "lr": 0.01, "local_steps": steps},
        "eval": {"measure_latency_samples": 0},
    })


def measure(method: str, classes: list[str], host: Host, rounds: int, steps: int, width: float,
            depth: int) -> list[dict]:
    compute, link = method.split("/")
    tag = uuid.uuid4().hex[:4]
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalStack(Path(tmp) / "stack")
        info = stack.start(agents=0, registry=False, worker_concurrency=max(2, len(classes)))
        plans = plan_fleet([(c, 1) for c in classes], host, compute=compute, link=link, id_prefix=f"b{tag}-")
        fleet = EmulatedFleet(plans, info.mqtt, Path(tmp) / "emulate")
        try:
            fleet.start()
            client = BrokerClient(f"bench-{tag}", *info.mqtt, clean_start=True, session_expiry_s=0)
            client.connect()
            try:
                hellos = online_profiles(client, len(classes), timeout=120)
            finally:
                client.close()
            devices = sorted(hellos)
            cfg = config(len(devices), [depth] * len(devices), steps, width)
            per_step: dict[str, list[float]] = {d: [] for d in devices}
            for rnd in range(1, rounds + 1):
                engine = DistributedEngine(cfg.with_overrides(**{"train.rounds": rounds}), Path(tmp) / "run",
                                           mqtt=info.mqtt, redis_url=info.redis_url, devices_timeout_s=60,
                                           round_timeout_s=600)
                try:
                    engine.run_round(rnd)
                    ex = engine.experiment
                finally:
                    engine.close()
                r = state.connect(info.redis_url)
                for dev in devices:
                    meta = state.session_meta(r, rnd, dev)
                    per_step[dev].append(meta["device_compute_s"] / ex.steps(meta["index"]))
            rows = []
            for plan in plans:
                (dev,) = [d for d in devices if hellos[d].get("device_class") == plan.profile.name]
                p = get_profile(plan.profile.name)
                target = step_needs(ex.costs[depth], batch_size=16, batches_per_step=ex.algorithm.batches_per_step,
                                    momentum=cfg.train.momentum, bits_per_element=cfg.eval.bits_per_element,
                                    compute_flops=p.compute_flops, uplink_bps=1.0).compute_s
                h = hellos[dev]
                rows.append({"method": method, "class": p.name, "enforced_compute": plan.compute,
                             "cpus": plan.cpus, "target_step_s": target,
                             "step_s_median": statistics.median(per_step[dev]),
                             "step_ratio": statistics.median(per_step[dev]) / target,
                             "step_ratio_range": [min(per_step[dev]) / target, max(per_step[dev]) / target],
                             "uplink_ratio": h["uplink_bps"] / p.uplink_bps,
                             "hello_conv_gflops": h["rates"]["conv"] / 1e9, "hello_cpus": h["cpus"],
                             "rtt_ms": h["rtt_ms"]})
            return rows
        finally:
            fleet.stop()
            stack.stop()


BUSY_LOOP = ("import os, numpy as np\nos.nice(0)\na = np.random.rand(256, 256)\n"
             "while True:\n    a = np.tanh(a @ a / 256.0)\n")
"""A competing CPU load: one single-threaded process of dense float work (``OMP_NUM_THREADS=1``)."""
PACING_LINE = re.compile(r"device (\S+) round (\d+) pacing: target ([0-9.]+) s/step, realised ([0-9.]+), "
                         r"host work ([0-9.]+)")


def start_load(n: int) -> list[subprocess.Popen[bytes]]:
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait(10)


QUOTA_LINE = re.compile(r"CPU quota of \S+ raised from ([0-9.]+) to ([0-9.]+) CPU")


def final_quotas(run_dir: Path) -> dict[str, list[float]]:
    """Class → the CPU quota each of its agents ended with, where the agent raised it."""
    out: dict[str, list[float]] = {}
    for log_file in sorted(run_dir.glob("agent-*.log")):
        raised = QUOTA_LINE.findall(log_file.read_text(errors="replace"))
        if raised:
            out.setdefault(log_file.stem.split("-", 2)[2], []).append(float(raised[-1][1]))
    return out


def pacing_lines(run_dir: Path) -> dict[tuple[str, int], tuple[float, float, float]]:
    """(device, round) → (target, realised, host work) seconds per step, from the agents' logs."""
    out = {}
    for log_file in run_dir.glob("agent-*.log"):
        for m in PACING_LINE.finditer(log_file.read_text(errors="replace")):
            out[(m.group(1), int(m.group(2)))] = (float(m.group(3)), float(m.group(4)), float(m.group(5)))
    return out


def measure_fleet(requests: list[tuple[str, int]], host: Host, rounds: int, steps: int, width: float, depth: int,
                  load: int) -> list[dict]:
    """The fleet at once, this host's default methods, ``load`` competing processes: per class the
    measured / expected step time and whether the host is too slow for it."""
    tag = uuid.uuid4().hex[:4]
    plans = plan_fleet(requests, host, id_prefix=f"f{tag}-")
    devices = [d for p in plans for d in p.devices]
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalStack(Path(tmp) / "stack")
        info = stack.start(agents=0, registry=False, worker_concurrency=len(devices))
        fleet = EmulatedFleet(plans, info.mqtt, Path(tmp) / "emulate")
        competing: list[subprocess.Popen[bytes]] = []
        try:
            fleet.start()
            client = BrokerClient(f"bench-{tag}", *info.mqtt, clean_start=True, session_expiry_s=0)
            client.connect()
            try:
                hellos = online_profiles(client, len(devices), timeout=600)
            finally:
                client.close()
            competing = start_load(load)
            order = sorted(hellos)
            cfg = config(len(order), [depth] * len(order), steps, width).with_overrides(**{
                "train.rounds": rounds, "fleet.quorum": len(order)})
            per_step: dict[str, list[float]] = {d: [] for d in order}
            engine = DistributedEngine(cfg, Path(tmp) / "run", mqtt=info.mqtt, redis_url=info.redis_url,
                                       devices_timeout_s=120, round_timeout_s=900)
            try:
                for rnd in range(1, rounds + 1):
                    engine.run_round(rnd)
                ex = engine.experiment
            finally:
                engine.close()
            stop_load(competing)
            competing = []
            r = state.connect(info.redis_url)
            for rnd in range(1, rounds + 1):
                for dev in order:
                    meta = state.session_meta(r, rnd, dev)
                    per_step[dev].append(meta["device_compute_s"] / ex.steps(meta["index"]))
            paced = pacing_lines(fleet.run_dir)
            quotas = final_quotas(fleet.run_dir)
        finally:
            stop_load(competing)
            fleet.stop()
            stack.stop()
    rows = []
    for plan in plans:
        p = plan.profile
        target = step_needs(ex.costs[depth], batch_size=16, batches_per_step=ex.algorithm.batches_per_step,
                            momentum=cfg.train.momentum, bits_per_element=cfg.eval.bits_per_element,
                            compute_flops=p.compute_flops, uplink_bps=1.0).compute_s
        ratios = [s / target for d in plan.devices for s in per_step[d]]
        work = [paced[(d, rnd)][2] for d in plan.devices for rnd in range(1, rounds + 1) if (d, rnd) in paced]
        if plan.compute == "host":
            verdict = f"host too slow: not emulated ({plan.note})"
        elif work and statistics.median(work) > target:
            verdict = (f"host too slow: its work took {statistics.median(work):.3f} s/step, more than the class's "
                       f"{target:.3f}")
        elif abs(statistics.median(ratios) - 1) <= 0.15:
            verdict = "within ±15 %"
        else:
            verdict = "outside ±15 %"
        rows.append({"load": load, "class": p.name, "devices": len(plan.devices), "compute": plan.compute,
                     "cpus": plan.cpus, "raised_cpus": quotas.get(p.name, []), "target_step_s": target,
                     "step_ratio": statistics.median(ratios),
                     "step_ratio_range": [min(ratios), max(ratios)],
                     "host_work_s": statistics.median(work) if work else None, "verdict": verdict})
    return rows


def main_fleet(args: argparse.Namespace, host: Host) -> None:
    requests = [parse_profile_option(x) for x in args.fleet.split(",")]
    t0 = time.perf_counter()
    rows = []
    for load in (0, args.load) if args.load else (0,):
        rows += measure_fleet(requests, host, args.rounds, args.steps, args.width, args.depth, load)
    print("| competing load | class | devices | compute (quota: start → raised to) | measured / expected step "
          "(range) | host work s/step | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lo, hi = r["step_ratio_range"]
        work = "-" if r["host_work_s"] is None else f"{r['host_work_s']:.3f} (target {r['target_step_s']:.3f})"
        quota = "" if r["cpus"] is None else f" ({r['cpus']:.3f} CPU" + (
            f" → {', '.join(f'{c:.3f}' for c in r['raised_cpus'])})" if r["raised_cpus"] else ")")
        print(f"| {r['load']} process(es) | {r['class']} | {r['devices']} | {r['compute']}{quota} | "
              f"{r['step_ratio']:.3f} ({lo:.3f}-{hi:.3f}) | {work} | {r['verdict']} |")
    print(json.dumps({"bench": "emulation_accuracy_fleet", "host_training_gflops": host.training_flops / 1e9,
                      "fleet": args.fleet, "seconds": time.perf_counter() - t0, "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="pacing/netns,cgroup+pacing/netns,cgroup/netns,pacing/agent",
                    help="compute/link pairs, comma-separated")
    ap.add_argument("--classes", default="pi_zero_2,pi4,jetson_nano")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="local steps per round")
    ap.add_argument("--width", type=float, default=0.5, help="cnn8 width")
    ap.add_argument("--depth", type=int, default=3, help="split depth of every device")
    ap.add_argument("--fleet", default=None, help="CLASS:N,... run this fleet at once (module docstring)")
    ap.add_argument("--load", type=int, default=0, help="with --fleet: also run it beside this many competing "
                    "CPU-bound processes")
    ap.add_argument("--host-gflops", type=float, default=None, help="size the CPU quotas as if one host core "
                    "trained at this rate (e.g. an idle host's, while this one is loaded) instead of measuring it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    host = detect_host(None if args.host_gflops is None else args.host_gflops * 1e9)
    print(f"host: {host.describe()}", file=sys.stderr)
    if args.fleet:
        main_fleet(args, host)
        return
    rows = []
    t0 = time.perf_counter()
    for method in args.methods.split(","):
        rows += measure(method, args.classes.split(","), host, args.rounds, args.steps, args.width, args.depth)
    print("| method | class | compute | step time / target (range) | hello uplink / class | hello conv GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lo, hi = r["step_ratio_range"]
        print(f"| {r['method']} | {r['class']} | {r['enforced_compute']} | {r['step_ratio']:.3f} ({lo:.3f}-{hi:.3f}) "
              f"| {r['uplink_ratio']:.3f} | {r['hello_conv_gflops']:.2f} |")
    print(json.dumps({"bench": "emulation_accuracy", "host_training_gflops": host.training_flops / 1e9,
                      "seconds": time.perf_counter() - t0, "rows": rows}))


if __name__ == "__main__":
    main()
