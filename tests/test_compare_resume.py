"""``harmony compare --resume``: an interrupted sweep continues where it stopped and ends with the
table an uninterrupted sweep gives."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from harmony.engine import LocalEngine
from testbed.compare import compare
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    pass


# The sweeps train 4 steps a round instead of an epoch (28): resuming, re-evaluating and the tables
# are checked the same, at a seventh of the training.


@pytest.mark.slow  # long: out of make test-fast
def test_resume_reuses_finished_runs_and_continues_interrupted_ones(tmp_path):
    cfg = tiny_config(**{"train.rounds": 2, "train.local_steps": 4, "eval.measure_latency_samples": 0})
    full = compare(cfg, ["splitfed"], 2, tmp_path / "full")

    def stop_after_seed8_round1(event: str, **f) -> None:
        if event == "run_start":
            stop_after_seed8_round1.seed = f["seed"]
        if event == "round_end" and stop_after_seed8_round1.seed == 8:
            raise Interrupted  # as if the process died: round 1's checkpoint is on disk

    out = tmp_path / "cut"
    with pytest.raises(Interrupted):
        compare(cfg, ["splitfed"], 2, out, stop_after_seed8_round1)
    finished = out / "splitfed" / "seed7" / "results.json"
    before = finished.stat().st_mtime_ns
    assert not (out / "splitfed" / "seed8" / "results.json").exists()

    events: list[tuple[str, dict]] = []
    resumed = compare(cfg, ["splitfed"], 2, out, lambda e, **f: events.append((e, f)), resume=True)
    assert finished.stat().st_mtime_ns == before  # reused, not rerun
    assert [f["reused"] for e, f in events if e == "run_start"] == [True, False]
    assert [f["round"] for e, f in events if e == "round_start"] == [2]  # only the missing round ran
    assert resumed["rows"][0]["accuracy"] == full["rows"][0]["accuracy"]
    # each seed's own table is kept (seeds in the document's order), and the mean is theirs
    per_seed = resumed["rows"][0]["accuracy_per_seed"]
    assert resumed["seeds"] == [7, 8] and len(per_seed) == 2
    for seed, row in zip(resumed["seeds"], per_seed, strict=True):
        assert row == json.loads((out / "splitfed" / f"seed{seed}" / "results.json").read_text())[
            "evaluation"]["accuracy"]
    assert resumed["rows"][0]["accuracy"] == pytest.approx([(a + b) / 2 for a, b in zip(*per_seed, strict=True)])


def test_resume_refuses_a_directory_written_by_another_config(tmp_path):
    cfg = tiny_config(**{"train.rounds": 1, "train.local_steps": 4, "eval.measure_latency_samples": 0})
    compare(cfg, ["splitfed"], 1, tmp_path)
    with pytest.raises(ValueError, match="different config; use a fresh --out"):
        compare(cfg.with_overrides(**{"train.lr": 0.02}), ["splitfed"], 1, tmp_path, resume=True)
    with pytest.raises(ValueError, match="needs an output directory"):
        compare(cfg, ["splitfed"], 1, None, resume=True)


def test_resume_evaluates_a_finished_sweep_again_under_other_evaluation_settings(tmp_path):
    """Personalisation steps and τ settings are read only by the final evaluation: a finished sweep
    resumed with other values is evaluated again from its checkpoints, not retrained; the same
    change halfway through training is refused."""
    cfg = tiny_config(**{"train.rounds": 2, "train.local_steps": 4, "eval.measure_latency_samples": 0,
                         "train.finetune_lr": 0.05})
    first = compare(cfg, ["splitgp+ft"], 1, tmp_path)
    run = tmp_path / "splitgp+ft" / "seed7" / "results.json"
    rounds = json.loads(run.read_text())["rounds"]
    other = cfg.with_overrides(**{"train.finetune_steps": 0, "eval.fixed_tau": 0.3})
    events: list[tuple[str, dict]] = []
    again = compare(other, ["splitgp+ft"], 1, tmp_path, lambda e, **f: events.append((e, f)), resume=True)
    assert not [e for e, _ in events if e == "round_start"]  # nothing trained
    doc = json.loads(run.read_text())
    assert doc["rounds"] == rounds  # the same training records, seconds included
    assert doc["config"]["train"]["finetune_steps"] == 0 and doc["evaluation"]["fixed_tau"] == 0.3
    assert again["rows"][0]["accuracy"] != first["rows"][0]["accuracy"]  # un-personalised: another table
    fresh = compare(other, ["splitgp+ft"], 1, tmp_path / "fresh")  # what a run with those settings gives
    assert again["rows"][0]["accuracy"] == fresh["rows"][0]["accuracy"]
    # halfway through training the evaluation settings are part of the run: refused
    half = cfg.with_overrides(**{"train.rounds": 3})
    part = LocalEngine(half, tmp_path / "part")
    part.history.append(part.run_round(1))
    part._save_checkpoint(1)
    with pytest.raises(ValueError, match="only once training has finished"):
        LocalEngine(half.with_overrides(**{"train.finetune_steps": 0}), tmp_path / "part").resume()


def test_a_table_can_keep_rows_of_an_earlier_sweep_and_says_what_differs(tmp_path, monkeypatch):
    """reproduce_fmnist.py --keep-from: rows of algorithms a default change does not touch come from
    an earlier sweep unchanged, with every differing config key listed."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling imports, as when run as a script
    spec = importlib.util.spec_from_file_location("reproduce_fmnist", ROOT / "benchmarks" / "reproduce_fmnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = tiny_config(**{"train.rounds": 1, "train.local_steps": 4, "eval.measure_latency_samples": 0})
    earlier = compare(cfg, ["splitfed"], 2, tmp_path / "earlier")
    now = cfg.with_overrides(**{"train.harmony.csa_weight": 2.0})
    doc = compare(now, ["multi-exit"], 2, tmp_path / "now")
    kept = module.keep_rows(doc, now, ["splitfed"], tmp_path / "earlier")
    assert [r["algorithm"] for r in doc["rows"]] == ["multi-exit", "splitfed"]
    assert doc["rows"][1]["accuracy"] == earlier["rows"][0]["accuracy"]
    assert kept["splitfed"]["config_differences"] == ["train.harmony.csa_weight"]
    with pytest.raises(SystemExit, match="seed7/results.json is missing"):
        module.keep_rows(doc, now, ["harmony"], tmp_path / "earlier")
