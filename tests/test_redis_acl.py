"""Least privilege in Redis: a stack's ``redis.acl`` has one user per service role, none of which may
run an administrative or dangerous command (a leaked service password cannot ``CONFIG SET`` or
``FLUSHALL``); the registry writes only the device records and the event stream; the monitor only
reads. A real redis-server on a free loopback port with the credential store's ACL file."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest
import redis

from testbed.credentials import REDIS_ROLES, CredentialStore
from testbed.stack import _wait_port, free_port


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CredentialStore, int]]:
    store = CredentialStore(tmp_path_factory.mktemp("store"))
    store.write_redis_acl()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port, run_dir = free_port(), tmp_path_factory.mktemp("redis")
    log = run_dir / "redis.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir",
                                 str(run_dir), "--aclfile", str(store.redis_acl_file)], stdout=handle,
                                stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, "redis-server", log)
        yield store, port
    finally:
        proc.terminate()
        proc.wait(10)


def _as(acl_redis: tuple[CredentialStore, int], role: str) -> redis.Redis:
    store, port = acl_redis
    return redis.Redis.from_url(store.redis_url(port=port, role=role))


@pytest.mark.slow
@pytest.mark.parametrize("role", sorted(REDIS_ROLES))
def test_no_service_may_administer_redis(acl_redis, role):
    r = _as(acl_redis, role)
    assert r.ping()
    for command in (("CONFIG", "SET", "dir", "/tmp"), ("FLUSHALL",), ("KEYS", "*"), ("SAVE",),
                    ("ACL", "LIST"), ("SHUTDOWN",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.execute_command(*command)


@pytest.mark.slow
def test_the_driver_and_workers_use_the_keys_the_registry_and_monitor_only_theirs(acl_redis):
    driver, worker = _as(acl_redis, "driver"), _as(acl_redis, "worker")
    driver.set("hsfl:model:abc", b"weights")
    worker.lpush("hsfl", b"task")  # a Celery queue
    assert worker.get("hsfl:model:abc") == b"weights"
    registry = _as(acl_redis, "registry")
    registry.hset("hsfl:dev:emu-0", mapping={"status": "idle"})
    registry.sadd("hsfl:devices", "emu-0")
    registry.xadd("hsfl:events", {"name": "device_online"})
    for write in (lambda: registry.set("hsfl:model:abc", b"forged"), lambda: registry.get("hsfl:model:abc"),
                  lambda: registry.delete("hsfl:run")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()
    monitor = _as(acl_redis, "monitor")
    assert monitor.hgetall("hsfl:dev:emu-0") == {b"status": b"idle"} and monitor.xrange("hsfl:events")
    assert monitor.get("hsfl:model:abc") == b"weights"
    for write in (lambda: monitor.set("hsfl:run", b"x"), lambda: monitor.xadd("hsfl:events", {"name": "x"}),
                  lambda: monitor.delete("hsfl:dev:emu-0"), lambda: monitor.llen("hsfl")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()


def test_the_acl_file_names_every_role_and_no_password(tmp_path):
    store = CredentialStore(tmp_path / "store")
    text = store.write_redis_acl().read_text()
    assert text.startswith("user default off\n") and "+@all -@admin -@dangerous" in text
    for user, service, _ in REDIS_ROLES.values():
        assert f"user {user} on #" in text and store.service_password(service) not in text
    assert store.redis_url(port=7000, role="monitor").startswith("redis://harmony-monitor:")


@pytest.mark.slow
def test_the_monitor_watches_a_stack_as_its_read_only_user(acl_redis):
    """`harmony monitor --stack` reads as ``harmony-monitor``: its Redis source (catch-up, XREAD,
    the poll of the run, devices and rounds, pipelined) works within that user's rights."""
    import json
    import time

    from server import state as keys
    from testbed.monitor.sources import RedisSource
    from testbed.monitor.state import MonitorState

    driver = _as(acl_redis, "driver")
    driver.hset(keys.run_key(), mapping={"id": "r1", "manifest": "m1", "last_round": 1})
    driver.set(keys.config_key("m1"), json.dumps({"config": {"name": "tiny", "train": {"rounds": 2}}}))
    driver.hset(keys.round_key(1), mapping={"state": "done", "record": json.dumps({"round": 1, "participants": 1})})
    keys.event(driver, "run_started", id="r1", rounds=2, devices=["emu-0"])
    store, port = acl_redis
    monitor_state = MonitorState("redis")
    source = RedisSource(store.redis_url(port=port, role="monitor"), monitor_state).start()
    try:
        deadline = time.monotonic() + 20
        while not (monitor_state.source["up"] and monitor_state.run.get("name") == "tiny") \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        snap = monitor_state.snapshot()
        assert snap["source"]["up"] and snap["source"]["error"] is None, snap["source"]
        assert snap["run"]["name"] == "tiny" and snap["components"] == {"redis": True}
    finally:
        source.stop()
