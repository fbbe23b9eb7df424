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
import signal
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
from edge_agent.probe import own_cgroups
from harmony.assignment import from_hello, step_needs
from harmony.experiment import Experiment
from harmony.profiles import Availability, get_profile
from orchestrator.engine import DistributedEngine
from orchestrator.registry import online_profiles
from server import state
from testbed.emulate import (
    RESTART_DELAYS_S,
    STATE_FILE,
    EmulatedFleet,
    EmulationError,
    Host,
    _Process,
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
    # 35 GFLOP/s > 30: paced without a quota (it holds the class whenever the host is faster than measured)
    assert nano.compute == "pacing" and nano.cpus is None and nano.beyond_host and "faster than one core" in nano.note
    (alone,) = plan_fleet([("jetson_nano", 1)], root, compute="cgroup")
    assert alone.compute == "host" and "not emulated" in alone.note  # a quota alone cannot hold it
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


def _crashing_fleet(tmp_path: Path, profile=None, restart: bool = True) -> tuple[EmulatedFleet, _Process]:
    """A fleet of one device whose "agent" is `true`: it ends at once, as a crashed agent does, so the
    supervisor's decisions can be stepped through by handing it the times."""
    host = Host(False, False, False, False, 30e9)
    profiles = None if profile is None else {profile.name: profile}
    (plan,) = plan_fleet([(profile.name if profile else "pi4", 1)], host, compute="pacing", link="agent",
                         memory=False, profiles=profiles)
    tmp_path.mkdir(parents=True, exist_ok=True)
    fleet = EmulatedFleet([plan], ("127.0.0.1", 1), tmp_path, restart=restart)

    def launch() -> subprocess.Popen[bytes]:
        return subprocess.Popen(["true"])

    fleet._started = time.monotonic()
    p = _Process("agent-0", plan.devices, plan, launch(), tmp_path / "agent.log", None, start=launch,
                 started=time.monotonic())
    fleet._procs.append(p)
    p.proc.wait(10)
    return fleet, p


def test_the_supervisor_restarts_an_ended_agent_with_back_off(tmp_path):
    fleet, p = _crashing_fleet(tmp_path)
    (failure,) = fleet.failures()
    assert "starting it again in 1 s" in failure.reason and p.state == "restarting" and fleet.alive() == 1
    assert fleet.supervise(now=p.restart_at - 0.5) == []  # not before its back-off
    first_pid = p.proc.pid
    ((devices, pid),) = fleet.supervise(now=p.restart_at)
    assert devices == ["pi4-0"] and pid == p.proc.pid != first_pid and p.restarts == 1
    delays = []
    for _ in range(6):  # it keeps crashing at once: the delay doubles up to its ceiling
        p.proc.wait(10)
        fleet.failures()
        delays.append(p.delay_s)
        fleet.supervise(now=p.restart_at)
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0] and RESTART_DELAYS_S == (1.0, 30.0)
    state = json.loads((tmp_path / STATE_FILE).read_text())  # what `harmony fleet ps` reads
    assert state["agents"][0]["restarts"] == 7 and state["agents"][0]["pid"] == p.proc.pid
    p.proc.wait(10)
    p.started -= 120  # one that ran a while before it ended starts after the shortest delay again
    fleet.failures()
    assert p.delay_s == 1.0
    fleet.stop()
    assert not (tmp_path / STATE_FILE).exists()


def test_fleet_ps_lists_the_agents_and_refuses_a_missing_or_stale_state(tmp_path):
    from typer.testing import CliRunner

    from testbed.cli import app

    result = CliRunner().invoke(app, ["fleet", "ps", "--stack", str(tmp_path)])
    assert result.exit_code == 2 and "no emulated fleet runs against" in result.output
    assert "harmony fleet emulate --stack" in result.output
    fleet, p = _crashing_fleet(tmp_path / "emulate")
    fleet.write_state()
    result = CliRunner().invoke(app, ["fleet", "ps", "--stack", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    (agent,) = json.loads(result.output)["agents"]
    assert agent["pid"] == p.proc.pid and agent["devices"] == ["pi4-0"] and agent["state"] == "ended"
    state = json.loads((tmp_path / "emulate" / STATE_FILE).read_text())
    state["supervisor_pid"] = 2**22 + 1  # above pid_max: no such process
    (tmp_path / "emulate" / STATE_FILE).write_text(json.dumps(state))
    result = CliRunner().invoke(app, ["fleet", "ps", "--stack", str(tmp_path)])
    assert result.exit_code == 2 and "no longer running" in " ".join(result.output.split())  # (wrapped to the terminal)


def test_without_restarts_an_ended_agent_stays_a_failure(tmp_path):
    fleet, p = _crashing_fleet(tmp_path, restart=False)
    (failure,) = fleet.failures()
    assert "starting it again" not in failure.reason and p.state == "ended"
    assert fleet.supervise(now=time.monotonic() + 3600) == [] and fleet.alive() == 0


def test_a_power_cycled_device_that_crashed_keeps_its_class_schedule(tmp_path):
    """Crashed during an on period: restarted after its back-off. Crashed just before an off period:
    not started while its class is off, but at the next on period, as the power cycle says."""
    profile = replace(get_profile("pi4"), name="blinky", availability=Availability(on_s=60.0, off_s=30.0))
    fleet, p = _crashing_fleet(tmp_path, profile)
    fleet.failures()
    assert len(fleet.supervise(now=fleet._started + 10)) == 1  # on: restarted
    p.proc.wait(10)
    fleet.failures()
    p.restart_at = fleet._started + 61  # its back-off ends inside the off period (60–90 s)
    assert fleet.supervise(now=fleet._started + 61) == [] and p.state == "off" and fleet.alive() == 1
    assert fleet.power_cycle(fleet._started + 70) == []  # still off
    assert fleet.power_cycle(fleet._started + 91) == [("blinky-0", "on")] and p.state in ("running", "ended")
    p.proc.wait(10)
    fleet.stop()


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
            # the class's step time, or — where the host's work alone took longer (a loaded host) —
            # the agent saying plainly that the host is too slow for the class
            pacing = re.search(rf"device {dev} round 1 pacing: target ([0-9.]+) s/step, realised [0-9.]+, host work "
                               rf"([0-9.]+)(; the host is too slow for class {cls})?", _agent_logs(fleet))
            assert pacing is not None and float(pacing.group(1)) == pytest.approx(target, abs=1e-4)
            if float(pacing.group(2)) > target:
                assert pacing.group(3) is not None and per_step > target, (dev, pacing.group(0))
            else:
                assert abs(per_step / target - 1) < TOLERANCE, (dev, per_step, target, pacing.group(0))
    finally:
        fleet.stop()
    assert leftovers(fleet.tag) == []


def _agent_logs(fleet: EmulatedFleet) -> str:
    return "".join(p.log.read_text(errors="replace") for p in fleet._procs)


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
    """`harmony fleet emulate --profile pi-zero2:1 --stack DIR` against a `harmony up --tls` stack, on
    this host's defaults: the table names the methods (cgroup quota + pacing, tc tbf in a netns,
    memory cgroup); the device gets its credentials in the stack's store and connects over TLS with
    its own client certificate through its namespace; its agent runs in its quota's cgroup, the
    kernel throttles it there and its hello reports that quota (as the table gave it, or raised by
    the agent where it held the class back on a loaded host) and the class's memory; a distributed
    round over TLS trains it; after SIGINT no cgroup, namespace or veth of the fleet is left. (The
    slowest class: a quota even on a host under heavy load.)"""
    info = tls_stack.info
    assert info is not None and info.tls
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "250"}
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "fleet", "emulate", "--profile", "pi-zero2:1",
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
            hello = online_profiles(client, 1, timeout=120)["cli-pi-zero-2-0"]
        finally:
            client.close()
        cgroup = Path(f"/sys/fs/cgroup/cpu/hemu-{tag}-0")
        quota = int((cgroup / "cpu.cfs_quota_us").read_text()) / int((cgroup / "cpu.cfs_period_us").read_text())
        planned = float(re.search(r"cgroup quota ([0-9.]+) CPU", "".join(lines)).group(1))
        assert hello["cpus"] == pytest.approx(quota, rel=1e-3) and planned - 1e-3 <= quota <= 1.0
        assert hello["memory_bytes"] == get_profile("pi_zero_2").memory_bytes
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
    assert "cgroup 512 MiB" in output and "over TLS" in output, output
    assert leftovers(tag) == []


def _fleet_ps(stack_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "testbed.cli", "fleet", "ps", "--stack", str(stack_dir), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _start_emulate(stack: LocalStack, *args: str) -> tuple[subprocess.Popen[str], list[str], str]:
    """`harmony fleet emulate` against ``stack``, read up to its agents table; (process, lines, tag)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "300"}
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "fleet", "emulate", "--stack", str(stack.run_dir),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO_ROOT)
    lines: list[str] = []
    assert proc.stdout is not None
    def read_until(marker: str) -> None:
        while not lines or marker not in lines[-1]:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)

    try:
        read_until("named hemu-")
        read_until("┃ devices")  # the agents table, once they are started
        read_until("└")
    except BaseException:
        proc.send_signal(signal.SIGINT)  # it removes what it made
        proc.communicate(timeout=60)
        raise
    tag = re.search(r"named hemu-([0-9a-f]{4})-", "".join(lines)).group(1)
    return proc, lines, tag


def _next_hello(sub, monitor: BrokerClient, want, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = sub.get(max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        body = message.decode(monitor.max_bytes).body
        if want(body):
            return body
    raise AssertionError(f"no wanted hello within {timeout} s")


@needs_root
@pytest.mark.slow
def test_fleet_emulate_restarts_a_killed_agent_inside_its_namespace_and_cgroups(stack, tmp_path):
    """`kill -9` of an emulated device's agent: `fleet emulate` reports it, starts it again after its
    back-off in the same network namespace and the same CPU and memory cgroups, the device registers
    again (a new hello.started_at); `fleet ps` and the emulate output list its PIDs, namespace and
    cgroups."""
    assert stack.info is not None
    dev = "sup-pi-zero-2-0"  # the slowest class: emulated with a CPU quota even on a host under heavy load
    monitor = BrokerClient(f"test-{uuid.uuid4().hex[:6]}", *stack.info.mqtt, clean_start=True, session_expiry_s=0)
    monitor.connect()
    hellos = monitor.subscribe(monitor.topics.hello(dev))
    proc, lines, tag = _start_emulate(stack, "--profile", "pi-zero2:1", "--id-prefix", "sup-",
                                      "--compute", "cgroup+pacing")
    try:
        first = _next_hello(hellos, monitor, lambda b: True)
        (agent,) = _fleet_ps(stack.run_dir)["agents"]
        assert agent["devices"] == [dev] and agent["state"] == "running" and agent["restarts"] == 0
        ns, cgroups = agent["netns"], agent["cgroups"]
        assert ns == f"hemu-{tag}-0"
        assert sorted(cgroups) == [f"/sys/fs/cgroup/{c}/hemu-{tag}-0" for c in ("cpu", "memory")]
        assert str(agent["pid"]) in "".join(lines) and ns in "".join(lines)  # the emulate output lists them too

        os.kill(agent["pid"], signal.SIGKILL)
        again = _next_hello(hellos, monitor, lambda b: b.started_at != first.started_at)
        assert again.started_at > first.started_at and again.device_class == "pi_zero_2"
        (after,) = _fleet_ps(stack.run_dir)["agents"]
        assert after["restarts"] == 1 and after["state"] == "running" and after["pid"] != agent["pid"]
        assert (after["netns"], after["cgroups"]) == (ns, cgroups)
        pid = after["pid"]
        membership = own_cgroups(Path(f"/proc/{pid}/cgroup"))
        assert membership["cpu"] == f"hemu-{tag}-0" and membership["memory"] == f"hemu-{tag}-0"
        identify = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
        assert identify.stdout.split() == [ns]
    finally:
        monitor.close()
        proc.send_signal(signal.SIGINT)
        output = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert f"device failure: {dev} (pi_zero_2): killed (SIGKILL)" in output, output
    assert output.count("killed (SIGKILL)") == 1 and output.count("started again") == 0, output  # said once
    assert "starting it again in 1 s" in output, output
    assert f"device restarted: {dev} (pid {pid}" in output, output
    assert leftovers(tag) == [] and not (stack.run_dir / "emulate" / STATE_FILE).exists()


@needs_root
@pytest.mark.slow
def test_fleet_emulate_no_restart_leaves_a_killed_agent_dead(stack, tmp_path):
    assert stack.info is not None
    proc, lines, tag = _start_emulate(stack, "--profile", "pi4:1", "--id-prefix", "dead-", "--no-restart",
                                      "--link", "agent", "--no-memory")
    try:
        (agent,) = _fleet_ps(stack.run_dir)["agents"]
        os.kill(agent["pid"], signal.SIGKILL)
        output = "".join(lines) + proc.communicate(timeout=60)[0]  # its only agent is gone for good: it ends
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "device failure: dead-pi4-0 (pi4): killed (SIGKILL)" in output and "device restarted" not in output, output
    assert "starting it again" not in output and "1 agent process(es) failed" in output, output
    assert leftovers(tag) == []
