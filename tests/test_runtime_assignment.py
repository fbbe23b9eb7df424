"""Split depths from measured resources, with real processes (mosquitto, redis-server, a Celery
worker, two agent processes, one emulating devices 100× slower than the host): `harmony fleet plan
--stack` and a distributed run give the fast and the slow devices different depths from what
their agents measured."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
import yaml

from broker.client import BrokerClient
from harmony.assignment import from_hello, step_needs
from harmony.experiment import Experiment
from orchestrator.engine import DistributedEngine
from orchestrator.registry import online_profiles
from server import state
from testbed.stack import REPO_ROOT, LocalStack
from tests.conftest import tiny_config

SLOW = 100.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path_factory.mktemp("assign-stack"))
    s.start(agents=1, devices_per_agent=2, registry=False)
    s.add_agent(["emu-2", "emu-3"], ["--slowdown", str(SLOW)])
    try:
        yield s
    finally:
        s.stop()


def _hellos(stack: LocalStack) -> dict[str, dict]:
    assert stack.info is not None
    client = BrokerClient(f"test-{uuid.uuid4().hex[:6]}", *stack.info.mqtt, clean_start=True, session_expiry_s=0)
    client.connect()
    try:
        return online_profiles(client, 4, timeout=90)
    finally:
        client.close()


def _config(hellos: dict[str, dict]):
    """A measured-assignment config whose step budget lies between what the deepest depth needs on
    the fast devices and what the second-shallowest needs on the slow ones (a factor ≥ 3 either side)."""
    cfg = tiny_config(**{"fleet.split_depths": None, "fleet.assignment": "measured", "train.rounds": 1,
                         "train.local_steps": 2})
    ex = Experiment.plan(cfg)
    rate = {dev: from_hello(dev, h, "cnn8").compute_flops for dev, h in hellos.items()}
    depths = sorted(ex.costs)

    def need(depth: int, flops: float) -> float:
        return step_needs(ex.costs[depth], batch_size=cfg.train.batch_size,
                          batches_per_step=ex.algorithm.batches_per_step, momentum=cfg.train.momentum,
                          bits_per_element=cfg.eval.bits_per_element, compute_flops=flops, uplink_bps=1e12).compute_s

    fast_deep = max(need(depths[-1], rate[d]) for d in ("emu-0", "emu-1"))
    slow_second = min(need(depths[1], rate[d]) for d in ("emu-2", "emu-3"))
    assert slow_second > 9 * fast_deep, (rate, "the slow devices did not measure slow enough to tell apart")
    return cfg.with_overrides(**{"fleet.step_budget_s": math.sqrt(fast_deep * slow_second)}), depths


@pytest.mark.slow
def test_slow_devices_measure_slow_and_get_shallow_depths(stack, tmp_path):
    hellos = _hellos(stack)
    assert sorted(hellos) == ["emu-0", "emu-1", "emu-2", "emu-3"]
    for dev, hello in hellos.items():
        assert set(hello["rates"]) == {"conv", "depthwise", "attention"}, dev
        assert hello["uplink_bps"] > 1e6 and hello["rtt_ms"] > 0, dev  # the link probe ran through the broker
    cfg, depths = _config(hellos)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "testbed.cli", "fleet", "plan", str(config), "--stack",
                          str(stack.run_dir), "--json"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    plan = {row["device"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert [plan[d]["depth"] for d in ("emu-0", "emu-1")] == [depths[-1]] * 2
    assert [plan[d]["depth"] for d in ("emu-2", "emu-3")] == [depths[0]] * 2
    assert plan["emu-0"]["reason"].startswith(f"depth {depths[-1]}: the deepest allowed fits")
    assert plan["emu-2"]["reason"].startswith(f"depth {depths[0]}") and "s/step of compute > budget" in \
        plan["emu-2"]["reason"]
    assert "(measured)" in plan["emu-2"]["source"]

    # the run assigns the same depths and trains at them
    assert stack.info is not None
    engine = DistributedEngine(cfg, tmp_path / "run", mqtt=stack.info.mqtt, redis_url=stack.info.redis_url,
                               devices_timeout_s=60, round_timeout_s=300)
    try:
        record = engine.run_round(1)
    finally:
        engine.close()
    assert engine.experiment.depths == [plan[d]["depth"] for d in ("emu-0", "emu-1", "emu-2", "emu-3")]
    assert record.participants == 4
    r = state.connect(stack.info.redis_url)
    assigned = {json.loads(f[b"device"]): json.loads(f[b"depth"]) for _, f in r.xrange(state.events_key())
                if f[b"name"] == b"depth_assigned"}
    assert assigned == {d: plan[d]["depth"] for d in plan}
    # each session reported the seconds its device computed; the slow devices' count the pacing
    compute = {dev: state.session_meta(r, 1, dev)["device_compute_s"] for dev in plan}
    assert all(c > 0 for c in compute.values()), compute
