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
) -> dict[str, Any]:
    """Run every (algorithm, seed) with seeds ``cfg.seed … cfg.seed+seeds−1``; return the
    ``compare.json`` document ``{"rho": [...], "rows": [{"algorithm", "accuracy", "ci95",
    "latency_ms", ...}]}`` and write it (with each run's results) under ``out_dir``."""
    rows = []
    for name in algorithms:
        runs = []
        for s in range(seeds):
            run_cfg = cfg.with_overrides(**{"train.algorithm": name, "seed": cfg.seed + s})
            run_dir = None if out_dir is None else out_dir / _slug(name) / f"seed{cfg.seed + s}"
            if progress:
                progress("run_start", algorithm=name, seed=cfg.seed + s)
            engine = LocalEngine(run_cfg, run_dir, progress)
            runs.append(engine.run()["evaluation"])
        rows.append(_row(name, runs))
    doc = {"rho": list(cfg.data.rhos), "seeds": [cfg.seed + s for s in range(seeds)], "rows": rows}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.json").write_text(json.dumps(doc, indent=2))
    return doc


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
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-+.=" else "_" for c in name)
