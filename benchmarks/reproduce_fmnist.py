"""Reproduce the structure of the paper's Table 2 (Fashion-MNIST, Shard-2, heterogeneous cnn8).

    python benchmarks/reproduce_fmnist.py --scale smoke      # ~2 min per seed, what CI checks
    python benchmarks/reproduce_fmnist.py --scale reduced --jobs 2   # the documented CPU scale (~2 h on 2 cores)
    python benchmarks/reproduce_fmnist.py --scale paper      # 50 clients × 1,200 samples, full width
    python benchmarks/reproduce_fmnist.py --scale paper --project   # time one round, project the run

Scales (all Shard-2, depths 2/3/4 in turn, SGD momentum 0.9, fp16 features, τ oracle-best):
- smoke:   10 clients on 20 shards, 10% of each client's data, half-width cnn8, batch 32, 6 rounds;
           personalisation at rate 0.01 (after 18 training steps five steps at the default
           0.001 barely move the exit; benchmarks/RESULTS.md §2).
- reduced: the paper's 50 clients on 100 shards, 25% of each client's data (300 samples),
           half-width cnn8, batch 64, 40 rounds, one torch thread per run (so that runs side by
           side with --jobs give the bits one run alone gives). At 20 rounds (the first sweeps,
           benchmarks/RESULTS.md §2) the personalised methods were far from converged.
- paper:   the paper's setting (examples/fmnist-shard2-50.yaml): full data, width 1, batch 64,
           100 rounds (the paper does not state its round count for this table).

The last line printed is one JSON object in the compare.json shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine_throughput import DispatchFlopCounter  # noqa: E402

from harmony.config import load_config  # noqa: E402
from harmony.engine import LocalEngine  # noqa: E402
from harmony.stats import paired_difference  # noqa: E402
from testbed.compare import _row, compare, run_slug  # noqa: E402

ALGORITHMS = ["splitfed", "multi-exit", "splitgp(lambda=1)", "splitgp(lambda=0.2)", "splitgp+ft", "harmony"]
SCALES: dict[str, list[str]] = {
    "smoke": ["fleet.num_clients=10", "data.num_shards=20", "data.train_fraction=0.1", "model.width=0.5",
              "train.batch_size=32", "train.rounds=6", "train.finetune_lr=0.01"],
    "reduced": ["data.train_fraction=0.25", "model.width=0.5", "train.rounds=40", "threads=1"],
    "paper": [],
}


def scaled_config(scale: str, extra: list[str] | None = None):
    return load_config(ROOT / "examples" / "fmnist-shard2-50.yaml", SCALES[scale] + (extra or []))


def project(scale: str, sessions: int) -> dict:
    """Time one round of ``sessions`` clients per algorithm and project the whole run; the same
    sessions run again under ``engine_throughput.DispatchFlopCounter`` (FLOPs at the dispatcher)
    give the work per session and the achieved GFLOP/s."""
    out = {}
    for name in ALGORITHMS:
        cfg = scaled_config(scale, [f"train.algorithm={name}"])
        engine = LocalEngine(cfg)
        t0 = time.perf_counter()
        for i in range(sessions):
            engine.run_session(i, 1)
        per_session = (time.perf_counter() - t0) / sessions
        with DispatchFlopCounter() as flops:  # outside the timing: counting slows the ops down
            for i in range(sessions):  # a session reads the global models and changes nothing
                engine.run_session(i, 1)
        gflop = flops.total / sessions / 1e9
        round_s = per_session * cfg.fleet.num_clients
        out[name] = {"session_s": round(per_session, 3), "session_gflop": round(gflop, 1),
                     "gflops": round(gflop / per_session, 1), "round_s": round(round_s, 1),
                     "run_h": round(round_s * cfg.train.rounds / 3600, 2)}
        print(f"{name}: {per_session:.2f} s/session ({gflop:.1f} GFLOP, {gflop / per_session:.0f} GFLOP/s), "
              f"{round_s / 60:.1f} min/round, {out[name]['run_h']:.1f} h for {cfg.train.rounds} rounds (one seed)",
              file=sys.stderr)
    total = sum(v["run_h"] for v in out.values())
    return {"bench": "reproduce_fmnist_projection", "scale": scale, "algorithms": out,
            "total_h_per_seed": round(total, 2), "threads": torch.get_num_threads()}


def paired_vs(doc: dict, reference: str = "harmony") -> dict[str, dict[str, list[float]]]:
    """``reference`` minus every other row, per ρ, paired by seed (``harmony.stats.paired_difference``);
    empty without the reference row or with a single seed."""
    rows = {r["algorithm"]: r for r in doc["rows"]}
    if reference not in rows or len(doc["seeds"]) < 2:
        return {}
    out = {}
    for name, row in rows.items():
        if name != reference:
            diffs = paired_difference(rows[reference]["accuracy_per_seed"], row["accuracy_per_seed"])
            out[name] = {"mean": [m for m, _ in diffs], "ci95": [c for _, c in diffs]}
    return out



def _flat(doc: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def keep_rows(doc: dict, cfg, names: list[str], source: Path) -> dict[str, dict]:
    """Add to ``doc`` the rows of ``names`` from the finished runs of an earlier sweep in ``source``
    (``source/<algorithm>/seed<s>/results.json`` for the document's seeds), unchanged — for the
    algorithms that a change of defaults does not touch. Returns, per kept algorithm, where its
    runs came from and every config key whose value differs from what this sweep would run
    (keys the earlier code did not have included), so that the table says what it mixes."""
    kept = {}
    for name in names:
        evaluations, differences = [], set()
        wanted = _flat(json.loads(json.dumps(cfg.with_overrides(**{"train.algorithm": name}).model_dump())))
        for seed in doc["seeds"]:
            path = source / run_slug(name) / f"seed{seed}" / "results.json"
            if not path.is_file():
                raise SystemExit(f"--keep-from: {path} is missing (seeds {doc['seeds']} of {name!r} are needed)")
            run = json.loads(path.read_text())
            evaluations.append(run["evaluation"])
            old = _flat(run["config"])
            differences |= {k for k in set(old) | set(wanted) if k != "seed" and old.get(k, "<absent>")
                            != wanted.get(k, "<absent>")}
        doc["rows"].append(_row(name, evaluations))
        kept[name] = {"source": str(source), "config_differences": sorted(differences)}
    return kept

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--project", action="store_true", help="time one round and project instead of running")
    parser.add_argument("--project-sessions", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each in its own process (threads per run: the scale's, else cores / jobs)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished runs in --out and continue an interrupted one from its checkpoint")
    parser.add_argument("--keep-from", type=Path, default=None,
                        help="an earlier sweep's directory: the rows of --keep are taken from its runs, not re-run")
    parser.add_argument("--keep", default="",
                        help="comma-separated algorithms whose rows come from --keep-from (their config differences "
                             "are listed in compare.json under kept)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: expected 1 or more runs at once")

    if args.project:
        print(json.dumps(project(args.scale, args.project_sessions)))
        return
    cfg = scaled_config(args.scale, args.set)
    out = args.out or ROOT / "runs" / f"reproduce-{args.scale}"
    names = [a for a in args.algorithms.split(",") if a]

    def progress(event: str, **f) -> None:
        if event == "run_start":
            reused = " (finished earlier, reused)" if f.get("reused") else ""
            print(f"[{time.strftime('%H:%M:%S')}] {f['run']}{reused}", file=sys.stderr, flush=True)
        elif event == "run_done":
            print(f"[{time.strftime('%H:%M:%S')}] {f['run']} done", file=sys.stderr, flush=True)
        elif event == "run_failed":
            print(f"[{time.strftime('%H:%M:%S')}] {f['run']} failed: {f['error']}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    doc = compare(cfg, names, args.seeds, out, progress, resume=args.resume, jobs=args.jobs)
    doc["scale"] = args.scale
    doc["jobs"] = args.jobs
    doc["wall_seconds"] = round(time.perf_counter() - t0, 1)  # this invocation (less when --resume reused runs)
    # training time of every run, from the per-round records (they survive an interrupted and resumed run)
    run_dirs = [out / run_slug(name) / f"seed{seed}" for name in names for seed in doc["seeds"]]
    doc["train_seconds"] = round(sum(r["seconds"] for d in run_dirs
                                     for r in json.loads((d / "results.json").read_text())["rounds"]), 1)
    if args.keep:
        if args.keep_from is None:
            parser.error("--keep needs --keep-from DIR")
        if set(args.keep.split(",")) & set(names):
            parser.error(f"--keep {args.keep}: an algorithm is either run (--algorithms) or kept, not both")
        doc["kept"] = keep_rows(doc, cfg, [a for a in args.keep.split(",") if a], args.keep_from)
        for name, k in doc["kept"].items():
            print(f"{name}: kept from {k['source']}; config keys that differ: "
                  f"{', '.join(k['config_differences']) or 'none'}", file=sys.stderr)
    doc["paired_vs_harmony"] = paired_vs(doc)
    (out / "compare.json").write_text(json.dumps(doc, indent=2))
    width = max(len(r["algorithm"]) for r in doc["rows"])
    print(f"{'algorithm':<{width}}  " + "  ".join(f"rho={r:<9g}" for r in doc["rho"]))
    for r in doc["rows"]:
        cells = "  ".join(f"{a:6.2f}±{c:<5.2f}" for a, c in zip(r["accuracy"], r["ci95"], strict=True))
        print(f"{r['algorithm']:<{width}}  {cells}")
    for name, d in doc["paired_vs_harmony"].items():
        cells = "  ".join(f"{m:+6.2f}±{c:<5.2f}" for m, c in zip(d["mean"], d["ci95"], strict=True))
        print(f"harmony − {name:<{width}}  {cells}  (paired by seed)")
    print(f"wall time {doc['wall_seconds'] / 60:.1f} min (training, all runs: {doc['train_seconds'] / 60:.1f} min); "
          f"results in {out}")
    rows = [{k: r[k] for k in ("algorithm", "accuracy", "ci95", "latency_ms")} for r in doc["rows"]]
    print(json.dumps({"rho": doc["rho"], "scale": args.scale, "wall_seconds": doc["wall_seconds"],
                      "train_seconds": doc["train_seconds"], "rows": rows}))


if __name__ == "__main__":
    main()
