"""``harmony up`` / ``run --runtime distributed`` / ``down`` and the distributed-overhead benchmark's smoke size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from broker.mosquitto import free_port
from testbed.cli import app
from testbed.stack import load_stack

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny-cli", "seed": 3,
    "data": {"num_shards": 8, "train_fraction": 0.02, "test_per_client": 20, "rhos": [0.0]},
    "model": {"family": "cnn8", "width": 0.25},
    "fleet": {"num_clients": 4, "split_depths": [2, 3, 4, 2]},
    "train": {"algorithm": "splitgp", "rounds": 1, "batch_size": 16, "local_steps": 2},
    "eval": {"measure_latency_samples": 0},
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.slow
def test_up_run_down(tmp_path):
    runner = CliRunner()
    stack_dir, cfg_path, out = tmp_path / "stack", tmp_path / "tiny.yaml", tmp_path / "out"
    cfg_path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["up", "--agents", "1", "--devices-per-agent", "4", "--torch-threads", "1",
                                 "--insecure", "--run-dir", str(stack_dir)])  # an open broker: --broker below
    assert "is open (started with --insecure)" in " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    pids = load_stack(stack_dir).pids
    assert set(pids) == {"mosquitto", "redis", "worker", "orchestrator", "agent-0"}
    for name in ("worker", "agent-0"):  # --torch-threads reaches the processes that run torch
        environ = Path(f"/proc/{pids[name]}/environ").read_bytes().split(b"\0")
        assert b"OMP_NUM_THREADS=1" in environ, name
    # 32 session threads by default (more than the 4 devices), so every device of a round trains at once,
    # also those that join the stack later
    argv = Path(f"/proc/{pids['worker']}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--concurrency") + 1] == b"32" and load_stack(stack_dir).worker_concurrency == 32
    try:
        result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--stack", str(stack_dir),
                                     "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "is open (started with --insecure)" in " ".join(result.output.split())  # on every run over it
        doc = json.loads((out / "results.json").read_text())
        assert doc["runtime"] == "distributed" and len(doc["rounds"]) == 1
        assert doc["devices"] == ["emu-0", "emu-1", "emu-2", "emu-3"]
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]  # harmony monitor
        assert events[0]["event"] == "run_start" and events[0]["devices"] == doc["devices"]
        assert sum(e["event"] == "session_done" for e in events) == doc["rounds"][0]["participants"]
        # a run larger than the devices online (all four are: the run above waited for them) stops
        # after --devices-timeout, naming those online
        too_big = tmp_path / "too-big.yaml"
        too_big.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "num_shards": 12},
                                           "fleet": {"num_clients": 6, "split_depths": [2, 3, 4]}}))
        result = runner.invoke(app, ["run", str(too_big), "--runtime", "distributed", "--stack", str(stack_dir),
                                     "--devices-timeout", "3", "--out", str(tmp_path / "nothing")])
        message = " ".join(result.output.split())  # rich wraps long lines
        assert result.exit_code == 2, result.output
        assert "fleet.num_clients = 6 but 4 device(s) are online after 3 s (emu-0, emu-1, emu-2, emu-3)" in message
        assert "--set fleet.num_clients=4" in message
        assert not (tmp_path / "nothing" / "results.json").exists()
        # the same fleet addressed by its broker and Redis (as for a remote or containerised fleet)
        info = load_stack(stack_dir)
        result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--broker",
                                     f"127.0.0.1:{info.mqtt_port}", "--redis", info.redis_url, "--out", str(out / "b")])
        assert result.exit_code == 0, result.output
        again = json.loads((out / "b" / "results.json").read_text())
        assert again["evaluation"]["accuracy"] == doc["evaluation"]["accuracy"]
        # --devices-timeout holds on the --stack path too: with the agent gone the run stops in seconds
        os.kill(pids["agent-0"], signal.SIGKILL)
        t0 = time.monotonic()
        result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--stack", str(stack_dir),
                                     "--devices-timeout", "3", "--out", str(out / "c")])
        message = " ".join(result.output.split())
        assert result.exit_code == 2 and "fleet.num_clients = 4 but 0 device(s) are online" in message, result.output
        assert json.loads((out / "c" / "events.jsonl").read_text().splitlines()[-1])["event"] == "run_failed"
        assert time.monotonic() - t0 < 30
    finally:
        result = runner.invoke(app, ["down", "--run-dir", str(stack_dir)])
    assert result.exit_code == 0, result.output
    assert not any(_alive(pid) for pid in pids.values())
    assert (stack_dir / "worker.log").is_file() and (stack_dir / "agent-0.log").is_file()
    # the worker runs as root here; it accepts JSON only, so Celery's superuser warning is silenced (server.app)
    assert "superuser privileges" not in (stack_dir / "worker.log").read_text()


def test_run_rejects_unknown_runtime(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    result = CliRunner().invoke(app, ["run", str(cfg_path), "--runtime", "grpc"])
    assert result.exit_code == 2 and "expected local or distributed" in result.output


def test_run_fleet_options_errors(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(cfg_path), "--broker", "127.0.0.1:1", "--redis", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2 and "add --runtime distributed" in result.output
    result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--broker", "127.0.0.1:1"])
    assert result.exit_code == 2 and "--broker and --redis go together" in " ".join(result.output.split())
    result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--broker", "nohost",
                                 "--redis", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2 and "expected HOST:PORT" in result.output
    port = free_port()  # nothing listens there: the error names the broker, no results are written
    result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--broker", f"127.0.0.1:{port}",
                                 "--redis", f"redis://127.0.0.1:{free_port()}/0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert str(port) in result.output
    assert not (tmp_path / "o" / "results.json").exists()


def test_down_without_stack(tmp_path):
    result = CliRunner().invoke(app, ["down", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no stack was started" in result.output


@pytest.mark.slow
def test_distributed_overhead_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/distributed_overhead.py", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "distributed_overhead"
    assert result["wall_ratio"] > 0 and result["bytes_ratio"] >= 1.0 and result["steps"] > 0
