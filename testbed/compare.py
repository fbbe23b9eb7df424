"""``harmony compare``: several algorithms × seeds on one config, as the paper's table."""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.probe import host_cores
from harmony.config import ExperimentConfig, training_view
from harmony.engine import LocalEngine
from harmony.stats import mean_ci95

ProgressFn = Callable[..., None]


@dataclass(frozen=True, eq=False)  # keyed by identity: the config is not hashable
class _Run:
    algorithm: str
    seed: int
    cfg: ExperimentConfig
    run_dir: Path | None

    @property
    def label(self) -> str:
        return f"{self.algorithm} seed {self.seed}"


def compare(
    cfg: ExperimentConfig,
    algorithms: list[str],
    seeds: int,
    out_dir: Path | None = None,
    progress: ProgressFn | None = None,
    resume: bool = False,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run every (algorithm, seed) with seeds ``cfg.seed … cfg.seed+seeds−1``; return the
    ``compare.json`` document ``{"rho": [...], "rows": [{"algorithm", "accuracy", "ci95",
    "latency_ms", ...}]}`` and write it (with each run's results) under ``out_dir``.

    ``resume`` (needs ``out_dir``): a run whose ``results.json`` is there is reused, one with only
    a checkpoint continues from its last finished round, the others run; a run directory written
    by a different config is an error (nothing is overwritten). A long sweep that was interrupted
    therefore costs at most the rounds since its last checkpoint.

    ``jobs`` > 1 (needs ``out_dir``) runs that many runs at once, each in its own process. A run's
    bits depend on its torch thread count, so each run's config carries it: ``cfg.threads`` if set,
    else the cores this process may use divided by ``jobs`` (at least 1). With the same ``threads``, every run
    gives the same result whatever ``jobs`` is. ``progress`` events carry ``run`` ("ALGO seed N"):
    ``run_start``, the engine's round events, then ``run_done`` or ``run_failed``."""
    if resume and out_dir is None:
        raise ValueError("compare(resume=True) needs an output directory (--out) to resume from")
    if jobs < 1:
        raise ValueError(f"--jobs {jobs}: expected 1 or more runs at once")
    if jobs > 1 and out_dir is None:
        raise ValueError("compare(jobs > 1) needs an output directory (--out): parallel runs hand results back "
                         "through their run directories")
    if jobs > 1 and cfg.threads is None:
        cfg = cfg.with_overrides(threads=max(1, host_cores() // jobs))
    runs = [
        _Run(name, cfg.seed + s, cfg.with_overrides(**{"train.algorithm": name, "seed": cfg.seed + s}),
             None if out_dir is None else out_dir / run_slug(name) / f"seed{cfg.seed + s}")
        for name in algorithms for s in range(seeds)
    ]
    emit = progress or (lambda event, **f: None)
    evaluations: dict[_Run, dict[str, Any]] = {}
    for run in runs:  # every finished run is checked (and a foreign directory refused) before any work
        finished = _finished_run(run.run_dir, run.cfg) if resume and run.run_dir is not None else None
        if finished is not None:
            evaluations[run] = finished
    pending = [run for run in runs if run not in evaluations]
    if jobs > 1 and len(pending) > 1:
        for run in runs:
            if run in evaluations:
                emit("run_start", run=run.label, algorithm=run.algorithm, seed=run.seed, reused=True)
        evaluations.update(_execute_parallel(pending, resume, jobs, emit))
    else:
        for run in runs:
            emit("run_start", run=run.label, algorithm=run.algorithm, seed=run.seed, reused=run in evaluations)
            if run not in evaluations:
                evaluations[run] = _execute(run, resume,
                                            lambda event, _r=run, **f: emit(event, run=_r.label, **f))
                emit("run_done", run=run.label, algorithm=run.algorithm, seed=run.seed)
    rows = [_row(name, [evaluations[r] for r in runs if r.algorithm == name]) for name in algorithms]
    doc = {"rho": list(cfg.data.rhos), "seeds": [cfg.seed + s for s in range(seeds)], "rows": rows}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.json").write_text(json.dumps(doc, indent=2))
    return doc


def _execute(run: _Run, resume: bool, progress: ProgressFn) -> dict[str, Any]:
    engine = LocalEngine(run.cfg, run.run_dir, progress)
    checkpoint = engine.checkpoint_path()
    return engine.run(resume=resume and checkpoint is not None and checkpoint.is_file())["evaluation"]


_events: Any = None  # the parent's event queue, in a worker process


def _init_worker(events: Any) -> None:
    global _events
    _events = events


def _execute_in_worker(run: _Run, resume: bool) -> dict[str, Any]:
    def forward(event: str, **f: Any) -> None:
        _events.put((event, {"run": run.label, **f}))

    forward("run_start", algorithm=run.algorithm, seed=run.seed, reused=False)
    try:
        evaluation = _execute(run, resume, forward)
    except Exception as err:
        forward("run_failed", algorithm=run.algorithm, seed=run.seed, error=str(err))
        raise
    forward("run_done", algorithm=run.algorithm, seed=run.seed)  # the run's last event, in its order
    return evaluation


def _execute_parallel(runs: list[_Run], resume: bool, jobs: int, emit: ProgressFn) -> dict[_Run, dict[str, Any]]:
    """Each run in a process of a ``jobs``-wide pool (spawned: a forked torch is not safe), handed
    one run at a time so that nothing is queued behind a failure; the workers' progress events,
    ``run_done`` / ``run_failed`` included, reach ``emit`` in this process from one thread, in
    each run's order. The first run that fails stops new runs from
    starting and is raised once the running ones have ended (their results are kept, so
    ``resume`` reuses them)."""
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()

    def relay() -> None:
        while (item := events.get()) is not None:
            emit(item[0], **item[1])

    relay_thread = threading.Thread(target=relay, name="compare-progress", daemon=True)
    relay_thread.start()
    results: dict[_Run, dict[str, Any]] = {}
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(events,))
    try:
        waiting = list(reversed(runs))
        running: dict[Future, _Run] = {}
        failure: BaseException | None = None
        while running or (waiting and failure is None):
            while waiting and failure is None and len(running) < jobs:
                run = waiting.pop()
                running[pool.submit(_execute_in_worker, run, resume)] = run
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                if future.exception() is not None:
                    failure = failure or future.exception()
                else:
                    results[run] = future.result()
        if failure is not None:
            raise failure
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        events.put(None)
        relay_thread.join()
        events.close()


def _finished_run(run_dir: Path, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The evaluation in ``run_dir/results.json`` if that run is finished with exactly ``cfg``
    (``None`` when only evaluation-only keys differ: the run is then evaluated again)."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    wanted = json.loads(json.dumps(cfg.model_dump()))
    if doc.get("config") != wanted:
        if training_view(doc.get("config") or {}) == training_view(wanted):
            return None  # only evaluation settings changed: its checkpoint is evaluated again
        raise ValueError(f"--resume: {path} was written by a different config; use a fresh --out directory")
    return doc["evaluation"]


def _row(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def summary(key: str) -> tuple[list[float], list[float]]:
        stats = [mean_ci95([r[key][k] for r in runs]) for k in range(len(runs[0]["rho"]))]
        return [m for m, _ in stats], [c for _, c in stats]

    acc, ci = summary("accuracy")
    lat, lat_ci = summary("latency_ms")
    fixed, fixed_ci = summary("accuracy_fixed_tau")
    offload, _ = summary("offload_probability")
    measured, _ = summary("measured_latency_ms")
    return {
        "algorithm": name, "accuracy": acc, "ci95": ci, "latency_ms": lat, "latency_ci95": lat_ci,
        "accuracy_fixed_tau": fixed, "accuracy_fixed_tau_ci95": fixed_ci,
        "offload_probability": offload, "measured_latency_ms": measured,
        "accuracy_per_seed": [list(r["accuracy"]) for r in runs],  # seeds in the document's order
        "tau_policy": runs[0].get("tau_policy", "oracle"),
        "policies": _policies(runs),
    }


def _policies(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per τ policy that every run evaluated: accuracy (mean, 95 % CI over seeds, per seed) and
    offload probability (mean) per ρ. Runs from before τ policies existed contribute none."""
    names = [n for n in runs[0].get("policies", {}) if all(n in r.get("policies", {}) for r in runs)]
    out = {}
    for n in names:
        stats = [mean_ci95([r["policies"][n]["accuracy"][k] for r in runs]) for k in range(len(runs[0]["rho"]))]
        offload = [mean_ci95([r["policies"][n]["offload_probability"][k] for r in runs])[0]
                   for k in range(len(runs[0]["rho"]))]
        out[n] = {"accuracy": [m for m, _ in stats], "ci95": [c for _, c in stats], "offload_probability": offload,
                  "accuracy_per_seed": [list(r["policies"][n]["accuracy"]) for r in runs]}
    return out


def run_slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-+.=" else "_" for c in name)
