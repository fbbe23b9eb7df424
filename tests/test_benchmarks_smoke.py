"""Smoke sizes of the benchmarks: they run and print their JSON line (figures, not targets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # long: out of make test-fast
def test_engine_throughput_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/engine_throughput.py", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "engine_throughput"
    assert result["ratio_to_floor"] > 0 and result["gflops"] > 0 and result["matmul_gflops"] > 0


@pytest.mark.slow  # long: out of make test-fast
def test_speed_options_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/speed_options.py", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "speed_options"
    assert set(result["seconds_per_step"]) == {"contiguous", "channels_last", "bf16_autocast", "compile",
                                               "vmap_8", "loop_8"}
    assert all(v > 0 for v in result["seconds_per_step"].values())
    assert result["time_vs_channels_last"]["channels_last"] == 1.0


@pytest.mark.slow  # long: out of make test-fast
def test_personalisation_probe_smoke(tmp_path):
    """Tiny: trains one round, evaluates the same model without and with two fine-tuning steps, on
    the validation split (50 samples per client by default). The un-personalised variant must
    reproduce the devices' own validation sweep of that model."""
    tiny = ["fleet.num_clients=4", "data.num_shards=8", "data.train_fraction=0.05", "model.width=0.25",
            "train.rounds=1", "train.finetune_steps=0"]
    argv = [sys.executable, "benchmarks/personalisation_probe.py", "--algorithm", "multi-exit", "--out",
            str(tmp_path / "probe"), "--variants", "none,2:0.01:0"]
    for item in tiny:
        argv += ["--set", item]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "personalisation_probe"
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"none", "2:0.01:0"}
    for row in rows.values():
        assert all(0.0 <= row[k] <= 100.0 for k in ("exit_id", "server_id", "server_ood", "oracle_rho0",
                                                      "oracle_rho08"))

    from harmony.config import load_config
    from harmony.engine import LocalEngine
    from harmony.evaluate import server_predictor

    engine = LocalEngine(load_config(ROOT / "examples" / "fmnist-shard2-50.yaml", ["train.algorithm=multi-exit",
                                                                                   "data.val_per_client=50", *tiny]))
    engine.train()

    def validation_scores():
        engine.fleet.server_model.load_state_dict(engine.server_global)
        predict = server_predictor(engine.fleet.server_model)
        out = []
        for i, device in engine.fleet.devices.items():
            model = engine.fleet.client_models[device.depth]
            model.load_state_dict(engine.client_start_state(i))
            out.append(device.evaluate(model, predict, measure=False, split="validation").scores)
        return out

    scores = engine.fleet.torch.call(validation_scores)
    for k, key in ((0, "oracle_rho0"), (-1, "oracle_rho08")):
        expected = 100 * sum(s[k].oracle.accuracy for s in scores) / len(scores)
        assert abs(expected - rows["none"][key]) < 0.01


@pytest.mark.slow
def test_fleet_scale_smoke():
    """4 devices in 2 agent processes over a real stack: one warm round, its overhead and memory figures."""
    proc = subprocess.run([sys.executable, "benchmarks/fleet_scale.py", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "fleet_scale" and result["failed"] == {}
    assert result["devices_completed"] == 4
    size = result["sizes"]["4"]
    assert size["agents"] == 2 and size["hosted"] == [2, 2]
    assert size["compute_cpu_s"]["device"] > 0 and size["compute_cpu_s"]["server"] > 0
    assert size["round_s"] > 0 and all(rss > 0 for rss in size["rss_mb_per_agent"])
    assert set(size["split_s"]) == {"publish", "sessions", "aggregate", "load"}


@pytest.mark.slow  # long: out of make test-fast
def test_sim_fleet_scale_smoke():
    """20 and 200 registered devices, 10 training per round on the simulated clock."""
    proc = subprocess.run([sys.executable, "benchmarks/sim_fleet_scale.py", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "sim_fleet_scale" and result["registered"] == 200
    assert set(result["sizes"]) == {"20", "200"}
    for size in result["sizes"].values():
        assert size["participants"] == 10 and size["sessions_timed"] == 10
        assert size["rounds_per_s"] > 0 and size["peak_rss_mb"] >= size["rss_mb"] * 0.9
    assert "idle_device_kb" in result


@pytest.mark.slow
def test_emulation_accuracy_smoke():
    """One Pi 4 device paced by its agent (no root needed), one round of 3 steps: its step time and
    hello uplink come out near the class's figures (the full run: benchmarks/RESULTS.md §6)."""
    proc = subprocess.run([sys.executable, "benchmarks/emulation_accuracy.py", "--methods", "pacing/agent",
                           "--classes", "pi4", "--rounds", "1", "--steps", "3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "emulation_accuracy"
    (row,) = result["rows"]
    assert row["class"] == "pi4" and row["enforced_compute"] == "pacing"
    assert 0.85 < row["step_ratio"] < 1.3 and 0.85 < row["uplink_ratio"] < 1.15, row


@pytest.mark.slow
def test_agent_footprint_smoke():
    """One agent, one tiny cnn8 device, a real session on a local stack; a venv with the agent extra."""
    proc = subprocess.run([sys.executable, "benchmarks/agent_footprint.py", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "agent_footprint"
    assert 0 < result["idle_rss_mib"] <= result["peak_rss_mib"] and result["loaded_rss_mib"] <= result["peak_rss_mib"]
    assert result["session_s"] > 0 and 0 <= result["accuracy_rho0"] <= 100
    assert "harmony-testbed" in result["distributions"] and result["celery_or_redis"] == []
