"""A large simulated fleet in the local engine: N registered devices, a fixed number of them
training per round, on the simulated clock — and what an idle registered device costs.

For each N in ``--sizes`` (default 100 and 10,000) a fresh Python process (so RSS figures do not
carry over) plans the run (``Experiment.plan``: partitions, OOD test pools, depths, profiles of
every device), builds the in-process fleet (``InProcessFleet``: the whole dataset once, a
``DevicePlan`` per device) and runs ``--rounds`` training rounds with ``--participants`` devices
each (``train.participation = participants / N``; 1 % at 10,000). Every client keeps ~6 training
samples at every N (Fashion-MNIST's 60,000 split 10,000 ways; ``data.train_fraction`` trims the
smaller fleets to the same), 4 test samples, ``cnn8`` at width 0.125, 2 local steps of batch 4,
``fleet.clock: simulated`` (session times modelled from the device profiles), one torch thread
(a batch of 4 through a 0.125-width network gains nothing from two, and on a loaded machine the
second thread's spin-waits cost more than it computes). The default
algorithm is ``multi-exit`` (λ = 0): methods with λ > 0 keep every trained client's last local
model, so a device that has trained is no longer idle. The final evaluation is not run (every
device would evaluate; not what this measures).

Figures per N (``sizes[N]``): ``plan_s`` (planning), ``fleet_s`` (building the fleet, the dataset
load included), ``rounds_per_s`` over the timed rounds, ``rss_mb`` (resident set size after the
rounds, psutil) and ``peak_rss_mb`` (the process's high-water mark, ``ru_maxrss``).

``idle_device_kb`` (summary): (RSS after the rounds with the largest N − RSS with the smallest N)
/ (largest N − smallest N), in KiB — the memory one more registered but idle device costs: its
index lists (training rows, test pools, classes), its plan objects, and its entries in the
per-device lists (depth, profile, ``n_i``). Both fleets hold the same dataset tensors and train
the same number of devices per round, so the dataset (loaded whole in either case) cancels out;
what a device's ~6 training indices take is included, and is a few dozen bytes.

    python benchmarks/sim_fleet_scale.py                     # 100 and 10,000 registered (a few minutes)
    python benchmarks/sim_fleet_scale.py --sizes 100,1000,10000 --rounds 5
    python benchmarks/sim_fleet_scale.py --smoke             # 20 and 200 registered, 10 a round

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN_SAMPLES = 60_000  # Fashion-MNIST's training split
SAMPLES_PER_CLIENT = 6  # what each of 10,000 clients gets


def config(registered: int, participants: int, rounds: int, algorithm: str, samples: int) -> dict:
    """The run of ``registered`` devices (module docstring)."""
    return {
        "name": f"sim-fleet-{registered}", "seed": 0, "threads": 1,
        "data": {"partition": "shard", "shards_per_client": 2, "num_shards": 2 * registered,
                 "train_fraction": min(1.0, samples * registered / TRAIN_SAMPLES),
                 "test_per_client": 4, "rhos": [0.0, 0.5]},
        "model": {"family": "cnn8", "width": 0.125},
        "fleet": {"num_clients": registered, "split_depths": [2, 3, 4], "clock": "simulated"},
        "train": {"algorithm": algorithm, "rounds": rounds, "participation": participants / registered,
                  "batch_size": 4, "local_steps": 2},
        "eval": {"measure_latency_samples": 0},
    }


def run_one(registered: int, participants: int, rounds: int, algorithm: str, samples: int) -> dict:
    """One size, in this process."""
    from harmony.config import validate_config
    from harmony.engine import Engine
    from harmony.experiment import Experiment
    from harmony.fleet import InProcessFleet

    cfg = validate_config(config(registered, participants, rounds, algorithm, samples))
    t0 = time.perf_counter()
    experiment = Experiment.plan(cfg)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fleet = InProcessFleet(experiment)
    fleet_s = time.perf_counter() - t0
    engine = Engine(experiment, fleet)
    built_mb = psutil.Process().memory_info().rss / 2**20
    engine.run_round(1)  # warm-up: first-call costs of torch
    t0 = time.perf_counter()
    trained = 0
    for rnd in range(2, rounds + 1):
        trained += engine.run_round(rnd).participants
    timed_s = time.perf_counter() - t0
    return {
        "registered": registered, "participants": participants, "rounds_timed": rounds - 1,
        "sessions_timed": trained, "samples_per_client": round(sum(experiment.samples) / registered, 2),
        "plan_s": round(plan_s, 2), "fleet_s": round(fleet_s, 2),
        "rounds_per_s": round((rounds - 1) / timed_s, 3),
        "built_rss_mb": round(built_mb, 1),
        "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "simulated_clock_s": round(engine.clock_s, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,10000", help="registered devices, comma-separated (default 100,10000)")
    ap.add_argument("--participants", type=int, default=100, help="devices training per round (default 100)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per size, the first untimed (default 4)")
    ap.add_argument("--algorithm", default="multi-exit")
    ap.add_argument("--samples-per-client", type=int, default=SAMPLES_PER_CLIENT)
    ap.add_argument("--smoke", action="store_true", help="20 and 200 registered, 10 a round, 2 rounds")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # one size, in this process
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.participants, args.rounds = "20,200", 10, 2
    if args.rounds < 2:
        ap.error(f"--rounds must be at least 2 (one warm-up, one timed), got {args.rounds}")
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.participants, args.rounds, args.algorithm,
                                 args.samples_per_client)))
        return
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if len(sizes) < 2 or sizes[0] < args.participants:
        ap.error(f"--sizes: need two or more sizes, each at least --participants ({args.participants}); "
                 f"got {args.sizes!r}")
    results = {}
    for n in sizes:
        argv = [sys.executable, __file__, "--one", str(n), "--participants", str(args.participants), "--rounds",
                str(args.rounds), "--algorithm", args.algorithm, "--samples-per-client",
                str(args.samples_per_client)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{n} registered devices failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results[str(n)] = res
        print(f"{n} registered, {res['participants']} per round: plan {res['plan_s']} s, fleet {res['fleet_s']} s, "
              f"{res['rounds_per_s']} rounds/s, RSS {res['rss_mb']} MB (peak {res['peak_rss_mb']} MB)", flush=True)
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    idle_kb = (large["rss_mb"] - small["rss_mb"]) * 1024 / (sizes[-1] - sizes[0])
    print(json.dumps({
        "bench": "sim_fleet_scale", "algorithm": args.algorithm, "participants": args.participants,
        "registered": sizes[-1], "rounds_per_s": large["rounds_per_s"], "peak_rss_mb": large["peak_rss_mb"],
        "idle_device_kb": round(idle_kb, 2), "sizes": results,
    }))


if __name__ == "__main__":
    main()
