"""Server tasks connect to the broker with retries when no CONNACK comes (a swamped broker or
worker), and give up at their deadline; a broker that refuses raises at once."""

from __future__ import annotations

import socket
import time

import pytest

from broker.errors import ConnectRefused
from server import tasks


def test_connect_retries_until_the_deadline_when_no_connack_comes(monkeypatch, caplog):
    silent = socket.socket()  # accepts TCP connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        monkeypatch.setenv("HSFL_MQTT", f"127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(tasks, "CONNECT_TRY_S", 0.3)
        t0 = time.monotonic()
        with pytest.raises(ConnectRefused, match="no CONNACK"):
            tasks.connect_task_client("session-x-1-abc", time.monotonic() + 1.0)
        assert time.monotonic() - t0 < 5.0  # stops at its 1-s deadline (give or take a busy host), not later
        assert "trying again (1)" in caplog.text and "trying again (2)" in caplog.text
    finally:
        silent.close()


def test_connect_gives_up_at_once_when_the_broker_refuses(monkeypatch):
    def refuse(self, timeout=10.0):
        raise ConnectRefused("broker refused: Not authorized", reason_code=0x87, reason="Not authorized")

    monkeypatch.setattr(tasks.BrokerClient, "connect", refuse)
    t0 = time.monotonic()
    with pytest.raises(ConnectRefused, match="Not authorized"):
        tasks.connect_task_client("session-x-1-abc", time.monotonic() + 60.0)
    assert time.monotonic() - t0 < 10.0  # at once: nowhere near its 60-s deadline, even on a busy host
