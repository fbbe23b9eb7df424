"""A Redis client of the runtime (``server.state.connect``) rides out a restart of redis-server with
its append-only file: a command issued while the server is down or still loading is tried again
and succeeds, with the data back (the driver used to fail its run with "Connection closed by
server" when redis-server restarted mid-round; RESULTS §11, the fault table)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest

from broker.mosquitto import free_port
from server import state
from testbed.stack import _wait_port


@pytest.mark.slow
def test_a_command_during_a_redis_restart_is_tried_again(tmp_path):
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(tmp_path)]

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_port(port, proc, "redis-server", tmp_path / "none.log")
        return proc

    restarted: dict[str, subprocess.Popen[bytes]] = {}
    proc = start()
    r = state.connect(f"redis://127.0.0.1:{port}/0")
    try:
        r.hset(state.round_key(1), "state", "running")
        proc.terminate()
        proc.wait(10)
        later = threading.Timer(1.0, lambda: restarted.setdefault("proc", start()))
        later.start()
        t0 = time.monotonic()
        assert r.hget(state.round_key(1), "state") == b"running"  # issued while the server is down
        assert time.monotonic() - t0 >= 0.5
        later.join()
    finally:
        for p in (proc, restarted.get("proc")):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
