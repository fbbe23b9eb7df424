"""The `harmony` command as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from testbed.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _harmony(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def _tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 1,
        "data": {"num_shards": 6, "train_fraction": 0.02, "test_per_client": 20, "rhos": [0.0, 0.4]},
        "model": {"width": 0.25},
        "fleet": {"num_clients": 3},
        "train": {"rounds": 1, "batch_size": 16},
        "eval": {"measure_latency_samples": 1},
    }))
    return path


@pytest.mark.slow
def test_run_writes_results(tmp_path):
    out = tmp_path / "out"
    proc = _harmony("run", str(_tiny_yaml(tmp_path)), "--set", "train.algorithm=multi-exit", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["algorithm"] == "multi-exit"
    assert results["evaluation"]["rho"] == [0.0, 0.4]
    assert "accuracy" in proc.stdout
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0] == "run_start" and events[-1] == "run_done" and "round_end" in events  # harmony monitor --run-dir


@pytest.mark.slow
def test_compare_writes_the_documented_shape(tmp_path):
    out = tmp_path / "cmp"
    proc = _harmony("compare", str(_tiny_yaml(tmp_path)), "--algorithms", "splitfed,splitgp(lambda=1)",
                    "--seeds", "2", "--out", str(out), "--jobs", "2")  # runs side by side, one bar each
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "compare.json").read_text())
    assert doc["rho"] == [0.0, 0.4]
    assert [r["algorithm"] for r in doc["rows"]] == ["splitfed", "splitgp(lambda=1)"]
    for row in doc["rows"]:
        assert len(row["accuracy"]) == len(row["ci95"]) == len(row["latency_ms"]) == 2
        assert all(c >= 0 for c in row["ci95"])
    assert (out / "splitfed" / "seed1" / "results.json").is_file()
    assert (out / "splitfed" / "seed2" / "results.json").is_file()


def _harmony_here(*args: str) -> Result:
    """``harmony ARGS`` in this process (Typer's runner): for the commands that fail before any work,
    where a fresh interpreter (importing torch) would be most of the test's time."""
    return CliRunner().invoke(app, list(args))


def test_bad_config_exits_2_naming_the_key(tmp_path):
    result = _harmony_here("run", str(_tiny_yaml(tmp_path)), "--set", "train.rounds=0", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "train.rounds = 0" in result.output
    assert not (tmp_path / "x").exists()  # no state changed
    result = _harmony_here("compare", str(_tiny_yaml(tmp_path)), "--algorithms", "splitfed,fedsgd")
    assert result.exit_code == 2 and "unknown algorithm 'fedsgd'" in result.output


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    result = _harmony_here("run", str(_tiny_yaml(tmp_path)), "--out", str(tmp_path / "fresh"), "--resume")
    assert result.exit_code == 2 and "no checkpoint" in result.output


@pytest.mark.slow
def test_a_retried_round_is_told_once_in_the_same_words_and_the_bar_counts_every_session(tmp_path):
    """A round below quorum: one line per failed try, saying what the engine does next ("trying
    again", then "giving up" on the last), never twice; the progress bar's count never passes its
    total (a retry adds its sessions to both)."""
    out = tmp_path / "out"
    retried = _harmony("run", str(_tiny_yaml(tmp_path)), "--out", str(out), "--set", "train.rounds=2",
                       "--set", "fleet.quorum=3", "--set", "fleet.dropout_probability=0.3",
                       "--set", "fleet.round_retries=30")
    assert retried.returncode == 0, retried.stderr
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    failed_tries = sum(r["attempts"] - 1 for r in rounds)
    assert failed_tries > 0, "the seed retries nothing; the test would show nothing"
    assert retried.stderr.count("trying again") == failed_tries, retried.stderr
    assert "giving up" not in retried.stderr
    bar = re.findall(r"evaluating\W*(\d+)/(\d+)", retried.stderr)  # the bar as the run ends
    sessions = sum(3 * r["attempts"] for r in rounds)  # (an upper bound: a lost try may end early)
    assert bar and bar[-1][0] == bar[-1][1] and int(bar[-1][0]) <= sessions, retried.stderr
    stuck = _harmony("run", str(_tiny_yaml(tmp_path)), "--out", str(tmp_path / "stuck"), "--set",
                     "fleet.quorum=3", "--set", "fleet.dropout_probability=0.9", "--set", "fleet.round_retries=1")
    assert stuck.returncode == 2
    warnings = [line for line in stuck.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2, stuck.stderr  # (the error that follows lists the tries again, as the reason)
    assert warnings[0].endswith("; trying again") and warnings[1].endswith("; giving up"), warnings
    assert stuck.stderr.count("trying again") == 1 and stuck.stderr.count("giving up") == 1
    assert "fell below quorum in all 2 tries" in stuck.stderr
