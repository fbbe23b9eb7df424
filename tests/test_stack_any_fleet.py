"""One stack for any fleet: a stack started for boards (`harmony up --agents 0`) serves whatever
devices come online on it — here three "boards" added with `harmony fleet add --stack` and run by an
agent process as a flashed board runs one — with the stack's own credentials; every device of a
round trains at once (the worker's session threads do not cap it at two), and the run's events say
how long each session queued and how long its device trained."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from harmony.config import validate_config
from testbed.cli import app
from testbed.credentials import CredentialStore
from testbed.stack import load_stack
from tests.runtime_fixtures import paced_class, paced_step_s

ROOT = Path(__file__).resolve().parents[1]
BOARDS = ["board-0", "board-1", "board-2"]
STEPS = 6
BOARD_FLOPS = 60e6
"""The boards' class, paced by their agent: a step takes 1.5–4.4 s at depths 2–4, so a session lasts
9 s or more on any host, far longer than a session takes to get a worker thread."""
CONFIG = {
    "name": "any-fleet", "seed": 5,
    "data": {"num_shards": 6, "train_fraction": 0.02, "test_per_client": 20, "rhos": [0.0]},
    "model": {"family": "cnn8", "width": 0.25},
    "fleet": {"num_clients": 3, "split_depths": [2, 3, 4]},
    "train": {"algorithm": "splitgp", "rounds": 1, "batch_size": 16, "local_steps": STEPS},
    "eval": {"measure_latency_samples": 0},
}


@pytest.mark.slow
def test_boards_added_to_a_stack_without_agents_train_at_once_in_a_stack_run(tmp_path: Path) -> None:
    runner = CliRunner()
    stack_dir, cfg_path, out = tmp_path / "stack", tmp_path / "cfg.yaml", tmp_path / "out"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    result = runner.invoke(app, ["up", "--agents", "0", "--torch-threads", "1", "--run-dir", str(stack_dir)])
    assert result.exit_code == 0, result.output
    board = None
    try:
        for dev in BOARDS:
            result = runner.invoke(app, ["fleet", "add", dev, "--stack", str(stack_dir)])
            assert result.exit_code == 0, result.output
        info = load_stack(stack_dir)
        assert info.store is not None
        store = CredentialStore(info.store)
        logins = tmp_path / "boards.txt"
        logins.write_text("".join(f"{dev}:{store.device(dev).password}\n" for dev in BOARDS))
        argv = [sys.executable, "-m", "edge_agent", "--broker", f"127.0.0.1:{info.mqtt_port}",
                *(a for dev in BOARDS for a in ("--device-id", dev)), "--credentials", str(logins),
                *paced_class(tmp_path, "bench_board", BOARD_FLOPS)]
        with open(tmp_path / "boards.log", "wb") as log:
            board = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        # before: "fleet.num_clients = 3 but the stack … hosts 0 devices"
        result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--stack", str(stack_dir),
                                     "--devices-timeout", "180", "--out", str(out)])
        assert result.exit_code == 0, result.output + (tmp_path / "boards.log").read_text(errors="replace")[-3000:]
    finally:
        if board is not None:
            board.send_signal(signal.SIGINT)
            try:
                board.wait(30)
            except subprocess.TimeoutExpired:
                board.kill()
                board.wait(10)
        down = runner.invoke(app, ["down", "--run-dir", str(stack_dir)])
        assert down.exit_code == 0, down.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["devices"] == BOARDS
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    done = {e["device"]: e for e in events if e["event"] == "session_done"}
    assert sorted(done) == [0, 1, 2]
    cfg = validate_config(CONFIG)
    for client, e in done.items():
        assert e["queued_s"] >= 0 and e["train_s"] == pytest.approx(e["seconds"] - e["queued_s"])
        # what the device trained, by construction at least its paced steps
        assert e["train_s"] >= STEPS * paced_step_s(cfg, CONFIG["fleet"]["split_depths"][client], BOARD_FLOPS)
    # every session had its worker thread before any finished: none queued behind another (with the
    # two threads `harmony up --agents 0` used to give, the third waited for the first to finish)
    assert max(e["queued_s"] for e in done.values()) < min(e["seconds"] for e in done.values()), done
