"""``harmony agent --log-level``: validated with a message naming the allowed values, and in effect
although ``harmony``'s own ``main`` configures logging at WARNING first (real agent processes
against a real Mosquitto)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.client import BrokerClient
from broker.mosquitto import MosquittoProcess
from broker.topics import Topics
from edge_agent.__main__ import main as edge_agent_main
from edge_agent.logs import parse_log_level
from testbed.cli import app

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = "DEBUG, INFO, WARNING, ERROR, CRITICAL"


def _flat(text: str) -> str:
    """Rich's error box without its borders and line wrapping."""
    return " ".join(text.replace("│", " ").split())


def test_parse_log_level() -> None:
    assert parse_log_level("info") == "INFO"
    assert parse_log_level(" Warning ") == "WARNING"
    with pytest.raises(ValueError, match=f"^expected one of {ALLOWED}, got 'loud'$"):
        parse_log_level("loud")


def test_harmony_agent_rejects_an_unknown_level_naming_the_option_and_the_values() -> None:
    result = CliRunner().invoke(app, ["agent", "--broker", "127.0.0.1:1", "--device-id", "d0",
                                      "--log-level", "loud"])
    assert result.exit_code == 2
    assert f"Invalid value for '--log-level': expected one of {ALLOWED}, got 'loud'" in _flat(result.output)


def test_python_m_edge_agent_rejects_an_unknown_level(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        edge_agent_main(["--broker", "127.0.0.1:1", "--device-id", "d0", "--log-level", "loud"])
    assert exit_info.value.code == 2
    assert f"argument --log-level: expected one of {ALLOWED}, got 'loud'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    with MosquittoProcess(tmp_path_factory.mktemp("mosquitto")) as process:
        yield process


def _start_agent(broker: MosquittoProcess, device_id: str, log_path: Path, *extra: str,
                 sigint_ignored: bool = False) -> subprocess.Popen[bytes]:
    """``sigint_ignored``: started as from the background of a script (``agent &``), which
    starts it with SIGINT ignored."""
    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "testbed.cli", "agent", "--broker", f"127.0.0.1:{broker.port}",
             "--device-id", device_id, *extra], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
            preexec_fn=ignore_sigint if sigint_ignored else None)


def _stop_agent(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT is the agent's clean stop (it leaves and closes its connection); SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_registered(proc: subprocess.Popen[bytes], log_path: Path, device_id: str) -> None:
    """Until the agent logs its INFO registration line (past connect and probe); fails if it exits first."""
    deadline = time.monotonic() + 180
    while f"device {device_id}: registered with" not in log_path.read_text(errors="replace"):
        assert proc.poll() is None, f"the agent exited:\n{log_path.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"no INFO registration line:\n{log_path.read_text(errors='replace')}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def background_agent(broker: MosquittoProcess, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """One agent at the default log level, started as from the background of a script (SIGINT
    ignored) and registered, for the tests that read its log and signal it (one start, not three:
    an agent's start-up is most of each test's time)."""
    log_path = tmp_path_factory.mktemp("agent") / "agent.log"
    proc = _start_agent(broker, "log-bg-0", log_path, sigint_ignored=True)
    try:
        _wait_registered(proc, log_path, "log-bg-0")
        yield proc, log_path
    finally:
        _stop_agent(proc)


@pytest.mark.slow
def test_harmony_agent_logs_info_by_default(background_agent: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, log_path = background_agent
    text = log_path.read_text(errors="replace")
    assert " INFO broker.client: connected to 127.0.0.1:" in text  # the agent's format, with timestamps


@pytest.mark.slow
def test_harmony_agent_log_level_warning_silences_info(broker: MosquittoProcess, tmp_path: Path) -> None:
    log_path = tmp_path / "agent.log"
    watcher = BrokerClient("log-level-watcher", port=broker.port, clean_start=True, session_expiry_s=0)
    watcher.connect(timeout=5)
    hello = watcher.subscribe(Topics().hello("log-warn-0"))
    proc = _start_agent(broker, "log-warn-0", log_path, "--log-level", "warning")
    try:
        deadline = time.monotonic() + 180
        while True:  # registered: past connect and probe
            try:
                env = hello.wait_for("hello", timeout=1)
                break
            except TimeoutError:
                assert proc.poll() is None, f"the agent exited:\n{log_path.read_text(errors='replace')}"
                assert time.monotonic() < deadline, f"no hello:\n{log_path.read_text(errors='replace')}"
        assert env.body.cpus is not None
    finally:
        _stop_agent(proc)
        watcher.close()
    assert proc.returncode == 0, log_path.read_text(errors="replace")
    assert " INFO " not in log_path.read_text(errors="replace")  # not even the "disconnected" on the way out


@pytest.mark.slow
def test_sigusr1_writes_every_threads_stack_to_the_log_and_the_agent_runs_on(
        background_agent: tuple[subprocess.Popen[bytes], Path]) -> None:
    """`kill -USR1 PID` is how an engineer sees where a stuck agent is: every thread's stack, in its log."""
    proc, log_path = background_agent
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "in _main" not in log_path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log_path.read_text(errors="replace")
    assert "most recent call first" in text and 'File "' in text, text[-2000:]
    assert "in _main" in text  # the device thread's own frames are in it
    time.sleep(1.0)
    assert proc.poll() is None, "SIGUSR1 stopped the agent"


@pytest.mark.slow
def test_sigint_stops_an_agent_started_with_sigint_ignored(
        background_agent: tuple[subprocess.Popen[bytes], Path]) -> None:
    """A shell script's `harmony agent … &` (or a CI job's background step) starts the agent with
    SIGINT ignored, and Python keeps it so: before the agent took the default handler back, SIGINT
    did nothing and only SIGKILL stopped it (seen as 30-s hangs in background test runs). (The
    module's last test: it stops the shared agent.)"""
    proc, log_path = background_agent
    _stop_agent(proc)
    assert proc.returncode == 0, log_path.read_text(errors="replace")
