"""The Redis aggregation buffers (``server.state``) against a real redis-server on a free loopback port:
merged per-session contributions equal the local engine's ``WeightedSum`` bit for bit, a replayed
session never counts twice, and a session stores its tensors at their own width (fp32, not fp64)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
import torch

from harmony.aggregation import WeightedSum
from server import state
from testbed.stack import _wait_port, free_port


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port, run_dir = free_port(), tmp_path_factory.mktemp("redis")
    log = run_dir / "redis.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir",
                                 str(run_dir)], stdout=handle, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, "redis-server", log)
        yield state.connect(f"redis://127.0.0.1:{port}/0")
    finally:
        proc.terminate()
        proc.wait(10)


def _states(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    client = {"conv.weight": torch.randn(4, 1, 3, 3, generator=g), "bn.num_batches_tracked": torch.tensor(seed + 3)}
    server = {"fc.weight": torch.randn(10, 6, generator=g).t(), "fc.bias": torch.randn(10, generator=g)}
    return client, server  # fc.weight is deliberately non-contiguous


@pytest.mark.slow
def test_merged_contributions_equal_the_local_weighted_sum(redis_client):
    devices, weights = ["emu-0", "emu-1", "emu-2"], [300, 1200, 77]
    local_client, local_server = WeightedSum(), WeightedSum()
    for k, (dev, n) in enumerate(zip(devices, weights, strict=True)):
        client, server = _states(k)
        local_client.add(client, n)
        local_server.add(server, n)
        state.store_session_result(redis_client, 1, dev, client, server, n, {"stats": [n, 0, 0, 0, 0]})
    # a redelivered session replays and stores again: it replaces its own buffer
    client, server = _states(1)
    state.store_session_result(redis_client, 1, "emu-1", client, server, 1200, {"stats": [1200, 0, 0, 0, 0]})

    merged_client, merged_server, metas = state.merge_partial_sums(redis_client, 1, devices)
    for merged, local in ((merged_client, local_client), (merged_server, local_server)):
        assert merged.weights == local.weights
        assert merged.sums.keys() == local.sums.keys()
        for name, total in local.sums.items():
            assert merged.sums[name].dtype == torch.float64
            assert torch.equal(merged.sums[name], total), name
    assert [m["stats"][0] for m in metas] == weights
    assert redis_client.scard(state.done_key(1)) == 3


@pytest.mark.slow
def test_the_aggregate_task_flushes_denormal_means_as_the_local_engine_does(redis_client, monkeypatch):
    """Two sessions' 2e-38 and 0 average to 1e-38, a float32 denormal: the local engine (its torch
    thread flushes) stores 0, and so must the worker's aggregate task in a thread that ran nothing
    before it — flush-to-zero is per-thread state, and a worker thread's first task may be this one."""
    import threading

    from harmony.algorithms import StepStats
    from harmony.engine import LocalEngine
    from harmony.fleet import SessionResult
    from server import tasks
    from tests.conftest import tiny_config

    rnd, devices = 5, ["emu-0", "emu-1"]
    prev = {"w": torch.ones(3)}
    tiny = [{"w": torch.full((3,), 2e-38)}, {"w": torch.zeros(3)}]
    for dev, w in zip(devices, tiny, strict=True):
        state.store_session_result(redis_client, rnd, dev, w, w, 10, {"stats": [10, 0, 0, 0, 0], "client_sha": dev})
    prev_sha, _ = state.put_model(redis_client, prev)
    monkeypatch.setenv("HSFL_REDIS_URL", f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0")
    got: dict = {}
    worker = threading.Thread(target=lambda: got.update(tasks.aggregate.run(rnd, devices, prev_sha, prev_sha)))
    worker.start()
    worker.join()
    assert "client_sha" in got, "the aggregate task failed (its traceback is above)"
    remote = state.get_model(redis_client, got["client_sha"])["w"]

    engine = LocalEngine(tiny_config())
    try:
        results = [SessionResult(i, w, 10, StepStats(), server_state=w) for i, w in enumerate(tiny)]
        local, _ = engine.fleet.aggregate(rnd, results, prev, prev)
    finally:
        engine.close()
    print("DBG", local["w"], remote)
    # bit patterns: a float comparison in a flushing thread reads a denormal as 0 (denormals-are-zero)
    assert local["w"].view(torch.int32).tolist() == [0, 0, 0]
    assert remote.view(torch.int32).tolist() == local["w"].view(torch.int32).tolist()


@pytest.mark.slow
def test_a_session_stores_its_tensors_at_their_own_width(redis_client):
    client, server = _states(5)
    state.store_session_result(redis_client, 2, "emu-9", client, server, 10, {})
    stored = redis_client.hget(state.agg_key(2, "emu-9"), "client:conv.weight")
    assert len(stored) == client["conv.weight"].numel() * 4  # fp32 bytes, not the fp64 product
    _, server_sum, _ = state.load_partial_sum(redis_client, 2, "emu-9")
    assert torch.equal(server_sum.sums["fc.weight"], server["fc.weight"].double() * 10)


@pytest.mark.slow
def test_missing_buffer_names_the_device_and_key(redis_client):
    with pytest.raises(KeyError, match=r"emu-404.*hsfl:agg:3:emu-404"):
        state.load_partial_sum(redis_client, 3, "emu-404")


@pytest.mark.slow
def test_non_positive_weight_is_refused_and_stores_nothing(redis_client):
    client, server = _states(0)
    with pytest.raises(ValueError, match="weight must be positive"):
        state.store_session_result(redis_client, 4, "emu-0", client, server, 0, {})
    assert not redis_client.exists(state.agg_key(4, "emu-0"))
    assert not redis_client.sismember(state.done_key(4), "emu-0")


@pytest.mark.slow
def test_task_state_changes_wake_the_waiting_orchestrator(redis_client: redis.Redis):
    """``claim_ready`` and ``store_session_result`` push a wake-up for their round: the
    orchestrator's ``wait_notify`` returns as soon as a task changes the round (no polling), and
    returns after its timeout when nothing happens."""
    import threading
    import time

    rnd = 77
    t0 = time.monotonic()
    state.wait_notify(redis_client, rnd, 0.3)  # nothing queued: waits out its timeout
    assert time.monotonic() - t0 >= 0.25

    def claim_later() -> None:
        time.sleep(0.3)
        state.claim_ready(redis_client, rnd, "emu-0", "tok")

    worker = threading.Thread(target=claim_later)
    t0 = time.monotonic()
    worker.start()
    state.wait_notify(redis_client, rnd, 10.0)
    woke = time.monotonic() - t0
    worker.join()
    assert 0.25 <= woke < 5.0, woke  # woken by the claim, long before the 10 s timeout
    assert redis_client.hget(state.ready_key(rnd), "emu-0") == b"tok"
    assert redis_client.llen(state.notify_key(rnd)) == 0  # wake-ups are consumed

    client, server = _states(1)
    state.store_session_result(redis_client, rnd, "emu-0", client, server, 5, {})
    t0 = time.monotonic()
    state.wait_notify(redis_client, rnd, 10.0)  # the stored result's wake-up is already queued
    assert time.monotonic() - t0 < 5.0


@pytest.mark.slow
def test_a_heartbeat_keeps_its_key_alive_and_a_second_copy_stands_down(redis_client, monkeypatch):
    """A running task's ``alive`` key is renewed; a copy of the task (same round, attempt and device)
    cannot take it while it lives; once renewal stops the key expires and a new session may start."""
    monkeypatch.setattr(state, "ALIVE_TTL_S", 2)
    monkeypatch.setattr(state, "HEARTBEAT_S", 0.2)
    first = state.Heartbeat(redis_client, 5, "att1", "emu-0", "tok-a")
    assert first.start()
    try:
        time.sleep(2.5)  # longer than the TTL: only the renewals keep it
        assert redis_client.get(state.alive_key(5, "att1", "emu-0")) == b"tok-a"
        assert not state.Heartbeat(redis_client, 5, "att1", "emu-0", "tok-b").start()
        other_attempt = state.Heartbeat(redis_client, 5, "att2", "emu-0", "tok-c")
        assert other_attempt.start(), "another attempt of the round has its own key"
        other_attempt.stop()
    finally:
        first.stop()
    deadline = time.monotonic() + 5
    while redis_client.exists(state.alive_key(5, "att1", "emu-0")):
        assert time.monotonic() < deadline, "the key outlived its heartbeat"
        time.sleep(0.1)
    successor = state.Heartbeat(redis_client, 5, "att1", "emu-0", "tok-d")
    assert successor.start()
    successor.stop()
