"""``harmony report RUN_DIR``: PNG plots and a ``report.html`` that shows them, for a ``harmony compare``
output directory (``compare.json`` and a directory per run) or a single ``harmony run`` directory
(``results.json``, and ``events.jsonl`` where the run wrote one). docs/reporting.md says how to read
each plot.

The PNGs lie beside ``report.html``, which names them by relative path (the directory can be copied
or served as a whole). A plot whose data the directory lacks is not drawn: the page says why instead.

- ``accuracy_vs_rho.png``: accuracy (oracle τ, ±95% CI over seeds) against the OOD ratio ρ;
- ``accuracy_latency.png``: accuracy against modelled latency, colour per algorithm, marker per ρ;
- ``tsne_server.png``: t-SNE of the server's pre-head representation ``φ_d(f_i(x))`` of every
  client's test queries, coloured by class, one panel per algorithm (from ``checkpoint.pt``);
- ``split_depths.png``: how many devices train at each split depth (by device class, or algorithm);
- ``device_latency.png``: per device, modelled latency and the latency measured on this host;
- ``round_accuracy.png``: train accuracy of the exit and server heads per round (and periodic evaluations);
- ``session_timeline.png``: each device's sessions on the run's wall clock, round by round, with
  stragglers and dropouts marked (from ``events.jsonl``).
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from testbed.compare import run_slug

log = logging.getLogger(__name__)

REPORT = "report.html"
RHO_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]
SESSION_EVENTS = {"session_done": "done", "session_late": "late", "session_dropped": "dropped"}
OUTCOME_STYLE = {"done": ("#4878d0", "session done"), "late": ("#ee854a", "late (straggler, left out)"),
                 "dropped": ("#d65f5f", "dropped (vanished mid-session)")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, extra: list[Any] | None = None) -> Path:
    """Write ``fig`` as a PNG, trimmed to what it draws (legends outside the axes included)."""
    fig.savefig(path, dpi=130, bbox_inches="tight", bbox_extra_artists=extra)
    _plt().close(fig)
    return path


def _finite(values: list[Any]) -> bool:
    return bool(values) and all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _nearest(rhos: list[float], rho: float) -> int:
    return int(np.argmin([abs(r - rho) for r in rhos]))


# ------------------------------------------------------------------------------ comparison plots
def plot_accuracy_vs_rho(doc: dict[str, Any], path: Path) -> Path:
    """``doc``: a compare.json document (a single run passes one row, with its fixed-τ accuracy as a second)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in doc["rows"]:
        acc, ci = np.array(row["accuracy"]), np.array(row.get("ci95") or [0.0] * len(row["accuracy"]))
        ax.plot(doc["rho"], acc, marker="o", label=row["algorithm"], linestyle=row.get("linestyle", "-"))
        if ci.any():
            ax.fill_between(doc["rho"], acc - ci, acc + ci, alpha=0.15)
    ax.set_xlabel("OOD ratio ρ (share of test queries from classes absent in training)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_latency(doc: dict[str, Any], path: Path) -> Path:
    """One line per algorithm (colour); the ρ of each point is its marker shape (second legend), so
    no text labels overlap where the algorithms' points crowd together."""
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.4, 4.4))
    rhos = doc["rho"]
    markers = [RHO_MARKERS[k % len(RHO_MARKERS)] for k in range(len(rhos))]
    algorithms = []
    for row in doc["rows"]:
        (line,) = ax.plot(row["latency_ms"], row["accuracy"], color=None, linewidth=1.2, alpha=0.8)
        colour = line.get_color()
        for marker, x, y in zip(markers, row["latency_ms"], row["accuracy"], strict=True):
            ax.plot([x], [y], marker=marker, color=colour, markersize=7, markeredgecolor="black",
                    markeredgewidth=0.5, linestyle="none")
        algorithms.append(Line2D([], [], color=colour, linewidth=2, label=row["algorithm"]))
    shapes = [Line2D([], [], marker=m, color="grey", markeredgecolor="black", markeredgewidth=0.5,
                     linestyle="none", markersize=7, label=f"ρ = {r:g}") for m, r in zip(markers, rhos, strict=True)]
    first = ax.legend(handles=algorithms, fontsize=8, title="algorithm", title_fontsize=8,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(handles=shapes, fontsize=8, title="OOD ratio", title_fontsize=8, loc="lower left",
              bbox_to_anchor=(1.01, 0.0))
    ax.set_xlabel("modelled latency per sample (ms, eq. 12)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy–latency trade-off (up and left is better)", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path, [first])


def server_embeddings(run_dir: Path, rho: float, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """``φ_{d_i}(f_i(x))`` for every client's test queries at ``rho``, from a finished run."""
    from harmony.config import validate_config
    from harmony.engine import LocalEngine
    from harmony.fleet import InProcessFleet

    results = json.loads((run_dir / "results.json").read_text())
    cfg = validate_config(results["config"])
    engine = LocalEngine(cfg, run_dir)
    engine.resume()
    assert isinstance(engine.fleet, InProcessFleet)
    # on the fleet's torch thread: personalised exactly as the run's own evaluation was
    x_all, y_all = engine.fleet.torch.call(_embeddings, engine, cfg, rho)
    if len(x_all) > max_points:
        keep = np.random.default_rng(0).choice(len(x_all), max_points, replace=False)
        x_all, y_all = x_all[keep], y_all[keep]
    return x_all, y_all


@torch.no_grad()
def _embeddings(engine: Any, cfg: Any, rho: float) -> tuple[np.ndarray, np.ndarray]:
    fleet = engine.fleet
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
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def plot_tsne(panels: list[tuple[str, Path]], path: Path, rho: float = 0.8, max_points: int = 1500) -> Path:
    from sklearn.manifold import TSNE

    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (name, run_dir) in zip(axes[0], panels, strict=True):
        x, y = server_embeddings(run_dir, rho, max_points)
        perplexity = min(30.0, max(2.0, (len(x) - 1) / 3))
        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=perplexity).fit_transform(x)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", s=4, vmin=0, vmax=9)
        ax.set_title(f"{name}: server pre-head φ (ρ={rho:g})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes[0].tolist(), label="class", ticks=range(10))
    return _save(fig, path)


# ------------------------------------------------------------------------------ per-run plots
def _client_labels(results: dict[str, Any]) -> list[str]:
    fleet = results.get("fleet") or {}
    depths = fleet.get("split_depths") or []
    profiles = fleet.get("profiles") or [None] * len(depths)
    return [f"{i} · {p or 'device'} · d{d}" for i, (d, p) in enumerate(zip(depths, profiles, strict=False))]


def plot_split_depths(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    """``runs``: label → results.json. One run: a bar per depth, stacked by device class; several:
    a group of bars per depth, one bar per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    depth_lists = {label: list(r["fleet"]["split_depths"]) for label, r in runs.items()}
    depths = sorted({d for ds in depth_lists.values() for d in ds})
    x = np.arange(len(depths))
    fleets = [(tuple(r["fleet"]["split_depths"]), tuple(r["fleet"].get("profiles") or ())) for r in runs.values()]
    if len(set(fleets)) == 1:  # one fleet (one run, or a comparison whose algorithms share the depths)
        results = next(iter(runs.values()))
        own = depth_lists[next(iter(runs))]
        if len(runs) > 1:
            ax.set_title(f"the same for all {len(runs)} algorithms", fontsize=9)
        profiles = results["fleet"].get("profiles") or ["device"] * len(own)
        bottom = np.zeros(len(depths))
        for cls in sorted(set(profiles)):
            counts = np.array([sum(1 for d, p in zip(own, profiles, strict=True) if d == depth and p == cls)
                               for depth in depths])
            ax.bar(x, counts, bottom=bottom, label=cls, width=0.6)
            bottom += counts
        ax.legend(fontsize=8, title="device class", title_fontsize=8)
    else:
        width = 0.8 / len(runs)
        for k, (label, ds) in enumerate(depth_lists.items()):
            ax.bar(x - 0.4 + width * (k + 0.5), [ds.count(d) for d in depths], width=width, label=label)
        ax.legend(fontsize=8)
    ax.set_xticks(x, [str(d) for d in depths])
    ax.set_xlabel("split depth (blocks trained on the device)")
    ax.set_ylabel("devices")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def device_latency_rows(results: dict[str, Any], rho: float) -> tuple[float, list[str], list[float], list[float]]:
    """(the ρ used, device labels, modelled ms, measured ms (NaN where not measured)) per client."""
    ev = results["evaluation"]
    k = _nearest(ev["rho"], rho)
    labels = _client_labels(results)
    modelled, measured = [], []
    for c in ev["per_client"]:
        row = c["rho"][k]
        modelled.append(float(row["latency_ms"]))
        value = row.get("measured_latency_ms")
        measured.append(float(value) if isinstance(value, int | float) else float("nan"))
    if len(labels) != len(modelled):
        labels = [str(c["client"]) for c in ev["per_client"]]
    return float(ev["rho"][k]), labels, modelled, measured


def plot_device_latency(results: dict[str, Any], path: Path, rho: float = 0.8) -> Path:
    plt = _plt()
    used, labels, modelled, measured = device_latency_rows(results, rho)
    has_measured = any(math.isfinite(v) for v in measured)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(labels) + 2.5), 4.2))
    x = np.arange(len(labels))
    width = 0.4 if has_measured else 0.6
    ax.bar(x - (width / 2 if has_measured else 0), modelled, width=width,
           label="modelled (the device's class: compute, uplink, server; eq. 12)")
    if has_measured:
        ax.bar(x + width / 2, np.nan_to_num(measured, nan=0.0), width=width,
               label="measured on the evaluating host (batch 1, no network)")
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    ax.set_xlabel("device (client · class · split depth)")
    shown = [v for v in modelled + measured if math.isfinite(v) and v > 0]
    log_scale = bool(shown) and max(shown) / min(shown) > 20  # a slow class or a noisy host: keep every bar visible
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylabel(f"latency per sample at ρ={used:g} (ms{', log scale' if log_scale else ''})")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.01), frameon=False)  # above: no bar hidden
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_round_accuracy(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    """Train accuracy (%) of the server head (solid) and the exit head (dashed) per round, one colour
    per run; periodic evaluations (``eval.eval_every``) of a single run as dotted lines per ρ."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    single = len(runs) == 1
    for label, results in runs.items():
        rounds = results["rounds"]
        x = [r["round"] for r in rounds]
        (line,) = ax.plot(x, [100 * r["train_acc_server"] for r in rounds], marker="o", markersize=3,
                          label="server head (train)" if single else f"{label}: server head")
        if any(r["train_acc_exit"] or r["train_loss_exit"] for r in rounds):  # SplitFed trains no exit head
            ax.plot(x, [100 * r["train_acc_exit"] for r in rounds], marker="s", markersize=3, linestyle="--",
                    color=None if single else line.get_color(),
                    label="exit head (train)" if single else f"{label}: exit head")
        if single:
            evals = [(r["round"], r["eval_accuracy"]) for r in rounds if r.get("eval_accuracy")]
            rhos = results.get("evaluation", {}).get("rho") or []
            for k, rho in enumerate(rhos):
                pts = [(rnd, acc[k]) for rnd, acc in evals if k < len(acc)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), linestyle=":", marker="^", markersize=4,
                            label=f"evaluation, ρ={rho:g} (test, global model)")
        gaps = [r["round"] for r in rounds if r.get("stragglers") or r.get("dropouts")]
        if single and gaps:
            ymin = ax.get_ylim()[0]
            ax.plot(gaps, [ymin] * len(gaps), linestyle="none", marker="|", markersize=12, color="#d65f5f",
                    label="round with stragglers / dropouts")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    every = sorted({r["round"] for results in runs.values() for r in results["rounds"]})
    if len(every) <= 20:
        ax.set_xticks(every)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


# ------------------------------------------------------------------------------ session timeline
@dataclass(frozen=True)
class SessionBar:
    """One session of a device on the run's wall clock (unix seconds)."""

    round: int
    attempt: int
    device: str
    start: float
    end: float
    outcome: str  # done | late | dropped
    measured: bool  # the event gave the session's seconds (else it is drawn from the round's start)


@dataclass(frozen=True)
class RoundSpan:
    round: int
    attempt: int
    start: float
    end: float | None
    deadline_s: float | None


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of ``events.jsonl`` (one JSON object per line); a line that is not one (a torn
    last line of a run still writing, say) is skipped with a warning."""
    events = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not a JSON object, skipped", path, n)
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value) else None


def _whole(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


def session_timeline(events: list[dict[str, Any]]) -> tuple[list[SessionBar], list[RoundSpan]]:
    """The sessions and round spans in ``events`` (``harmony run``'s events.jsonl, docs/reporting.md).
    A session ends at its event's ``t`` and starts ``train_s`` (else ``seconds``) before; without either
    it is drawn from its round's start. Unknown events and events missing ``t``/``round``/``device`` are ignored."""
    bars: list[SessionBar] = []
    spans: dict[tuple[int, int], RoundSpan] = {}
    attempt_of: dict[int, int] = {}
    for e in events:
        t, name = _number(e.get("t")), e.get("event")
        if t is None:
            continue
        if name == "round_start":
            rnd = _whole(e.get("round"))
            if rnd is None:
                continue
            attempt = _whole(e.get("attempt")) or 1
            attempt_of[rnd] = attempt
            spans[(rnd, attempt)] = RoundSpan(rnd, attempt, t, None, _number(e.get("deadline_s")))
        elif name == "round_end":
            record = e.get("record") if isinstance(e.get("record"), dict) else {}
            rnd = _whole(record.get("round", e.get("round")))
            if rnd is None or (rnd, attempt_of.get(rnd, 1)) not in spans:
                continue
            key = (rnd, attempt_of.get(rnd, 1))
            deadline = _number(record.get("deadline_s"))
            spans[key] = RoundSpan(rnd, key[1], spans[key].start, t,
                                   deadline if deadline is not None else spans[key].deadline_s)
        elif name in SESSION_EVENTS:
            rnd, device = _whole(e.get("round")), e.get("device")
            if rnd is None or device is None or isinstance(device, dict | list):
                continue
            attempt = attempt_of.get(rnd, 1)
            seconds = _number(e.get("train_s", e.get("seconds")))  # what the device trained, without its queueing
            span = spans.get((rnd, attempt))
            start = t - seconds if seconds is not None else (span.start if span is not None else t)
            bars.append(SessionBar(rnd, attempt, str(device), start, t, SESSION_EVENTS[name], seconds is not None))
    # a try that was retried ends where the next one starts
    ordered = sorted(spans.values(), key=lambda s: s.start)
    for span, after in zip(ordered, ordered[1:], strict=False):
        if span.end is None:
            spans[(span.round, span.attempt)] = RoundSpan(span.round, span.attempt, span.start, after.start,
                                                          span.deadline_s)
    return bars, sorted(spans.values(), key=lambda s: s.start)


def _device_order(devices: set[str]) -> list[str]:
    return sorted(devices, key=lambda d: (0, int(d), "") if d.lstrip("-").isdigit() else (1, 0, d))


def plot_session_timeline(bars: list[SessionBar], spans: list[RoundSpan], path: Path,
                          device_labels: dict[str, str] | None = None) -> Path:
    """A row per device, time since the first round's start across; alternating bands are the rounds
    (labelled on top), bars the sessions coloured by outcome, × the moment a device dropped."""
    plt = _plt()
    from matplotlib.patches import Patch

    devices = _device_order({b.device for b in bars})
    row = {d: k for k, d in enumerate(devices)}
    origin = min([b.start for b in bars] + [s.start for s in spans])
    fig, ax = plt.subplots(figsize=(10.0, max(2.6, 0.34 * len(devices) + 1.6)))
    for k, span in enumerate(spans):
        end = span.end if span.end is not None else max([b.end for b in bars if b.round == span.round] or
                                                        [span.start])
        ax.axvspan(span.start - origin, end - origin, color="#000000", alpha=0.05 if k % 2 else 0.0, lw=0)
        ax.axvline(span.start - origin, color="#888888", linewidth=0.6)
        label = f"r{span.round}" + (f"·{span.attempt}" if span.attempt > 1 else "")
        ax.text((span.start + end) / 2 - origin, 1.0, label, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=7, color="#444444", clip_on=False)
        if span.deadline_s is not None:
            ax.axvline(span.start + span.deadline_s - origin, color="#d65f5f", linewidth=0.8, linestyle="--")
    for b in bars:
        colour = OUTCOME_STYLE[b.outcome][0]
        ax.barh(row[b.device], max(b.end - b.start, 1e-3), left=b.start - origin, height=0.6, color=colour,
                alpha=0.9 if b.measured else 0.45, hatch=None if b.measured else "//", edgecolor="white",
                linewidth=0.3)
        if b.outcome == "dropped":
            ax.plot(b.end - origin, row[b.device], marker="x", color="black", markersize=7, mew=1.6)
    labels = device_labels or {}
    ax.set_yticks(range(len(devices)), [labels.get(d, d) for d in devices], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first round started")
    ax.set_ylabel("device")
    handles = [Patch(color=c, label=text) for c, text in OUTCOME_STYLE.values()]
    if any(not b.measured for b in bars):
        handles.append(Patch(facecolor="#bbbbbb", hatch="//", edgecolor="white",
                             label="no duration in the event: from the round's start"))
    if any(s.deadline_s is not None for s in spans):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="#d65f5f", linestyle="--", label="round deadline"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


# ------------------------------------------------------------------------------ the page
@dataclass
class Section:
    """One plot of the page: its image, or why there is none."""

    title: str
    about: str
    image: str | None = None
    skipped: str | None = None


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
.about {{ color: #555; }} .skipped {{ color: #8a5a00; background: #fff6e0; padding: 0.5em; }}
.meta {{ color: #555; font-size: 0.9em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="meta">{meta}</p>
{summary}
{sections}
<p class="meta">Written by <code>harmony report</code>; what each plot shows: docs/reporting.md.</p>
</body>
</html>
"""


def _device_table(results: dict[str, Any]) -> str:
    """Per client: its device, class, depth and the compute rate and uplink its modelled latency used
    (its ``hello``'s measurement where that decided its depth, else its class's figures)."""
    per_client = (results.get("evaluation") or {}).get("per_client") or []
    if not per_client or "compute_flops" not in per_client[0]:
        return ""
    devices = results.get("devices") or []
    rows = [[str(c["client"]), devices[c["client"]] if c["client"] < len(devices) else "", str(c.get("profile")),
             str(c["split_depth"]), f"{c['compute_flops'] / 1e9:.2f}", f"{c['uplink_bps'] / 1e6:.1f}",
             str(c.get("figures", ""))] for c in per_client]
    return "\n<p>Devices:</p>" + _table(["client", "device", "class", "depth", "compute GFLOP/s", "uplink Mbit/s",
                                         "figures"], rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section_html(s: Section) -> str:
    e = html.escape
    out = [f'<section id="{e(s.title.lower().replace(" ", "-"), quote=True)}"><h2>{e(s.title)}</h2>',
           f'<p class="about">{e(s.about)}</p>']
    if s.image is not None:
        out.append(f'<img src="{e(s.image, quote=True)}" alt="{e(s.title, quote=True)}">')
    else:
        out.append(f'<p class="skipped">Not drawn: {e(s.skipped or "no data")}</p>')
    return "\n".join(out) + "\n</section>"


def _page(title: str, meta: str, summary: str, sections: list[Section]) -> str:
    return PAGE.format(title=html.escape(title), meta=html.escape(meta), summary=summary,
                       sections="\n".join(_section_html(s) for s in sections))


def _draw(sections: list[Section], written: list[Path], out_dir: Path, name: str, title: str, about: str,
          skipped: str | None, draw: Any) -> None:
    """Draw ``name`` with ``draw(path)`` unless ``skipped`` (a reason); a stale PNG of a skipped plot goes."""
    path = out_dir / name
    if skipped is None:
        written.append(draw(path))
        sections.append(Section(title, about, image=name))
    else:
        path.unlink(missing_ok=True)
        sections.append(Section(title, about, skipped=skipped))


ABOUT = {
    "rho": "Test accuracy with each client's oracle τ against the share ρ of test queries from classes the "
           "client never trained on; the band is the 95% confidence interval over seeds.",
    "latency": "Accuracy against the modelled latency per sample; each line is one algorithm (colour), each "
               "point one ρ (marker shape). Up and to the left is better.",
    "tsne": "t-SNE of the server's pre-head representation of every client's test queries, coloured by "
            "class: well-separated clusters mean the server side separates the classes.",
    "depths": "How many devices train at each split depth (blocks on the device; the rest runs on the server).",
    "devices": "Per device, the modelled latency per sample (eq. 12, with the compute and uplink its hello "
               "measured, else its class's) and the "
               "latency measured on the host that evaluated (batch 1, no network).",
    "rounds": "Train accuracy of the exit head (on the device) and the server head per round; dotted: the "
              "periodic test evaluations of eval.eval_every.",
    "timeline": "Each device's training sessions on the run's wall clock, round by round: who was slow, who "
                "was late past the deadline (orange), who dropped (red, ×).",
}


def _timeline(run_dir: Path, results: dict[str, Any] | None) -> tuple[str | None, Any]:
    events_path = run_dir / "events.jsonl"
    if not events_path.is_file():
        return "this run has no events.jsonl (runs of this version write one; older runs did not).", None
    bars, spans = session_timeline(read_events(events_path))
    if not bars:
        return "events.jsonl holds no session events (session_done / session_late / session_dropped).", None
    labels = None
    if results is not None:
        names = _client_labels(results)
        labels = {str(i): name for i, name in enumerate(names)}
    return None, lambda p: plot_session_timeline(bars, spans, p, labels)


def write_run_report(run_dir: Path, rho: float = 0.8, tsne: bool = True, note: str | None = None) -> list[Path]:
    """Plots and report.html for a single ``harmony run`` directory; returns the files written."""
    results = json.loads((run_dir / "results.json").read_text())
    ev = results.get("evaluation") or {}
    name = results.get("algorithm", "run")
    sections: list[Section] = []
    written: list[Path] = []
    rows = [{"algorithm": f"{name} (oracle τ)", "accuracy": ev.get("accuracy") or []}]
    if _finite(ev.get("accuracy_fixed_tau") or []):
        rows.append({"algorithm": f"{name} (fixed τ={ev.get('fixed_tau', 0):g})",
                     "accuracy": ev["accuracy_fixed_tau"], "linestyle": "--"})
    has_eval = bool(ev.get("rho")) and _finite(ev.get("accuracy", []))
    no_eval = None if has_eval else "results.json has no evaluation (the run did not finish its evaluation)."
    _draw(sections, written, run_dir, "accuracy_vs_rho.png", "Accuracy vs ρ", ABOUT["rho"], no_eval,
          lambda p: plot_accuracy_vs_rho({"rho": ev["rho"], "rows": rows}, p))
    _draw(sections, written, run_dir, "accuracy_latency.png", "Accuracy–latency", ABOUT["latency"],
          no_eval or (None if _finite(ev.get("latency_ms", [])) else "results.json has no modelled latency."),
          lambda p: plot_accuracy_latency({"rho": ev["rho"], "rows": [
              {"algorithm": name, "accuracy": ev["accuracy"], "latency_ms": ev["latency_ms"]}]}, p))
    if not tsne:
        why = note or "not drawn for this run."
    elif not (run_dir / "checkpoint.pt").is_file():
        why = "no checkpoint.pt in the run directory (the trained weights are needed)."
    elif results.get("runtime", "local") != "local":
        why = "the checkpoint of a distributed run is not read here; rerun it locally for t-SNE."
    else:
        why = None
    _draw(sections, written, run_dir, "tsne_server.png", "t-SNE of the server representation", ABOUT["tsne"], why,
          lambda p: plot_tsne([(name, run_dir)], p, rho))
    fleet = results.get("fleet") or {}
    _draw(sections, written, run_dir, "split_depths.png", "Split depths", ABOUT["depths"],
          None if fleet.get("split_depths") else "results.json names no split depths.",
          lambda p: plot_split_depths({name: results}, p))
    _draw(sections, written, run_dir, "device_latency.png", "Per-device latency", ABOUT["devices"],
          None if ev.get("per_client") else "results.json has no per-client evaluation.",
          lambda p: plot_device_latency(results, p, rho))
    _draw(sections, written, run_dir, "round_accuracy.png", "Per-round accuracy", ABOUT["rounds"],
          None if results.get("rounds") else "results.json records no rounds.",
          lambda p: plot_round_accuracy({name: results}, p))
    why, draw = _timeline(run_dir, results)
    _draw(sections, written, run_dir, "session_timeline.png", "Session timeline", ABOUT["timeline"], why, draw)
    summary = ""
    if has_eval:
        summary = _table(["metric", *(f"ρ={r:g}" for r in ev["rho"])], [
            ["accuracy % (oracle τ)", *(f"{a:.2f}" for a in ev["accuracy"])],
            *([[f"accuracy % (τ={ev.get('fixed_tau', 0):g})", *(f"{a:.2f}" for a in ev["accuracy_fixed_tau"])]]
              if ev.get("accuracy_fixed_tau") else []),
            *([["offload probability", *(f"{a:.3f}" for a in ev["offload_probability"])]]
              if ev.get("offload_probability") else []),
            *([["modelled latency ms", *(f"{a:.2f}" for a in ev["latency_ms"])]] if ev.get("latency_ms") else []),
        ])
        summary += _device_table(results)
    cfg = results.get("config") or {}
    meta = (f"{name}, seed {results.get('seed')}, {results.get('runtime', 'local')} runtime, "
            f"{len(results.get('rounds') or [])} round(s), {len(fleet.get('split_depths') or [])} clients, "
            f"dataset {(cfg.get('data') or {}).get('dataset', '?')}, {results.get('wall_seconds') or 0:.0f} s wall"
            f"{'; ' + note if note and tsne else ''}")
    page = run_dir / REPORT
    page.write_text(_page(f"harmony report: {results.get('name', run_dir.name)} ({name})", meta, summary, sections))
    return [*written, page]


def _run_dirs(compare_dir: Path, doc: dict[str, Any]) -> dict[str, list[Path]]:
    """algorithm → its run directories (one per seed) that hold a results.json."""
    seeds = doc.get("seeds") or [0]
    return {row["algorithm"]: [d for s in seeds if ((d := compare_dir / run_slug(row["algorithm"]) / f"seed{s}")
                                                    / "results.json").is_file()] for row in doc["rows"]}


def write_compare_report(compare_dir: Path, tsne: list[str] | None = None, rho: float = 0.8) -> list[Path]:
    """Plots and report.html for a compare directory, and a report of each of its runs (linked)."""
    doc = json.loads((compare_dir / "compare.json").read_text())
    sections: list[Section] = []
    written: list[Path] = []
    _draw(sections, written, compare_dir, "accuracy_vs_rho.png", "Accuracy vs ρ", ABOUT["rho"], None,
          lambda p: plot_accuracy_vs_rho(doc, p))
    _draw(sections, written, compare_dir, "accuracy_latency.png", "Accuracy–latency", ABOUT["latency"], None,
          lambda p: plot_accuracy_latency(doc, p))
    ran = [r["algorithm"] for r in doc["rows"]]
    wanted = tsne if tsne is not None else [a for a in ("harmony", "splitgp(lambda=0.2)", "splitgp(lambda=1)")
                                            if a in ran][:2]
    seed = (doc.get("seeds") or [0])[0]
    panels, missing = [], []
    for name in wanted:
        run_dir = compare_dir / run_slug(name) / f"seed{seed}"
        if not (run_dir / "checkpoint.pt").is_file():
            if tsne is not None:  # asked for by name: an error, not a silent gap
                raise FileNotFoundError(f"t-SNE for {name!r}: no checkpoint in {run_dir}; rerun `harmony compare` "
                                        f"with --out {compare_dir}")
            missing.append(name)
            continue
        panels.append((name, run_dir))
    why = None
    if not panels:
        why = (f"no checkpoint.pt for {', '.join(missing)} (seed {seed})." if missing else
               "none of harmony, splitgp(lambda=0.2), splitgp(lambda=1) ran; name algorithms with --tsne.")
    _draw(sections, written, compare_dir, "tsne_server.png", "t-SNE of the server representation", ABOUT["tsne"],
          why, lambda p: plot_tsne(panels, p, rho))
    runs = {name: json.loads((dirs[0] / "results.json").read_text())
            for name, dirs in _run_dirs(compare_dir, doc).items() if dirs}
    none = None if runs else "no run directory with a results.json beside compare.json."
    _draw(sections, written, compare_dir, "split_depths.png", "Split depths", ABOUT["depths"] + f" Seed {seed}.",
          none, lambda p: plot_split_depths(runs, p))
    _draw(sections, written, compare_dir, "round_accuracy.png", "Per-round accuracy",
          ABOUT["rounds"].split(";")[0] + f", one colour per algorithm (seed {seed}).", none,
          lambda p: plot_round_accuracy(runs, p))
    sections.append(Section("Per-device latency and session timeline", "Per run: each run's own report below.",
                            skipped="a comparison has one fleet per run; see the runs' reports."))
    links = []
    for name, dirs in _run_dirs(compare_dir, doc).items():
        for d in dirs:
            written += write_run_report(d, rho, tsne=False, note="t-SNE: in the comparison's report")
            rel = d.relative_to(compare_dir).as_posix()
            links.append(f'<li><a href="{html.escape(rel, quote=True)}/{REPORT}">{html.escape(name)} '
                         f'({html.escape(d.name)})</a></li>')
    with_ci = len(doc.get("seeds") or []) > 1
    rows = []
    for row in doc["rows"]:
        acc = zip(row["accuracy"], row.get("ci95") or [0.0] * len(row["accuracy"]), strict=True)
        rows.append([row["algorithm"], "acc %", *(f"{a:.2f}±{c:.2f}" if with_ci else f"{a:.2f}" for a, c in acc)])
        rows.append(["", "ms", *(f"{v:.2f}" for v in row["latency_ms"])])
    summary = _table(["algorithm", "", *(f"ρ={r:g}" for r in doc["rho"])], rows)
    if links:
        summary += "\n<p>Runs:</p><ul>" + "".join(links) + "</ul>"
    meta = f"{len(doc['rows'])} algorithm(s), seeds {', '.join(str(s) for s in doc.get('seeds') or [])}"
    page = compare_dir / REPORT
    page.write_text(_page(f"harmony report: {compare_dir.name}", meta, summary, sections))
    return [*written, page]


def write_report(run_dir: Path, tsne: list[str] | None = None, rho: float = 0.8) -> list[Path]:
    """report.html and its PNGs for ``run_dir``: a compare directory (compare.json) or a single run
    (results.json). ``tsne`` names the algorithms of a comparison's t-SNE panels."""
    if (run_dir / "compare.json").is_file():
        return write_compare_report(run_dir, tsne, rho)
    if (run_dir / "results.json").is_file():
        if tsne is not None:
            raise ValueError("--tsne names algorithms of a comparison; a single run's t-SNE is its own")
        return write_run_report(run_dir, rho)
    raise FileNotFoundError(f"{run_dir}: neither compare.json nor results.json; give a `harmony compare --out` or "
                            f"`harmony run --out` directory")
