"""``harmony compare``: several algorithms × seeds on one config, as the paper's table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harmony.config import ExperimentConfig
from harmony.engine import LocalEngine
from harmony.stats import mean_ci95


def compare(
    cfg: ExperimentConfig,
    algorithms: list[str],
    seeds: int,
    out_dir: Path | None = None,
    progress: Callable[..., None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every (algorithm, seed) with seeds ``cfg.seed … cfg.seed+seeds−1``; return the
    ``compare.json`` document ``{"rho": [...], "rows": [{"algorithm", "accuracy", "ci95",
    "latency_ms", ...}]}`` and write it (with each run's results) under ``out_dir``.

    ``resume`` (needs ``out_dir``): a run whose ``results.json`` is there is reused, one with only
    a checkpoint continues from its last finished round, the others run; a run directory written
    by a different config is an error (nothing is overwritten). A long sweep that was interrupted
    therefore costs at most the rounds since its last checkpoint."""
    if resume and out_dir is None:
        raise ValueError("compare(resume=True) needs an output directory (--out) to resume from")
    rows = []
    for name in algorithms:
        runs = []
        for s in range(seeds):
            run_cfg = cfg.with_overrides(**{"train.algorithm": name, "seed": cfg.seed + s})
            run_dir = None if out_dir is None else out_dir / run_slug(name) / f"seed{cfg.seed + s}"
            finished = _finished_run(run_dir, run_cfg) if resume and run_dir is not None else None
            if progress:
                progress("run_start", algorithm=name, seed=cfg.seed + s, reused=finished is not None)
            if finished is not None:
                runs.append(finished)
                continue
            engine = LocalEngine(run_cfg, run_dir, progress)
            checkpoint = engine.checkpoint_path()
            runs.append(engine.run(resume=resume and checkpoint is not None and checkpoint.is_file())["evaluation"])
        rows.append(_row(name, runs))
    doc = {"rho": list(cfg.data.rhos), "seeds": [cfg.seed + s for s in range(seeds)], "rows": rows}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.json").write_text(json.dumps(doc, indent=2))
    return doc


def _finished_run(run_dir: Path, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The evaluation in ``run_dir/results.json`` if that run is finished with exactly ``cfg``."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("config") != json.loads(json.dumps(cfg.model_dump())):
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
    }


def run_slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-+.=" else "_" for c in name)
