"""``harmony report``: plots from a ``harmony compare`` output directory.

- ``accuracy_vs_rho.png``: accuracy (oracle τ, ±95% CI) against the OOD ratio ρ per algorithm;
- ``accuracy_latency.png``: the accuracy–modelled-latency trade-off, one point per (algorithm, ρ);
- ``tsne_server.png``: t-SNE of the server's pre-head representation ``φ_d(f_i(x))`` of every
  client's test queries, coloured by class, one panel per algorithm (HARMONY beside SplitGP by
  default), from the trained weights in each run's ``checkpoint.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from testbed.compare import run_slug


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_rho(doc: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in doc["rows"]:
        acc, ci = np.array(row["accuracy"]), np.array(row["ci95"])
        ax.plot(doc["rho"], acc, marker="o", label=row["algorithm"])
        ax.fill_between(doc["rho"], acc - ci, acc + ci, alpha=0.15)
    ax.set_xlabel("OOD ratio ρ (share of test queries from classes absent in training)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_accuracy_latency(doc: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in doc["rows"]:
        ax.plot(row["latency_ms"], row["accuracy"], marker="o", label=row["algorithm"])
        for rho, x, y in zip(doc["rho"], row["latency_ms"], row["accuracy"], strict=True):
            ax.annotate(f"{rho:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("modelled latency per sample (ms, eq. 12)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy–latency trade-off (labels: ρ)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


@torch.no_grad()
def server_embeddings(run_dir: Path, rho: float, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """``φ_{d_i}(f_i(x))`` for every client's test queries at ``rho``, from a finished run."""
    from harmony.config import validate_config
    from harmony.engine import LocalEngine
    from harmony.fleet import InProcessFleet

    results = json.loads((run_dir / "results.json").read_text())
    cfg = validate_config(results["config"])
    engine = LocalEngine(cfg, run_dir)
    engine.resume()
    fleet = engine.fleet
    assert isinstance(fleet, InProcessFleet)
    server = fleet.server_model
    server.load_state_dict(engine.server_global)
    server.eval()
    feats, labels = [], []
    for i in range(cfg.fleet.num_clients):
        device = fleet.devices[i]
        model = device.new_model()
        model.load_state_dict(engine.client_start_state(i))
        device.personalise(model)
        model.eval()
        d = device.data
        n_id, n_ood = d.share.test.counts(rho)
        rows = torch.as_tensor(np.concatenate([d.test_id_rows[:n_id], d.test_ood_rows[:n_ood]]))
        x = d.test_x[rows]
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z = model.features(x).half().float()
        feats.append(server.embed(z, model.depth).flatten(1).cpu())
        labels.append(d.test_y[rows].cpu())
    x_all, y_all = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    if len(x_all) > max_points:
        keep = np.random.default_rng(0).choice(len(x_all), max_points, replace=False)
        x_all, y_all = x_all[keep], y_all[keep]
    return x_all, y_all


def plot_tsne(panels: list[tuple[str, Path]], path: Path, rho: float = 0.8, max_points: int = 1500) -> Path:
    from sklearn.manifold import TSNE

    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (name, run_dir) in zip(axes[0], panels, strict=True):
        x, y = server_embeddings(run_dir, rho, max_points)
        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=30).fit_transform(x)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", s=4, vmin=0, vmax=9)
        ax.set_title(f"{name}: server pre-head φ (ρ={rho:g})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes[0].tolist(), label="class", ticks=range(10))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_report(compare_dir: Path, tsne: list[str] | None = None, rho: float = 0.8) -> list[Path]:
    """All plots for a compare directory; t-SNE panels for the named algorithms that ran."""
    doc = json.loads((compare_dir / "compare.json").read_text())
    written = [
        plot_accuracy_vs_rho(doc, compare_dir / "accuracy_vs_rho.png"),
        plot_accuracy_latency(doc, compare_dir / "accuracy_latency.png"),
    ]
    ran = [r["algorithm"] for r in doc["rows"]]
    wanted = tsne if tsne is not None else [a for a in ("harmony", "splitgp(lambda=0.2)", "splitgp(lambda=1)")
                                            if a in ran][:2]
    seed = doc.get("seeds", [0])[0]
    panels = []
    for name in wanted:
        run_dir = compare_dir / run_slug(name) / f"seed{seed}"
        if not (run_dir / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"t-SNE for {name!r}: no checkpoint in {run_dir}; rerun `harmony compare` "
                                    f"with --out {compare_dir}")
        panels.append((name, run_dir))
    if panels:
        written.append(plot_tsne(panels, compare_dir / "tsne_server.png", rho))
    return written

