"""``harmony compare --jobs N``: runs in parallel processes give the table a serial sweep gives."""

from __future__ import annotations

import json

import pytest

from edge_agent.probe import host_cores
from testbed.compare import compare
from tests.conftest import tiny_config


def _cfg(**overrides):
    # 4 steps a round instead of an epoch (28): what is compared is the same, a seventh of the training
    return tiny_config(**{"train.rounds": 2, "train.local_steps": 4, "eval.measure_latency_samples": 0, **overrides})


@pytest.mark.slow  # worker processes (harmony compare --jobs)
def test_parallel_runs_give_the_serial_table_bit_for_bit(tmp_path):
    cfg = _cfg(threads=1)
    serial = compare(cfg, ["splitfed", "multi-exit"], 2, tmp_path / "serial")
    events: list[tuple[str, dict]] = []
    parallel = compare(cfg, ["splitfed", "multi-exit"], 2, tmp_path / "parallel",
                       lambda e, **f: events.append((e, f)), jobs=2)
    for a, b in zip(serial["rows"], parallel["rows"], strict=True):
        assert a["algorithm"] == b["algorithm"]
        assert a["accuracy_per_seed"] == b["accuracy_per_seed"]
        assert a["latency_ms"] == b["latency_ms"]
    # the workers' progress reaches the caller, each event naming its run
    labels = {"splitfed seed 7", "splitfed seed 8", "multi-exit seed 7", "multi-exit seed 8"}
    assert {f["run"] for e, f in events if e == "run_start"} == labels
    assert sorted(f["run"] for e, f in events if e == "run_done") == sorted(labels)
    rounds = [(f["run"], f["round"]) for e, f in events if e == "round_start"]
    assert sorted(rounds) == sorted((run, r) for run in labels for r in (1, 2))
    written = json.loads((tmp_path / "parallel" / "compare.json").read_text())["rows"]
    assert [r["accuracy_per_seed"] for r in written] == [r["accuracy_per_seed"] for r in serial["rows"]]


@pytest.mark.slow  # worker processes (harmony compare --jobs)
def test_parallel_runs_record_their_thread_count(tmp_path):
    compare(_cfg(), ["splitfed"], 2, tmp_path, jobs=2)
    for seed in (7, 8):
        written = json.loads((tmp_path / "splitfed" / f"seed{seed}" / "results.json").read_text())["config"]
        assert written["threads"] == max(1, host_cores() // 2)


@pytest.mark.slow  # worker processes (harmony compare --jobs)
def test_a_failed_run_stops_new_runs_and_keeps_the_finished_ones(tmp_path):
    (tmp_path / "splitfed").mkdir()
    # the first run handed out fails as it starts (its directory is a file), so no other run can have
    # finished before the failure is seen, however slowly the second worker process starts
    (tmp_path / "splitfed" / "seed7").write_text("a file where the run directory should be")
    events: list[tuple[str, dict]] = []
    with pytest.raises(OSError):
        # a whole epoch a round (not _cfg's 4 steps): seed 8 must still be running when seed 7's failure is seen
        compare(_cfg(threads=1, **{"train.local_steps": None}), ["splitfed", "multi-exit"], 2, tmp_path,
                lambda e, **f: events.append((e, f)), jobs=2)
    failed = [f for e, f in events if e == "run_failed"]
    assert [f["run"] for f in failed] == ["splitfed seed 7"] and "seed7" in failed[0]["error"]
    assert (tmp_path / "splitfed" / "seed8" / "results.json").is_file()  # handed out already: finished and kept
    assert not (tmp_path / "multi-exit").exists()  # queued behind the failure: never started


def test_jobs_needs_an_output_directory_and_a_positive_count(tmp_path):
    with pytest.raises(ValueError, match="needs an output directory"):
        compare(_cfg(), ["splitfed"], 2, None, jobs=2)
    with pytest.raises(ValueError, match="--jobs 0"):
        compare(_cfg(), ["splitfed"], 2, tmp_path, jobs=0)
    assert not any(tmp_path.iterdir())
