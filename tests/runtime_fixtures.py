"""Fixtures for the distributed-runtime tests: a real local stack (mosquitto, redis-server, a Celery
worker with 2 threads, one agent process hosting 4 emulated devices) on free loopback ports, stopped
by the PIDs it recorded."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.stack import LocalStack, StackInfo


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    stack = LocalStack(tmp_path_factory.mktemp("stack"))
    info = stack.start(agents=1, devices_per_agent=4, worker_concurrency=2, registry=False)
    try:
        yield info
    finally:
        stack.stop()
