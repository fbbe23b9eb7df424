"""Emulated device classes with enforced limits (testbed/emulate.py, edge_agent/emulation.py), with
real processes: mosquitto, redis-server, a Celery worker and agent processes held to their class by
a cgroup CPU quota, ``tc tbf`` in a network namespace, or the agent's own pacing and token bucket.

Two classes well below this host's speed (Pi Zero 2 W at 3 GFLOP/s, Pi 4 at 10) measure a step
time (the device compute seconds their sessions report) and an uplink (their ``hello``) within
±15 % of the class's figures, and the orchestrator's measured assignment gives them different
split depths. Everything the fleet made (cgroups, namespaces, veths) is gone afterwards."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from broker.client import BrokerClient
from edge_agent.emulation import StepPacer, TokenBucket
from harmony.assignment import from_hello, step_needs
from harmony.experiment import Experiment
from harmony.profiles import Availability, get_profile
from orchestrator.engine import DistributedEngine
from orchestrator.registry import online_profiles
from server import state
from testbed.emulate import (
    EmulatedFleet,
    EmulationError,
    Host,
    detect_host,
    leftovers,
    parse_profile_option,
    plan_fleet,
)
from testbed.stack import REPO_ROOT, LocalStack
from tests.conftest import tiny_config

TOLERANCE = 0.15
HOST = detect_host() if sys.platform.startswith("linux") else None
needs_root = pytest.mark.skipif(HOST is None or not (HOST.cpu_cgroup and HOST.netns and HOST.memory_cgroup),
                                reason="needs root, writable cgroup v1 cpu/memory and ip netns + tc")


# ------------------------------------------------------------------------------------ units
def test_profile_options_accept_cli_spellings_and_refuse_bad_counts():
    assert parse_profile_option("pi-zero2:5") == ("pi_zero_2", 5)
    assert parse_profile_option("jetson-nano") == ("jetson_nano", 1)
    for bad, fragment in (("pi4:0", "positive integer"), ("pi4:x", "CLASS:N"), ("pi9:2", "pi_zero_2")):
        with pytest.raises(EmulationError, match=fragment):
            parse_profile_option(bad)


def test_plan_says_per_class_what_enforces_what_and_refuses_a_class_faster_than_the_host():
    root = Host(root=True, cpu_cgroup=True, memory_cgroup=True, netns=True, training_flops=30e9)
    plans = plan_fleet([("pi4", 2), ("jetson_nano", 1)], root)
    pi4, nano = plans
    assert pi4.compute == "cgroup+pacing" and pi4.link == "netns" and pi4.memory and pi4.per_process
    assert math.isclose(pi4.cpus, 1.5 * 10e9 / 30e9)
    assert pi4.row()["uplink"].startswith("tc tbf in a netns") and pi4.row()["memory"] == "cgroup 4096 MiB"
    assert nano.compute == "host" and "faster than one core" in nano.note  # 35 GFLOP/s > 30
    plain = Host(root=False, cpu_cgroup=False, memory_cgroup=False, netns=False, training_flops=30e9)
    (zero,) = plan_fleet([("pi_zero_2", 3)], plain)
    assert (zero.compute, zero.link, zero.memory, zero.per_process) == ("pacing", "agent", False, False)
    assert zero.agent_limits == ["compute", "uplink", "downlink", "latency"]
    assert zero.row()["memory"] == "not enforced" and zero.row()["compute"].startswith("agent pacing")
    with pytest.raises(EmulationError, match="--compute cgroup"):
        plan_fleet([("pi4", 1)], plain, compute="cgroup")
    with pytest.raises(EmulationError, match="--link netns"):
        plan_fleet([("pi4", 1)], plain, link="netns")


def test_token_bucket_and_step_pacer_hold_their_rates():
    bucket = TokenBucket(8e6, burst_bytes=1000)  # 1 MB/s
    t0 = time.perf_counter()
    for _ in range(20):
        bucket.consume(10_000)
    # the limit holds (never faster); slower only by a sleep's overshoot, which the bucket credits to the
    # next transfer, so at most the last one's: up to half a second on a loaded 2-core host
    assert 0.85 * 0.2 < time.perf_counter() - t0 < 1.15 * 0.2 + 0.5
    pacer = StepPacer(0.05)
    t0 = time.perf_counter()
    with pacer.phase():
        time.sleep(0.01)
    spent = time.perf_counter() - t0
    assert pacer.finish() == pytest.approx(0.05 - spent, abs=1e-3)
    assert time.perf_counter() - t0 >= 0.05
    with pacer.phase():  # a phase longer than the target: nothing to add
        time.sleep(0.06)
    assert pacer.finish() == 0.0


# ------------------------------------------------------------------------------------ real processes
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path_factory.mktemp("emulate-stack"))
    s.start(agents=0, registry=False, worker_concurrency=4)
    try:
        yield s
    finally:
        s.stop()


def _hellos(stack: LocalStack, n: int, timeout: float = 90) -> dict[str, dict]:
    assert stack.info is not None
    client = BrokerClient(f"test-{uuid.uuid4().hex[:6]}", *stack.info.mqtt, clean_start=True, session_expiry_s=0)
    client.connect()
    try:
        return online_profiles(client, n, timeout=timeout)
    finally:
        client.close()


def _budget_between(cfg, hellos: dict[str, dict], fast: str, slow: str) -> float:
    """A step budget the fast device's deepest depth fits and the slow device's does not: their
    geometric mean. `fleet plan` decides from the same retained hellos, so any margin separates
    them; on an idle host the Pi 4's need is ~3× smaller, under load its micro-benchmark (a small
    conv layer this host runs at ~14 GFLOP/s alone) may come out nearer the Pi Zero 2 W's."""
    ex = Experiment.plan(cfg)
    deepest = ex.costs[max(ex.costs)]

    def need(dev: str) -> float:
        m = from_hello(dev, hellos[dev], "cnn8")
        n = step_needs(deepest, batch_size=cfg.train.batch_size, batches_per_step=ex.algorithm.batches_per_step,
                       momentum=cfg.train.momentum, bits_per_element=cfg.eval.bits_per_element,
                       compute_flops=m.compute_flops, uplink_bps=m.uplink_bps)
        return max(n.compute_s, n.uplink_s)

    assert need(slow) > 1.2 * need(fast), hellos
    return math.sqrt(need(fast) * need(slow))


@needs_root
@pytest.mark.slow
def test_two_classes_run_at_their_rates_and_get_different_depths(stack, tmp_path):
    """Pi Zero 2 W and Pi 4, one device each, paced by the agent, their links shaped by tc tbf in a
    namespace each, memory capped by a cgroup: hello measures the shaped uplink within ±15 %, the
    measured assignment gives the Pi 4 a deeper split, and each session's device compute per step
    is within ±15 % of the step's FLOPs ÷ the class's rate. (The CPU quota, this host's default
    besides the pacing, is tested below: under it every non-training second of a 0.1-CPU device
    takes ten, too long for the suite.)"""
    assert HOST is not None and stack.info is not None
    plans = plan_fleet([("pi_zero_2", 1), ("pi4", 1)], HOST, compute="pacing", id_prefix="t-")
    assert [(p.compute, p.link, p.memory) for p in plans] == [("pacing", "netns", True)] * 2
    fleet = EmulatedFleet(plans, stack.info.mqtt, tmp_path / "emulate")
    try:
        fleet.start()
        hellos = _hellos(stack, 2)
        assert fleet.failures() == []
        zero, pi4 = "t-pi-zero-2-0", "t-pi4-0"
        assert sorted(hellos) == [zero, pi4]
        for dev, cls in ((zero, "pi_zero_2"), (pi4, "pi4")):
            hello, profile = hellos[dev], get_profile(cls)
            assert hello["device_class"] == cls
            assert abs(hello["uplink_bps"] / profile.uplink_bps - 1) < TOLERANCE, (dev, hello["uplink_bps"])
            assert hello["memory_bytes"] == profile.memory_bytes  # the cgroup limit, read back by the probe
            assert hello["rtt_ms"] >= 2 * profile.latency_ms  # the agent's latency is in the round trip
        assert hellos[zero]["rates"]["conv"] < hellos[pi4]["rates"]["conv"]

        # half-width cnn8: this host trains it near the rate the classes are measured against
        cfg = tiny_config(**{"fleet.num_clients": 2, "fleet.split_depths": None, "fleet.assignment": "measured",
                             "train.rounds": 1, "train.local_steps": 6, "model.width": 0.5})
        cfg = cfg.with_overrides(**{"fleet.step_budget_s": _budget_between(cfg, hellos, pi4, zero)})
        config = tmp_path / "cfg.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        out = subprocess.run([sys.executable, "-m", "testbed.cli", "fleet", "plan", str(config), "--stack",
                              str(stack.run_dir), "--json"], capture_output=True, text=True, timeout=120,
                             cwd=REPO_ROOT)
        assert out.returncode == 0, out.stderr
        plan = {row["device"]: row for row in map(json.loads, out.stdout.splitlines())}
        assert plan[pi4]["depth"] > plan[zero]["depth"], plan
        assert "(measured)" in plan[zero]["source"]

        engine = DistributedEngine(cfg, tmp_path / "run", mqtt=stack.info.mqtt, redis_url=stack.info.redis_url,
                                   devices_timeout_s=60, round_timeout_s=300)
        try:
            engine.run_round(1)
        finally:
            engine.close()
        ex = engine.experiment
        r = state.connect(stack.info.redis_url)
        for dev, cls in ((zero, "pi_zero_2"), (pi4, "pi4")):
            depth = plan[dev]["depth"]
            meta = state.session_meta(r, 1, dev)
            steps = ex.steps(meta["index"])
            target = step_needs(ex.costs[depth], batch_size=cfg.train.batch_size,
                                batches_per_step=ex.algorithm.batches_per_step, momentum=cfg.train.momentum,
                                bits_per_element=cfg.eval.bits_per_element,
                                compute_flops=get_profile(cls).compute_flops, uplink_bps=1.0).compute_s
            per_step = meta["device_compute_s"] / steps
            assert abs(per_step / target - 1) < TOLERANCE, (dev, per_step, target)
    finally:
        fleet.stop()
    assert leftovers(fleet.tag) == []


@pytest.mark.slow
@needs_root
def test_an_out_of_memory_kill_is_a_reported_device_failure(stack, tmp_path):
    """A class whose memory cannot hold the agent: the kernel kills it at the cgroup limit, and the
    fleet reports that device as failed by the out-of-memory killer (no hang, no silent loss)."""
    assert HOST is not None and stack.info is not None
    profile = replace(get_profile("pi_zero_2"), name="tiny_board", memory_bytes=48 * 2**20)
    plans = plan_fleet([("tiny_board", 1)], HOST, profiles={"tiny_board": profile}, compute="pacing", link="agent",
                       id_prefix="oom-")
    fleet = EmulatedFleet(plans, stack.info.mqtt, tmp_path / "emulate")
    try:
        fleet.start()
        deadline = time.monotonic() + 60
        while not fleet.failures() and time.monotonic() < deadline:
            time.sleep(0.2)
        (failure,) = fleet.failures()
        assert failure.devices == ["oom-tiny-board-0"]
        assert "out-of-memory killer" in failure.reason and "48 MiB" in failure.reason
    finally:
        fleet.stop()
    assert leftovers(fleet.tag) == []


@pytest.mark.slow
def test_a_class_with_off_periods_is_power_cycled_and_comes_back_as_a_restarted_device(stack, tmp_path):
    """availability {on_s, off_s}: at an off period the device's process is killed (its last will
    says offline, and it is no failure of the fleet); at the next on period it starts again and
    announces a new started_at, which is how the round driver knows to assign it again. The
    periods are stepped here by handing power_cycle the times, not by waiting them out."""
    assert stack.info is not None
    profile = replace(get_profile("pi4"), name="blinky", availability=Availability(on_s=60.0, off_s=30.0))
    profiles_file = tmp_path / "profiles.yaml"
    profiles_file.write_text(yaml.safe_dump({"blinky": {
        "compute_flops": int(profile.compute_flops), "uplink_bps": int(profile.uplink_bps),
        "memory_bytes": profile.memory_bytes, "cores": profile.cores, "source": "a test class",
        "availability": {"on_s": 60, "off_s": 30}}}))
    host = HOST or Host(False, False, False, False, 30e9)
    (plan,) = plan_fleet([("blinky", 1)], host, profiles={"blinky": profile}, compute="pacing", link="agent",
                         memory=False, id_prefix="b-")
    assert plan.per_process and plan.row()["availability"] == "power-cycled: on 60 s, off 30 s"
    fleet = EmulatedFleet([plan], stack.info.mqtt, tmp_path / "emulate", extra_agent_args=["--profiles",
                                                                                         str(profiles_file)])
    dev = "b-blinky-0"
    monitor = BrokerClient(f"test-{uuid.uuid4().hex[:6]}", *stack.info.mqtt, clean_start=True, session_expiry_s=0)
    monitor.connect()
    try:
        hellos = monitor.subscribe(monitor.topics.hello(dev))
        statuses = monitor.subscribe(monitor.topics.status(dev))

        def next_body(sub, want, timeout: float = 60.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                message = sub.get(max(0.1, deadline - time.monotonic()))
                body = message.decode(monitor.max_bytes).body
                if want(body):
                    return body
            raise AssertionError(f"nothing wanted on {sub} within {timeout} s")

        fleet.start()
        first = next_body(hellos, lambda b: True)
        assert fleet.power_cycle(fleet._started + 1.0) == []  # inside the on period: nothing changes
        assert fleet.power_cycle(fleet._started + 61.0) == [(dev, "off")]
        next_body(statuses, lambda b: b.state == "offline", timeout=15)  # the last will, at once
        assert fleet.failures() == [] and fleet.alive() == 1  # switched off, not failed
        assert fleet.power_cycle(fleet._started + 91.0) == [(dev, "on")]
        again = next_body(hellos, lambda b: b.started_at != first.started_at)
        assert again.started_at > first.started_at and again.device_class == "blinky"
        next_body(statuses, lambda b: b.state == "idle")
        assert fleet.failures() == []
    finally:
        monitor.close()
        fleet.stop()
    assert fleet.failures() == []


@pytest.mark.slow
def test_agent_pacing_and_token_bucket_without_root_methods(stack, tmp_path):
    """The methods of a host without root, forced here: two Pi Zero 2 W devices in ONE agent
    process, held by the agent's own pacing and token bucket, measure the class's compute rate
    (on the hello's conv layer, which this host runs ~5× faster) and uplink."""
    assert stack.info is not None
    host = HOST or Host(False, False, False, False, 30e9)
    (plan,) = plan_fleet([("pi_zero_2", 2)], host, compute="pacing", link="agent", memory=False, id_prefix="p-")
    assert not plan.per_process
    fleet = EmulatedFleet([plan], stack.info.mqtt, tmp_path / "emulate")
    try:
        fleet.start()
        assert len(fleet._procs) == 1  # many devices per process where the method allows it
        hellos = _hellos(stack, 2)
        profile = get_profile("pi_zero_2")
        for dev in ("p-pi-zero-2-0", "p-pi-zero-2-1"):
            hello = hellos[dev]
            assert abs(hello["uplink_bps"] / profile.uplink_bps - 1) < TOLERANCE, hello["uplink_bps"]
            assert abs(hello["rates"]["conv"] / profile.compute_flops - 1) < TOLERANCE, hello["rates"]
            assert hello["device_class"] == "pi_zero_2"
            assert hello["rtt_ms"] >= 2 * profile.latency_ms
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path_factory.mktemp("emulate-tls-stack"))
    s.start(agents=0, registry=False, worker_concurrency=2, tls=True)
    try:
        yield s
    finally:
        s.stop()


@needs_root
@pytest.mark.slow
def test_the_command_enforces_a_cpu_quota_over_tls_trains_and_cleans_up(tls_stack, tmp_path):
    """`harmony fleet emulate --profile pi4:1 --stack DIR` against a `harmony up --tls` stack, on this
    host's defaults: the table names the methods (cgroup quota + pacing, tc tbf in a netns, memory
    cgroup); the device gets its credentials in the stack's store and connects over TLS with its
    own client certificate through its namespace; its agent runs in its quota's cgroup, the kernel
    throttles it there and its hello reports that quota and the class's memory; a distributed round
    over TLS trains it; after SIGINT no cgroup, namespace or veth of the fleet is left."""
    info = tls_stack.info
    assert info is not None and info.tls
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "250"}
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "fleet", "emulate", "--profile", "pi4:1",
                             "--stack", str(tls_stack.run_dir), "--id-prefix", "cli-"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while not any("named hemu-" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        tag = re.search(r"named hemu-([0-9a-f]{4})-", "".join(lines)).group(1)
        user, password = info.orchestrator_login()
        client = BrokerClient(f"test-{uuid.uuid4().hex[:6]}", *info.service_mqtt, username=user, password=password,
                              tls=info.service_tls("orchestrator"), clean_start=True, session_expiry_s=0)
        client.connect()
        try:
            hello = online_profiles(client, 1, timeout=60)["cli-pi4-0"]
        finally:
            client.close()
        cgroup = Path(f"/sys/fs/cgroup/cpu/hemu-{tag}-0")
        quota = int((cgroup / "cpu.cfs_quota_us").read_text()) / int((cgroup / "cpu.cfs_period_us").read_text())
        assert hello["cpus"] == pytest.approx(quota, rel=1e-3) and quota < 1
        assert hello["memory_bytes"] == get_profile("pi4").memory_bytes
        throttled = dict(line.split() for line in (cgroup / "cpu.stat").read_text().splitlines())
        assert int(throttled["nr_throttled"]) > 0  # the sustained hello benchmark ran into the quota

        cfg = tiny_config(**{"fleet.num_clients": 1, "fleet.split_depths": [2], "train.rounds": 1,
                             "train.local_steps": 2})
        engine = DistributedEngine(cfg, tmp_path / "run", mqtt=info.service_mqtt, redis_url=info.redis_url,
                                   username=user, password=password, tls=info.service_tls("orchestrator"),
                                   devices_timeout_s=60, round_timeout_s=300)
        try:
            record = engine.run_round(1)
        finally:
            engine.close()
        assert record.participants == 1
    finally:
        proc.send_signal(2)
        output = "".join(lines) + proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert "cgroup quota" in output and "agent pacing" in output and "tc tbf in a netns" in output, output
    assert "cgroup 4096 MiB" in output and "over TLS" in output, output
    assert leftovers(tag) == []
