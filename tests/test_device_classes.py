"""Each device's class and measured rates, as its ``hello`` reported them, in what a run records:
the plan (``results.json``'s ``fleet.profiles``, the manifest), the ``run_started``/``run_start`` and
``depth_assigned`` events, ``describe()``'s ``device_hellos`` and the evaluation's ``per_client``; and
the modelled latency (eq. 12) computed with the measured rates, not the figures of a class guessed
from the split depth. Real mosquitto and redis-server; the devices are MQTT clients announcing a
``hello`` as an agent does."""

from __future__ import annotations

import dataclasses
import json

import pytest

from broker.client import BrokerClient
from broker.topics import Topics
from harmony.assignment import Measurement
from harmony.engine import Engine, LocalEngine
from harmony.experiment import Experiment
from harmony.latency import modelled_latency_s
from harmony.profiles import get_profile
from harmony.version import installed_version
from orchestrator.fleet import MqttCeleryFleet
from server import state
from testbed.monitor.runlog import RunEventLog, iter_events
from tests.broker.broker_samples import sample_messages
from tests.conftest import tiny_config

# the seven-device bench of the report, shrunk: a Jetson Nano, a Pi 4 and a Pi Zero 2 W
DEVICES = {"jetson-nano-0": ("jetson_nano", 30e9, 90e6), "pi4-0": ("pi4", 9e9, 95e6),
           "pi-zero-2-0": ("pi_zero_2", 2.5e9, 19e6)}


def _announce(port: int, device: str, cls: str, conv: float, uplink: float) -> BrokerClient:
    client = BrokerClient(f"agent-{device}", "127.0.0.1", port, topics=Topics(), device_id=device, clean_start=True,
                          session_expiry_s=0)
    client.connect()
    hello = dataclasses.replace(sample_messages()["hello"], agent_version=installed_version(), device_class=cls,
                                rates={"conv": conv, "depthwise": conv / 3, "attention": conv / 2},
                                uplink_bps=uplink, memory_bytes=get_profile(cls).memory_bytes, gflops=213.8)
    client.announce(client.topics.hello(device), hello).wait(10)
    client.publish_status("idle").wait(10)
    return client


@pytest.mark.slow
def test_a_measured_fleet_records_each_devices_own_class_and_rates(broker_and_redis, tmp_path):
    port, url = broker_and_redis
    agents = [_announce(port, dev, cls, conv, up) for dev, (cls, conv, up) in DEVICES.items()]
    cfg = tiny_config(**{"fleet.num_clients": 3, "fleet.split_depths": None, "fleet.assignment": "measured",
                         "fleet.step_budget_s": 0.05})
    fleet = MqttCeleryFleet(Experiment.plan(cfg), mqtt=("127.0.0.1", port), redis_url=url, devices_timeout_s=30)
    try:
        ex = fleet.experiment
        classes = [DEVICES[dev][0] for dev in fleet.device_ids]
        assert ex.profiles == classes  # not ["pi_zero_2"] * 3, the by-depth guess made before the hellos
        assert len(set(ex.depths)) > 1  # the classes got different depths from their rates
        for i, dev in enumerate(fleet.device_ids):
            _, conv, uplink = DEVICES[dev]
            profile = ex.client_profile(i)  # what the latency model and the simulated clock use
            assert (profile.compute_flops, profile.uplink_bps) == (conv, uplink)
            assert profile.source.startswith("hello:")
        hellos = fleet.describe()["device_hellos"]
        assert [h["device_class"] for h in hellos] == classes
        assert [h["rates"]["conv"] for h in hellos] == [DEVICES[d][1] for d in fleet.device_ids]

        # the events: the run's own log (run_start) and the stack's stream (run_started, depth_assigned)
        engine = Engine(ex, fleet)
        log = RunEventLog(tmp_path / "run")
        log.begin(engine)
        log.close()
        (start,) = [e for e in iter_events(tmp_path / "run" / "events.jsonl") if e["event"] == "run_start"]
        assert start["profiles"] == classes and start["devices"] == fleet.device_ids
        assert [f["compute_flops"] for f in start["figures"]] == [DEVICES[d][1] for d in fleet.device_ids]
        fleet.begin_run(resume=False)
        r = state.connect(url)
        stream = [(f[b"name"].decode(), {k.decode(): json.loads(v) for k, v in f.items() if k != b"name"})
                  for _, f in r.xrange(state.events_key())]
        (started,) = [doc for name, doc in stream if name == "run_started"]
        assert started["classes"] == classes
        assigned = {doc["device"]: doc for name, doc in stream if name == "depth_assigned"}
        assert {dev: doc["device_class"] for dev, doc in assigned.items()} == {d: c for d, (c, _, _) in DEVICES.items()}
        # the manifest the agents and workers rebuild the plan from names the same classes
        manifest = json.loads(r.get(state.config_key(fleet.manifest_sha)))
        assert manifest["profiles"] == classes
    finally:
        fleet.close()
        for agent in agents:
            agent.close()


def test_the_modelled_latency_uses_the_measured_rates_and_the_results_name_the_class(tmp_path):
    """The local engine on a plan whose depths were decided from measurements (what the distributed
    runtime does with the hellos): per_client carries the class and the rates, and eq. 12 is computed
    with the measured compute rate and uplink."""
    cfg = tiny_config(**{"fleet.num_clients": 2, "fleet.split_depths": None, "fleet.profiles": ["pi_zero_2", "pi4"],
                         "train.rounds": 1, "train.local_steps": 1})
    engine = LocalEngine(cfg, tmp_path / "run")
    ex = engine.experiment
    measured = [Measurement("jetson-nano-0", 31e9, 4 * 2**30, 88e6, "hello: conv 31.00 GFLOP/s (measured)"),
                Measurement("pi4-0", 9.5e9, 4 * 2**30, 97e6, "hello: conv 9.50 GFLOP/s (measured)")]
    ex.assign_measured(measured)
    ex.record_classes(["jetson_nano", None])  # the second device named no class: guessed from its depth
    results = engine.run()
    per_client = results["evaluation"]["per_client"]
    assert results["fleet"]["profiles"][0] == "jetson_nano" and per_client[0]["profile"] == "jetson_nano"
    server = get_profile(cfg.eval.server_profile).compute_flops
    for c, m in zip(per_client, measured, strict=True):
        assert (c["compute_flops"], c["uplink_bps"]) == (m.compute_flops, m.uplink_bps)
        row = c["rho"][0]
        expected = modelled_latency_s(ex.costs[c["split_depth"]], row["offload_probability"], m.compute_flops,
                                      m.uplink_bps, server, cfg.eval.bits_per_element)
        assert row["latency_ms"] == pytest.approx(1e3 * expected, rel=1e-12)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["fleet"]["profiles"][0] == "jetson_nano"
    # harmony report's device table: the class and the rates the latency model used
    from testbed.report import write_run_report

    write_run_report(tmp_path / "run", tsne=False)
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<td>jetson_nano</td>" in page and "<td>31.00</td>" in page and "<td>88.0</td>" in page
    assert "hello: conv 31.00 GFLOP/s (measured)" in page


def test_the_agent_log_says_what_its_hello_said_and_the_host_benchmark_apart():
    """An emulated Pi Zero 2 W's hello measured conv 1.31 GFLOP/s (paced) while the host's unpaced
    matmul ran at 213.8: the registration line gives the hello's rates as the device's, the host's
    benchmark separately, never the host's figure as the device's rate."""
    from edge_agent.agent import registration_line
    from edge_agent.emulation import DeviceLimits

    hello = dataclasses.replace(sample_messages()["hello"], cores=1, cpus=0.06, memory_bytes=512 * 2**20,
                                gflops=213.8, rates={"conv": 1.31e9, "depthwise": 0.52e9, "attention": 0.8e9},
                                uplink_bps=19.4e6, rtt_ms=10.6, device_class="pi_zero_2")
    line = registration_line("pi-zero-2-0", hello, DeviceLimits(get_profile("pi_zero_2")))
    assert line.startswith("device pi-zero-2-0: registered with 1 core(s), 0.06 CPUs, 512 MiB, training rates "
                           "conv 1.31, depthwise 0.52, attention 0.80 GFLOP/s (measured, paced to pi_zero_2's 3)")
    assert "uplink 19.4 Mbit/s" in line and "round trip 10.6 ms" in line
    assert line.endswith("the host's unpaced matmul benchmark: 213.8 GFLOP/s")
    assert line.index("1.31") < line.index("213.8")
