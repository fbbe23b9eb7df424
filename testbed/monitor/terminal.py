"""The terminal view of ``harmony monitor`` (no ``--web``): Rich tables over the same snapshot the
dashboard shows, redrawn by ``rich.live.Live``."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from testbed.monitor.state import MonitorState

STATE_STYLE = {"offline": "bold red", "refused": "bold red", "error": "red", "training": "cyan",
               "evaluating": "cyan", "idle": "green", "online": "green"}
LEVEL_STYLE = {"warning": "yellow", "error": "red", "info": ""}


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "–"
    s = max(0.0, now - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


def render(snap: dict[str, Any]) -> RenderableType:
    """The whole view for one snapshot."""
    now = snap["now"]
    run, cur, source = snap["run"], snap["current"], snap["source"]
    head = Text()
    if source["up"]:
        head.append(f" {source['name']}: live ", style="bold white on green")
    else:
        down = "stack down" if source["name"].startswith("redis") else "waiting for the run"
        head.append(f" {down} ", style="bold white on red")
        head.append(f" {source['error'] or ''}", style="red")
    if run.get("name") or run.get("id"):
        head.append(f"  {run.get('name') or 'run ' + str(run.get('id'))[:8]} · {run.get('state', '')}")
    head.append(f"  round {cur['round']} / {run.get('rounds') or '?'}" if cur else "  no round yet", style="bold")
    parts: list[RenderableType] = [head]
    if cur:
        c = cur["counts"]
        line = (f"sessions {c['done']} / {cur['sessions_total'] or '?'} done, {c['late']} late, "
                f"{c['dropped']} dropped")
        if cur.get("deadline_in_s") is not None:
            line += f"; deadline in {max(0.0, cur['deadline_in_s']):.0f} s"
        if cur["stragglers"]:
            line += f"; stragglers {', '.join(cur['stragglers'])}"
        if cur["dropouts"]:
            line += f"; dropouts {', '.join(cur['dropouts'])}"
        parts.append(Text(line))
    fleet = Table(title=f"fleet ({snap['devices_online']} of {len(snap['devices'])} online)", expand=False)
    for col in ("device", "class", "depth", "status", "last seen", "step", "up", "down", "agent", "d/l/x"):
        fleet.add_column(col, justify="right" if col in ("depth", "step", "up", "down", "d/l/x") else "left")
    for d in snap["devices"]:
        s = d["sessions"]
        fleet.add_row(d["device"], d["device_class"] or d["profile"] or "–", str(d["split_depth"] or "–"),
                      Text(d["state"], style=STATE_STYLE.get(d["state"], "")), _ago(d["last_seen"], now),
                      "–" if d["step_s"] is None else f"{1000 * d['step_s']:.0f} ms", _bytes(d["bytes_up"]),
                      _bytes(d["bytes_down"]), d["agent_version"] or "–", f"{s['done']}/{s['late']}/{s['dropped']}")
    parts.append(fleet)
    done = [r for r in snap["rounds"] if r.get("record")][-8:]
    if done:
        rounds = Table(title="rounds (train loss and accuracy, exit / server)")
        for col in ("round", "sessions", "left out", "loss exit", "loss server", "acc exit %", "acc server %", "s"):
            rounds.add_column(col, justify="right")
        for r in done:
            rec = r["record"]
            rounds.add_row(str(r["round"]), str(rec.get("participants")),
                           str(len(rec.get("stragglers") or []) + len(rec.get("dropouts") or [])),
                           f"{rec['train_loss_exit']:.3f}", f"{rec['train_loss_server']:.3f}",
                           f"{100 * rec['train_acc_exit']:.1f}", f"{100 * rec['train_acc_server']:.1f}",
                           f"{rec.get('seconds', 0):.1f}")
        parts.append(rounds)
    if snap["depths"]:
        depths = Table(title="per split depth")
        for col in ("depth", "devices", "online", "mean step", "d/l/x", "up", "down"):
            depths.add_column(col, justify="right")
        for g in snap["depths"]:
            s = g["sessions"]
            depths.add_row(str(g["split_depth"]), str(g["devices"]), str(g["online"]),
                           "–" if g["step_s"] is None else f"{1000 * g['step_s']:.0f} ms",
                           f"{s['done']}/{s['late']}/{s['dropped']}", _bytes(g["bytes_up"]), _bytes(g["bytes_down"]))
        parts.append(depths)
    if snap["log"]:
        events = Table(title="events (newest first)", show_header=False, box=None)
        events.add_column("time")
        events.add_column("event")
        for e in snap["log"][:10]:
            events.add_row(time.strftime("%H:%M:%S", time.localtime(e["t"])),
                           Text(e["text"], style=LEVEL_STYLE.get(e["level"], "")))
        parts.append(events)
    return Group(*parts)


def run_live(state: MonitorState, console: Console | None = None, refresh_s: float = 0.5) -> None:
    """Redraw until Ctrl-C."""
    with Live(render(state.snapshot()), console=console, refresh_per_second=max(1, int(1 / refresh_s)),
              screen=False) as live:
        try:
            while True:
                time.sleep(refresh_s)
                live.update(render(state.snapshot()))
        except KeyboardInterrupt:
            pass
