"""One experiment per stack: a run holds ``hsfl:lease`` in the stack's Redis (owner, renewed by a
heartbeat, expiring), a second run is refused naming the first and how to stop it, and a run that
lost its lease stops rather than report results another run changed. A real redis-server on a free
loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from server import state
from server.state import StackBusyError, StackLease
from tests.test_server_state import redis_client  # noqa: F401 (a fixture: redis-server on a free port)


def _owner(pid: int, out: str) -> dict:
    return {"id": f"run-{pid}", "pid": pid, "host": socket.gethostname(), "config": "tiny", "out": out,
            "started": time.time()}


@pytest.mark.slow
def test_a_second_run_is_refused_naming_the_first_until_it_ends(redis_client):  # noqa: F811
    r = redis_client
    r.delete(state.lease_key())
    first = StackLease(r, _owner(os.getpid(), "/runs/first"))
    first.acquire()
    second = StackLease(r, _owner(os.getpid() + 1, "/runs/second"))
    try:
        with pytest.raises(StackBusyError) as busy:
            second.acquire()
        message = str(busy.value)
        assert f"run-{os.getpid()}" in message and "/runs/first" in message and "one experiment per stack" in message
        assert f"kill -INT {os.getpid()}" in message
        assert 0 < r.ttl(state.lease_key()) <= state.LEASE_TTL_S
    finally:
        first.release()
    assert r.get(state.lease_key()) is None
    second.acquire()  # the stack is free again
    second.release()


@pytest.mark.slow
def test_the_lease_of_a_process_gone_from_this_host_is_taken_over_at_once(redis_client):  # noqa: F811
    r = redis_client
    r.delete(state.lease_key())
    dead = subprocess.Popen(["true"])
    dead.wait()
    r.set(state.lease_key(), state.json.dumps(_owner(dead.pid, "/runs/killed"), sort_keys=True), ex=30)
    resumed = StackLease(r, _owner(os.getpid(), "/runs/killed"))
    resumed.acquire()  # (e.g. `harmony run --resume` after the first was killed with SIGKILL)
    try:
        assert b"/runs/killed" in r.get(state.lease_key()) and str(os.getpid()).encode() in r.get(state.lease_key())
    finally:
        resumed.release()


@pytest.mark.slow
def test_a_run_that_lost_its_lease_stops(redis_client, monkeypatch):  # noqa: F811
    r = redis_client
    r.delete(state.lease_key())
    monkeypatch.setattr(state, "LEASE_RENEW_S", 0.05)
    lease = StackLease(r, _owner(os.getpid(), "/runs/mine"))
    lease.acquire()
    lease.check()
    r.set(state.lease_key(), state.json.dumps(_owner(os.getpid() + 2, "/runs/intruder")))  # e.g. it expired
    deadline = time.monotonic() + 5
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(StackBusyError, match="lost the stack.*intruder"):
        lease.check()
    lease.release()
    assert b"intruder" in r.get(state.lease_key()), "releasing a lost lease deleted the other run's"
