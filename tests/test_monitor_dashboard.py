"""``harmony monitor --web`` over a real stack (mosquitto, redis-server, a Celery worker, the
registry and two agent processes on free loopback ports), watched in headless Chromium: device
rows appear and the round counter advances during a distributed run; an agent killed with
SIGKILL shows its device offline within seconds; ``/metrics`` parses and says what the run did;
a Redis restart shows "stack down", and the monitor recovers when the stack is back."""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from rich.console import Console

from orchestrator.engine import DistributedEngine
from server.state import connect as state_connect
from testbed.monitor.sources import RedisSource
from testbed.monitor.state import MonitorState
from testbed.monitor.terminal import render
from testbed.monitor.web import DashboardServer
from testbed.stack import LocalStack
from tests.browser import artifact_path, browser_page, chromium  # noqa: F401
from tests.conftest import tiny_config
from tests.runtime_fixtures import train_only, when_in_flight
from tests.test_monitor import metrics_of

ROUNDS = 4
KILLED = "emu-3"  # the only device of agent-1
OFFLINE_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path_factory.mktemp("monitor-stack"))
    s.start(agents=0, worker_concurrency=4, registry=True)  # the registry keeps hsfl:dev:{id} between runs
    s.add_agent(["emu-0", "emu-1", "emu-2"])  # agent-0
    s.add_agent([KILLED])  # agent-1
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def monitor(stack: LocalStack) -> Iterator[tuple[MonitorState, DashboardServer]]:
    assert stack.info is not None
    state = MonitorState("redis")
    source = RedisSource(stack.info.redis_url, state).start()
    server = DashboardServer(state, port=0).start()
    try:
        yield state, server
    finally:
        server.stop()
        source.stop()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def monitor_cpu_s() -> float:
    """CPU seconds so far of the monitor's threads in this process (its Redis source and its web server)."""
    ids = {t.native_id for t in threading.enumerate() if t.name.startswith("monitor-")}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def row(page: Any, device: str) -> str:
    return f'#fleet tr[data-device="{device}"]'


@pytest.mark.slow
def test_dashboard_follows_a_run_and_shows_a_killed_device_offline(stack, monitor, browser_page):  # noqa: F811
    state, server = monitor
    page = browser_page
    assert stack.info is not None
    cfg = tiny_config(**{"train.rounds": ROUNDS, "fleet.quorum": 0.5, "data.train_fraction": 0.015,
                         "threads": 1})
    user, password = stack.info.orchestrator_login()
    engine = DistributedEngine(cfg, None, mqtt=stack.info.service_mqtt, redis_url=stack.info.redis_url,
                               username=user, password=password, tls=stack.info.service_tls("orchestrator"),
                               devices_timeout_s=60, round_timeout_s=150)
    run: dict[str, Any] = {}

    def train() -> None:
        try:
            run["rounds"] = train_only(engine)
        except BaseException as err:  # reported by the test below
            run["error"] = err

    page.goto(server.url)
    for dev in ("emu-0", "emu-1", "emu-2", KILLED):
        page.wait_for_selector(row(page, dev), timeout=30_000)
    assert page.inner_text(f"{row(page, KILLED)} td.status") != "offline"
    killed: dict[str, float] = {}

    def kill() -> None:
        stack.kill("agent-1", signal.SIGKILL)  # returns once the process is gone
        killed["at"] = time.monotonic()

    # agent-1 dies while its device's round-2 session is under way
    killer = when_in_flight(state_connect(stack.info.redis_url), 2, {KILLED}, kill, timeout_s=240)
    trainer = threading.Thread(target=train, daemon=True)
    cpu_before, wall_before = monitor_cpu_s(), time.monotonic()
    trainer.start()
    killer.start()
    try:
        page.wait_for_function("Number(document.querySelector('#round-counter').dataset.round) >= 1",
                               timeout=60_000)
        first_round = int(page.get_attribute("#round-counter", "data-round") or 0)
        assert f"/ {ROUNDS}" in page.inner_text("#round-counter")
        page.wait_for_selector(f'{row(page, KILLED)} td.status:text-is("offline")', timeout=240_000)
        assert "at" in killed, "the device shows offline before its agent was killed"
        offline_after_s = time.monotonic() - killed["at"]
        print(f"\n{KILLED}: offline on the dashboard {offline_after_s:.2f} s after kill -9 of its agent")
        assert offline_after_s < OFFLINE_WITHIN_S
        assert page.inner_text(f"{row(page, 'emu-0')} td.status") != "offline"
        page.screenshot(path=artifact_path("monitor-dashboard.png"), full_page=True)

        # the terminal view of the same state
        console = Console(record=True, width=160, color_system=None, file=io.StringIO())
        console.print(render(state.snapshot()))
        lines = [ln for ln in console.export_text().splitlines() if ln.startswith(f"│ {KILLED} ")]
        assert lines and "offline" in lines[0]
    finally:
        trainer.join(timeout=300)
        killer.join(timeout=5)
        engine.close()
    assert "error" not in run, f"the run failed: {run.get('error')!r}"
    print(f"monitor threads: {monitor_cpu_s() - cpu_before:.2f} CPU s over the run's "
          f"{time.monotonic() - wall_before:.1f} s (one page open)")
    records = run["rounds"]
    assert len(records) == ROUNDS
    assert any(r["dropouts"] for r in records), "the killed device was in no round after the kill"

    page.wait_for_function(f"document.querySelector('#round-counter').textContent === 'round {ROUNDS} / {ROUNDS}'",
                           timeout=20_000)
    assert first_round < ROUNDS, "the page saw no round but the last"
    wait_until(lambda: state.snapshot()["counters"]["rounds_completed"] == ROUNDS, 10, "all rounds in the state")
    page.wait_for_selector(f'#log li[data-event="round_done"]:has-text("round {ROUNDS} done")', timeout=10_000)
    page.screenshot(path=artifact_path("monitor-dashboard-done.png"), full_page=True)
    assert page.errors == []  # type: ignore[attr-defined]
    metrics = metrics_of(server.url + "metrics")
    sessions = sum(r["participants"] for r in records)
    assert metrics[("harmony_rounds_completed_total", ())] == ROUNDS
    assert metrics[("harmony_rounds_total_planned", ())] == ROUNDS
    assert metrics[("harmony_current_round", ())] == ROUNDS
    assert metrics[("harmony_sessions_total", (("outcome", "done"),))] == sessions
    assert metrics[("harmony_session_duration_seconds_count", ())] == sessions
    assert metrics[("harmony_dropouts_total", ())] == sum(len(r["dropouts"]) for r in records)
    assert metrics[("harmony_devices_online", ())] == 3
    assert metrics[("harmony_device_online", (("device", KILLED),))] == 0
    assert metrics[("harmony_device_online", (("device", "emu-0"),))] == 1
    for i, dev in enumerate(engine.fleet.device_ids):
        assert metrics[("harmony_device_split_depth", (("device", dev),))] == engine.experiment.depths[i]
    up = metrics[("harmony_device_bytes_total", (("device", "emu-0"), ("direction", "up")))]
    assert up > 0 and metrics[("harmony_device_bytes_total", (("device", "emu-0"), ("direction", "down")))] > 0
    assert metrics[("harmony_device_step_seconds", (("device", "emu-0"),))] > 0
    last = records[-1]
    assert metrics[("harmony_round_accuracy_percent", (("head", "server"),))] == 100 * last["train_acc_server"]


@pytest.mark.slow
def test_dashboard_shows_stack_down_and_recovers(stack, monitor, browser_page):  # noqa: F811
    """Redis stopped: the page says "stack down"; the stack back (Redis, the registry, the agent):
    the page is live again and shows the agent's device online."""
    state, server = monitor
    page = browser_page
    page.goto(server.url)
    page.wait_for_selector(row(page, "emu-0"), timeout=30_000)
    if "agent-1" in stack.info.pids:  # type: ignore[union-attr]
        stack.kill("agent-1", signal.SIGKILL)
    page.wait_for_selector(f'{row(page, KILLED)} td.status:text-is("offline")', timeout=OFFLINE_WITHIN_S * 1000)

    stack.kill("redis", signal.SIGTERM)
    page.wait_for_selector('#source:text-is("stack down")', timeout=15_000)
    assert not state.snapshot()["source"]["up"]
    assert page.is_visible(row(page, "emu-0")), "the fleet vanished from the page while the stack was down"
    page.screenshot(path=artifact_path("monitor-stack-down.png"))

    stack.restart("redis")
    stack.restart("orchestrator")  # the registry, as `harmony up` would start it again
    stack.restart("agent-1")
    page.wait_for_selector('#source.up', timeout=15_000)
    page.wait_for_selector(f'{row(page, KILLED)} td.status:not(:text-is("offline"))', timeout=30_000)
    assert any(e["event"] == "source_down" for e in state.snapshot()["log"])
    page.screenshot(path=artifact_path("monitor-recovered.png"), full_page=True)
    assert page.errors == []  # type: ignore[attr-defined]
