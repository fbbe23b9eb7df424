"""Split depths from measured resources: the rule on synthetic measurements, and the plan built on it."""

from __future__ import annotations

import json

import pytest
import yaml

from harmony.assignment import Measurement, MeasurementError, choose_depth, from_hello, step_needs
from harmony.config import ConfigError
from harmony.engine import Engine, LocalEngine
from harmony.experiment import Experiment
from harmony.fleet import InProcessFleet
from harmony.models.base import DepthCost
from tests.conftest import tiny_config

GIB = 2**30


def _cost(d: int, flops: int, cut: int, param_bytes: int, activations: int) -> DepthCost:
    return DepthCost(split_depth=d, client_flops=flops, exit_head_flops=0, client_params=param_bytes // 4,
                     exit_head_params=0, client_param_bytes=param_bytes, cut_elements=cut, server_flops=1,
                     server_params=1, activation_elements=activations)


# three depths: deeper costs more compute and memory, sends fewer cut-layer elements
COSTS = {1: _cost(1, 1_000_000, 8_000, 4_000, 10_000), 2: _cost(2, 4_000_000, 2_000, 400_000, 30_000),
         3: _cost(3, 16_000_000, 500, 40_000_000, 60_000)}
RULE = {"budget_s": 0.5, "batch_size": 10, "batches_per_step": 1, "momentum": 0.9, "bits_per_element": 16}


def _device(flops: float, memory: int = 4 * GIB, uplink: float = 100e6) -> Measurement:
    return Measurement("dev", flops, memory, uplink, "synthetic")


def test_step_needs_count_compute_uplink_and_memory():
    n = step_needs(COSTS[2], batch_size=10, batches_per_step=2, momentum=0.9, bits_per_element=16,
                   compute_flops=1e9, uplink_bps=1e6)
    assert n.compute_s == pytest.approx(3 * 20 * 4_000_000 / 1e9)  # forward + backward ≈ 3× forward
    assert n.uplink_s == pytest.approx(20 * 2_000 * 16 / 1e6)
    assert n.memory_bytes == 3 * 400_000 + 4 * 20 * 30_000  # weights, grads, momentum; fp32 activations
    plain = step_needs(COSTS[2], batch_size=10, batches_per_step=2, momentum=0.0, bits_per_element=16,
                       compute_flops=1e9, uplink_bps=1e6)
    assert n.memory_bytes - plain.memory_bytes == 400_000  # no momentum buffer


def test_a_fast_device_gets_the_deepest_depth_and_says_everything_fits():
    d = choose_depth(COSTS, _device(1e12), **RULE)
    assert d.depth == 3 and d.reason.startswith("depth 3: the deepest allowed fits")


def test_compute_decides_and_the_reason_names_the_next_depth():
    # depth 3 needs 3·10·16e6 / 1e9 = 0.48 s: fits at 1 GFLOP/s, not at 0.5
    assert choose_depth(COSTS, _device(1e9), **RULE).depth == 3
    d = choose_depth(COSTS, _device(0.5e9), **RULE)
    assert d.depth == 2
    assert d.reason == "depth 2: depth 3 needs 0.96 s/step of compute > budget 0.5 s"


def test_uplink_decides_when_the_link_is_slow():
    # depth 1 sends 10·8000·16 bit = 1.28 Mbit a step: over a 2 Mbit/s link 0.64 s > 0.5 s
    d = choose_depth(COSTS, _device(1e12, uplink=2e6), **RULE)
    assert d.depth == 3  # deeper depths send less: the slow link pushes towards depth
    d = choose_depth({1: COSTS[1]}, _device(1e12, uplink=2e6), **RULE)
    assert d.depth == 1 and "nothing fits" in d.reason and "s/step of uplink > budget 0.5 s" in d.reason


def test_memory_decides_on_a_small_board():
    # depth 3 keeps 3 × 40 MB of weights, gradients and momentum plus 4 × 10 × 60,000 bytes of
    # activations = 122.4 MB = 116.7 MiB: too much for 64 MiB
    d = choose_depth(COSTS, _device(1e12, memory=64 * 2**20), **RULE)
    assert d.reason == "depth 2: depth 3 needs 116.7 MiB > 64.0 MiB available"


def test_nothing_fits_takes_the_shallowest_and_says_so():
    d = choose_depth(COSTS, _device(1e6), **RULE)
    assert d.depth == 1 and "the shallowest; nothing fits" in d.reason


def test_hello_gives_the_family_rate_not_the_matmul_rate():
    hello = {"memory_bytes": GIB, "uplink_bps": 5e7, "gflops": 50.0,
             "rates": {"conv": 2e9, "depthwise": 5e8, "attention": 8e9}}
    assert from_hello("pi-1", hello, "cnn8").compute_flops == 2e9
    assert from_hello("pi-1", hello, "mobilenet_v2").compute_flops == 5e8
    assert from_hello("pi-1", hello, "vit_s").compute_flops == 8e9
    with pytest.raises(MeasurementError, match="device pi-1: hello.rates has no measured 'conv' rate"):
        from_hello("pi-1", {**hello, "rates": None}, "cnn8")
    with pytest.raises(MeasurementError, match="hello.uplink_bps is 0.0"):
        from_hello("pi-1", {**hello, "uplink_bps": 0.0}, "cnn8")


def _measured(**overrides):
    return tiny_config(**{"fleet.split_depths": None, "fleet.assignment": "measured", **overrides})


def test_measured_plan_gives_slow_profiles_shallow_depths():
    ex = Experiment.plan(_measured(**{"fleet.profiles": ["pi_zero_2", "pi4", "jetson_nano"],
                                      "fleet.step_budget_s": 0.02}))
    assert ex.depths == [2, 3, 4, 2]
    assert [d.depth for d in ex.decisions] == ex.depths
    assert ex.decisions[1].reason.startswith("depth 3: depth 4 needs")


def test_measured_plan_from_measurements_and_a_redecision():
    ex = Experiment.plan(_measured(**{"fleet.step_budget_s": 0.01}))
    rates = [1e8, 1e10, 1e12, 1e12]
    decisions = ex.assign_measured([Measurement(f"d{i}", r, 4 * GIB, 1e9, "synthetic") for i, r in enumerate(rates)])
    assert ex.depths == [d.depth for d in decisions] and ex.depths[0] < ex.depths[2]
    # device 2 turns out 10,000× slower than its measurement: it is moved to the shallowest depth
    slow = ex.redecide(2, 10_000 * decisions[2].needs.compute_s)
    assert slow.depth == min(ex.template.split_depths)
    assert "re-measured" in slow.measurement.source


def test_measured_assignment_rejects_fixed_depths_and_local_runs_without_profiles(tmp_path):
    with pytest.raises(ConfigError, match="assignment: measured decides the depths itself"):
        tiny_config(**{"fleet.assignment": "measured"})  # tiny_config gives split_depths
    with pytest.raises(ConfigError, match="reassign_drift re-decides measured depths"):
        tiny_config(**{"fleet.reassign_drift": 0.2})
    with pytest.raises(ValueError, match="needs fleet.profiles"):
        LocalEngine(_measured(), tmp_path)
    assert not any(tmp_path.iterdir())


class _ReportingFleet(InProcessFleet):
    """The in-process fleet, with devices that report their client compute time as a board does,
    at their true rates: the measured ones, except client 0, which is ``slow`` times slower."""

    def __init__(self, experiment: Experiment, slow: float) -> None:
        super().__init__(experiment)
        assert experiment.decisions is not None
        self.true_rates = {i: d.measurement.compute_flops / (slow if i == 0 else 1.0)
                           for i, d in enumerate(experiment.decisions)}

    def train(self, rnd, starts, server_start, plan):
        ex = self.experiment
        for result in super().train(rnd, starts, server_start, plan):
            if result.status == "done":
                i = result.client
                step = step_needs(ex.costs[ex.depths[i]], batch_size=ex.cfg.train.batch_size,
                                  batches_per_step=ex.algorithm.batches_per_step, momentum=ex.cfg.train.momentum,
                                  bits_per_element=16, compute_flops=self.true_rates[i], uplink_bps=1e9)
                result.extra["compute_s"] = step.compute_s * ex.steps(i)
            yield result


def test_a_device_that_drifts_is_reassigned_and_trains_at_its_new_depth(tmp_path):
    cfg = _measured(**{"fleet.profiles": ["jetson_nano"], "fleet.step_budget_s": 0.05, "fleet.reassign_drift": 0.5,
                       "train.rounds": 2})
    ex = Experiment.plan(cfg)
    assert ex.depths == [4, 4, 4, 4]
    events: list[tuple[str, dict]] = []
    engine = Engine(ex, _ReportingFleet(ex, slow=1000.0), tmp_path, lambda e, **f: events.append((e, f)))
    results = engine.run()
    first, second = results["rounds"]
    # only client 0 drifted; it was re-decided from what it measured and moved to the shallowest depth
    assert [(e["client"], e["from_depth"], e["to_depth"]) for e in first["reassigned"]] == [(0, 4, 2)]
    assert first["reassigned"][0]["measured_step_s"] == pytest.approx(1000 * first["reassigned"][0]["estimated_step_s"])
    assert [f["client"] for e, f in events if e == "reassigned"] == [0]
    assert results["fleet"]["split_depths"] == [2, 4, 4, 4]
    decided = results["fleet"]["assignment"][0]
    assert decided["depth"] == 2 and "re-measured" in decided["source"]
    # round 2: client 0 now measures as estimated at depth 2 — no drift, no second move
    assert second["reassigned"] == [] and second["participants"] == 4
    assert results["evaluation"]["per_client"][0]["split_depth"] == 2


def test_fleet_plan_prints_each_device_and_what_decided_it(tmp_path):
    from typer.testing import CliRunner

    from testbed.cli import app

    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(_measured(**{"fleet.profiles": ["pi_zero_2", "pi4", "jetson_nano"],
                                                  "fleet.step_budget_s": 0.02}).model_dump(mode="json")))
    out = CliRunner().invoke(app, ["fleet", "plan", str(config), "--json"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert [r["depth"] for r in rows] == [2, 3, 4, 2]
    assert rows[1]["reason"].startswith("depth 3: depth 4 needs") and "profile pi4" in rows[1]["source"]
    bad = CliRunner().invoke(app, ["fleet", "plan", str(config), "--set", "fleet.profiles=null"])
    assert bad.exit_code == 2 and "add --stack DIR or --broker HOST:PORT" in bad.output
