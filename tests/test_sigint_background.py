"""SIGINT stops the long-running processes of a stack also when they were started with SIGINT
ignored — as a non-interactive shell starts a background job (`harmony up &` in a script, a CI
step), and as every child then inherits; Python keeps an inherited "ignored". The agent and
`fleet emulate` took the default handler back first (tests/test_agent_logging.py); the registry
(`python -m orchestrator`) and `harmony monitor --web` (tests/test_monitor.py) do too."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from broker.mosquitto import MosquittoProcess

ROOT = Path(__file__).resolve().parents[1]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
def test_sigint_stops_the_registry_started_with_sigint_ignored(tmp_path: Path) -> None:
    with MosquittoProcess(tmp_path / "mosquitto") as broker:
        log = tmp_path / "orchestrator.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "--broker", f"127.0.0.1:{broker.port}",
                                     "--redis", "redis://127.0.0.1:1/0"], cwd=ROOT, stdout=handle,
                                    stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint)
        try:
            deadline = time.monotonic() + 120
            # connected to the broker: past its start-up, in its loop
            while not any(c.raddr and c.raddr.port == broker.port and c.status == psutil.CONN_ESTABLISHED
                          for c in psutil.Process(proc.pid).net_connections()):
                assert proc.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, "the registry never connected:\n" + log.read_text(errors="replace")
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            try:
                assert proc.wait(30) == 0, log.read_text(errors="replace")
            except subprocess.TimeoutExpired:
                raise AssertionError("the registry, started with SIGINT ignored, did not stop on SIGINT") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
