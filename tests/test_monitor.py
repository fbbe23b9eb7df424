"""The monitor without a stack: a local-engine run's ``events.jsonl`` tailed by the run-dir source
while the run goes on, the terminal view of a device gone offline, and ``/metrics`` of that run."""

from __future__ import annotations

import io
import json
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from harmony.engine import LocalEngine
from testbed.monitor.runlog import RunEventLog, iter_events
from testbed.monitor.sources import RunDirSource
from testbed.monitor.state import MonitorState
from testbed.monitor.terminal import render
from testbed.monitor.web import DashboardServer
from tests.conftest import tiny_config


def metrics_of(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` scraped and parsed by prometheus-client's own parser: (sample name, labels) → value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_run_dir_source_follows_a_local_run_and_serves_its_metrics(tmp_path):
    """The run-dir source tails ``events.jsonl`` as the local engine writes it: after round 1 the
    monitor already shows round 1's record; at the end every round, the planned dropouts and the
    split depths, and ``/metrics`` says what the run did."""
    cfg = tiny_config(**{"train.rounds": 3, "fleet.dropout_probability": 0.3, "fleet.quorum": 0.25,
                         "data.train_fraction": 0.01, "threads": 1, "fleet.round_deadline_s": 600.0})
    state = MonitorState("run-dir")
    source = RunDirSource(tmp_path, state)
    seen_live: list[Any] = []
    seen_deadline: dict[str, Any] = {}

    def watch(event: str, **fields: Any) -> None:
        if event == "session_done" and fields["round"] == 1 and "deadline_in_s" not in seen_deadline:
            source.poll_once()
            seen_deadline.update(state.snapshot()["current"])
        if event == "round_end" and fields["record"].round == 1:
            source.poll_once()  # what a monitor tailing the file sees mid-run
            snap = state.snapshot()
            seen_live.append((snap["current"]["round"], snap["current"]["record"], snap["run"].get("state")))

    events = RunEventLog(tmp_path, watch)
    engine = LocalEngine(cfg, tmp_path, events)
    events.begin(engine)
    results = engine.run()
    events.end("done")

    lines = list(iter_events(tmp_path / "events.jsonl"))
    assert lines[0]["event"] == "run_start" and lines[0]["split_depths"] == [2, 3, 4, 2]
    assert lines[-1]["event"] == "run_done"
    done_events = [e for e in lines if e["event"] == "session_done"]
    assert done_events and all(isinstance(e["seconds"], float) and e["steps"] > 0 for e in done_events)
    assert seen_live == [(1, results["rounds"][0], "running")], "round 1 was not visible while the run went on"
    assert 0 < seen_deadline["deadline_in_s"] <= 600 and seen_deadline["counts"]["done"] == 1  # mid-round 1

    source.poll_once()
    snap = state.snapshot()
    assert snap["source"]["up"] and snap["run"]["state"] == "done"
    assert [r["record"] for r in snap["rounds"]] == results["rounds"]
    assert {d["device"]: d["split_depth"] for d in snap["devices"]} == {
        "client-0": 2, "client-1": 3, "client-2": 4, "client-3": 2}
    dropouts = [sorted(f"client-{i}" for i in r["dropouts"]) for r in results["rounds"]]
    assert any(dropouts), "the seed drops nobody; the test would show nothing"
    assert [r["dropouts"] for r in snap["rounds"]] == dropouts
    assert snap["evaluation"]["accuracy"] == results["evaluation"]["accuracy"]

    server = DashboardServer(state, port=0).start()
    try:
        metrics = metrics_of(server.url + "metrics")
        with urllib.request.urlopen(server.url + "api/state", timeout=10) as response:
            assert json.loads(response.read())["run"]["state"] == "done"
    finally:
        server.stop()
    sessions = sum(r["participants"] for r in results["rounds"])
    dropped = sum(len(r["dropouts"]) for r in results["rounds"])
    assert metrics[("harmony_rounds_completed_total", ())] == 3
    assert metrics[("harmony_rounds_total_planned", ())] == 3
    assert metrics[("harmony_current_round", ())] == 3
    assert metrics[("harmony_sessions_total", (("outcome", "done"),))] == sessions
    assert metrics[("harmony_dropouts_total", ())] == dropped
    assert metrics[("harmony_session_duration_seconds_count", ())] == sessions
    assert metrics[("harmony_device_split_depth", (("device", "client-2"),))] == 4
    last = results["rounds"][-1]
    assert metrics[("harmony_round_accuracy_percent", (("head", "exit"),))] == 100 * last["train_acc_exit"]
    assert metrics[("harmony_round_loss", (("head", "server"),))] == last["train_loss_server"]


def test_terminal_view_marks_a_device_offline():
    """A stack's events (a run of 2 devices, one of them gone by its last will) in the Rich view."""
    state = MonitorState("redis redis://127.0.0.1:6379/0")
    state.set_source(True)
    state.fold({"event": "run_started", "id": "r1", "rounds": 5, "devices": ["emu-0", "emu-1"], "t": 100.0})
    for dev, depth in (("emu-0", 2), ("emu-1", 3)):
        state.set_device(dev, status="idle", split_depth=depth, device_class="pi4", agent_version="0.4.0")
    state.fold({"event": "round_running", "round": 1, "sessions": 2, "t": 101.0})
    state.fold({"event": "session_done", "round": 1, "device": "emu-0", "seconds": 2.0, "steps": 8,
                "bytes_up": 2_500_000, "bytes_down": 1_000_000, "t": 103.0})
    state.fold({"event": "device_offline", "device": "emu-1", "state": "offline", "t": 104.0})
    state.fold({"event": "session_dropped", "round": 1, "device": "emu-1", "reason": "its status is offline",
                "t": 104.5})
    console = Console(record=True, width=160, color_system=None, file=io.StringIO())
    console.print(render(state.snapshot()))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│ emu-")}
    assert "offline" in rows["emu-1"] and "offline" not in rows["emu-0"]
    assert "250 ms" in rows["emu-0"] and "2.5 MB" in rows["emu-0"]  # 2 s / 8 steps; bytes up
    assert "fleet (1 of 2 online)" in text
    assert "round 1 / 5" in text and "1 dropped" in text and "dropouts emu-1" in text
    assert "emu-1 went offline" in text


@pytest.mark.slow
def test_harmony_monitor_serves_a_run_dir_and_refuses_two_sources(tmp_path):
    """``harmony monitor --web --run-dir`` as a user starts it; two sources at once exit 2 naming both.
    Started as from a script's background (``harmony monitor --web &``: SIGINT ignored), SIGINT
    still stops it (it used to be ignored: only SIGKILL did)."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from tests.test_cli import ROOT

    (tmp_path / "events.jsonl").write_text(json.dumps({"t": 1.0, "event": "run_start", "name": "n", "rounds": 2,
                                                       "clients": 1, "split_depths": [3]}) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "monitor", "--web", "--port", str(port),
                             "--run-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=5) as response:
                    snap = json.loads(response.read())
                if snap["devices"]:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "harmony monitor --web did not serve"
            time.sleep(0.2)
        assert snap["run"]["name"] == "n" and snap["devices"][0]["split_depth"] == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert b"harmony monitor" in response.read()
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(30) == 0, proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        except subprocess.TimeoutExpired:
            raise AssertionError("harmony monitor --web started with SIGINT ignored did not stop on SIGINT") from None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "testbed.cli", "monitor", "--run-dir", str(tmp_path), "--redis",
                          "redis://127.0.0.1:1/0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--run-dir and --redis" in bad.stderr


def test_state_tolerates_unknown_events_and_missing_fields():
    """Readers of events.jsonl and hsfl:events must survive what a newer writer sends."""
    state = MonitorState("run-dir")
    for doc in ({"event": "something_new", "x": [1]}, {"event": "session_done"}, {"event": "round_start"},
                {"event": "round_end", "record": "not a dict"}, {"event": "message_rejected"},
                {"event": "session_late", "round": "2", "device": None}, {"no": "event"}, {"event": 3}):
        state.fold(doc)
    snap = state.snapshot()
    assert snap["counters"]["rejected"] == {"unknown": 1}
    assert snap["counters"]["rounds_completed"] == 0
    json.dumps(snap)  # JSON-able as the page and /api/state need it


def test_metrics_gauge_the_stacks_health():
    """``harmony_stack_up{component}``: Redis from the monitor's source, the broker from its probe;
    0 while a service is unreachable (``harmony_devices_online`` alone keeps its last value then)."""
    import socket

    from prometheus_client import generate_latest

    from testbed.monitor.metrics import registry_for
    from testbed.monitor.sources import RedisSource

    def gauges(state: MonitorState) -> dict[str, float]:
        text = generate_latest(registry_for(state)).decode()
        return {s.labels["component"]: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "harmony_stack_up"}

    with socket.socket() as listener:  # a port nothing listens on once closed
        listener.bind(("127.0.0.1", 0))
        closed = listener.getsockname()
    state = MonitorState("redis redis://127.0.0.1:1/0")
    source = RedisSource("redis://127.0.0.1:1/0", state, broker=closed)
    source._probe_broker()
    state.set_source(False, "stack down: Redis refused")
    assert gauges(state) == {"broker": 0.0, "redis": 0.0}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        source.broker, source._next_probe = listener.getsockname(), 0.0
        source._probe_broker()
    state.set_source(True)
    assert gauges(state) == {"broker": 1.0, "redis": 1.0}
