"""Honest evaluation (docs/design.md §14): a validation split that is never trained on, tuning that
never reads a test pool, in-distribution classes for any partition, and τ policies beside the oracle."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.codec import decode, encode, make_envelope
from broker.schemas import EvalReport
from harmony.config import ConfigError, load_config
from harmony.data import load_dataset
from harmony.data.datasets import load_labels
from harmony.data.partition import id_class_weights, ood_test_sets, validation_sets
from harmony.engine import LocalEngine
from harmony.evaluate import (
    NO_EXIT_TAU,
    ClientOutputs,
    entropy_quantile_tau,
    expected_accuracy_threshold,
    mixture_share,
    validation_taus,
)
from harmony.experiment import ClientShare, Experiment, _partition
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ ID classes
def test_id_rules_on_a_skewed_client():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 15 + [3] * 4 + [4] * 1)
    assert sorted(id_class_weights(labels, "present")) == [0, 1, 2, 3, 4]
    assert sorted(id_class_weights(labels, "share")) == [0, 1, 2]  # ≥ 5 % of its samples (default)
    assert sorted(id_class_weights(labels, "share", 0.04)) == [0, 1, 2, 3]
    assert sorted(id_class_weights(labels, "mass")) == [0, 1, 2]  # 50 + 30 + 15 = 95 % ≥ 90 %
    assert sorted(id_class_weights(labels, "mass", 0.8)) == [0, 1]  # exactly 80 %: two classes suffice
    assert sorted(id_class_weights(labels, "mass", 1.0)) == [0, 1, 2, 3, 4]
    tie = np.array([5] * 10 + [2] * 10)  # equal counts: the smaller class id first
    assert sorted(id_class_weights(tie, "mass", 0.5)) == [2]
    assert id_class_weights(labels, "mass")[0] == 0.5  # weights are fractions of the whole training set
    with pytest.raises(ValueError, match="id rule 'most'"):
        id_class_weights(labels, "most")


def test_auto_rule_keeps_shard_and_makes_dirichlet_evaluable():
    cfg = tiny_config()
    assert cfg.data.id_rule == "auto" and cfg.data.id_rule_resolved == "present"
    assert cfg.with_overrides(**{"data.partition": "dirichlet"}).data.id_rule_resolved == "mass"
    with pytest.raises(ConfigError, match="data.id_threshold"):
        cfg.with_overrides(**{"data.id_threshold": 1.5})
    # the Dirichlet setting the issue tried: every client evaluates at every ρ with the mass rule, not with present
    labels = load_labels("fashion_mnist")
    d = load_config(ROOT / "examples" / "fmnist-shard2-50.yaml",
                    ["data.partition=dirichlet", "data.dirichlet_beta=0.3", "fleet.num_clients=20"])
    parts = _partition(d, labels.train_y)
    train = [labels.train_y[p] for p in parts]
    with pytest.raises(ValueError, match=r"OOD test samples .* or another data.id_rule"):
        ood_test_sets(train, labels.test_y, 200, d.data.rhos, 0, id_rule="present")
    sets = ood_test_sets(train, labels.test_y, 200, d.data.rhos, 0, id_rule="mass")
    for t in sets:
        assert t.ood_classes.size >= 1 and t.id_pool.size == t.ood_pool.size == 200


# ------------------------------------------------------------------------------ validation split
def test_validation_split_is_held_out_and_shaped_like_the_test_set():
    cfg = tiny_config(**{"data.val_per_client": 30})
    labels = load_labels(cfg.data.dataset)
    plain = Experiment.plan(tiny_config())
    plan = Experiment.plan(cfg)
    for i in range(cfg.fleet.num_clients):
        before, share = plain.shares[i], plan.shares[i]
        val = share.val
        assert val is not None and val.split == "validation" and val.n_test == 30
        own = before.train_indices
        # held out of the client's own data, never trained on; the rest is trained on
        assert set(val.id_pool) <= set(own) and not set(val.id_pool) & set(share.train_indices)
        assert sorted(set(share.train_indices) | set(val.id_pool)) == sorted(own)
        # same ID classes as its test set, OOD samples from other classes' training samples, none its own
        assert np.array_equal(val.id_classes, share.test.id_classes)
        assert np.isin(labels.train_y[val.id_pool], val.id_classes).all()
        assert not np.isin(labels.train_y[val.ood_pool], val.id_classes).any()
        assert not set(val.ood_pool) & set(own) and val.ood_pool.size == 30
        # the test pools do not move
        assert np.array_equal(share.test.id_pool, before.test.id_pool)
        assert np.array_equal(share.test.ood_pool, before.test.ood_pool)
        assert val.indices(0.5).size == 30 and val.is_ood(0.5).sum() == 15
        back = ClientShare.from_bytes(share.to_bytes())  # as an agent gets it
        assert np.array_equal(back.val.ood_pool, val.ood_pool) and back.val.split == "validation"
        assert b'"val"' not in before.to_bytes()  # without a split the bytes (and board digests) are as before
    with pytest.raises(ValueError, match="lower data.val_per_client"):
        validation_sets([np.arange(5)], labels.train_y, 30, [0.0], 0)


def test_a_device_holds_its_validation_rows_and_trains_on_none_of_them():
    cfg = tiny_config(**{"data.val_per_client": 20})
    plan = Experiment.plan(cfg)
    full = load_dataset(cfg.data.dataset)
    agent_side = Experiment.from_manifest(json.loads(json.dumps(plan.manifest())),
                                          {1: ClientShare.from_bytes(plan.shares[1].to_bytes())})
    local = plan.devices([1], full)[1].data
    device = agent_side.device(1).data  # rows read from the files, as on an agent
    share = plan.shares[1]
    for d in (local, device):
        assert torch.equal(d.train_x[d.train_rows], full.train_x[share.train_indices])
        assert torch.equal(d.train_x[torch.as_tensor(d.val_id_rows)], full.train_x[share.val.id_pool])
        assert torch.equal(d.train_y[torch.as_tensor(d.val_ood_rows)], full.train_y[share.val.ood_pool])
        assert not set(d.val_id_rows.tolist()) & set(d.train_rows.tolist())
        assert not set(d.val_ood_rows.tolist()) & set(d.train_rows.tolist())


class _Poisoned:
    """Stands in for a device's test tensors: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a tuning path read a test pool (.{name})")

    def __getitem__(self, key):
        raise AssertionError("a tuning path read a test pool")


def _load_probe(name: str = "personalisation_probe"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuning_reads_no_test_pool(tmp_path):
    """The probe (the tuning tool) trains and scores with every device's test tensors poisoned;
    the same poison stops the test evaluation, so the check can fail."""
    probe = _load_probe()
    cfg = probe.tuning_config(ROOT / "examples" / "fmnist-shard2-50.yaml", "multi-exit", [
        "fleet.num_clients=3", "data.num_shards=6", "data.train_fraction=0.01", "model.width=0.25",
        "train.rounds=1", "train.local_steps=2", "train.batch_size=16", "data.val_per_client=10",
        "data.test_per_client=20", "eval.eval_every=3"])
    assert cfg.data.val_per_client == 10 and cfg.eval.eval_every == 0  # periodic evaluation off: it reads tests
    engine = LocalEngine(cfg)
    for device in engine.fleet.devices.values():
        device.data.test_x = device.data.test_y = _Poisoned()
    engine.train()
    row = probe.evaluate_variant(engine, 2, 0.01, 0.0)
    assert set(row) == {"exit_id", "server_id", "server_ood", "oracle_rho0", "oracle_rho08", "oracle_mean"}
    assert all(0.0 <= v <= 100.0 for v in row.values())
    with pytest.raises(AssertionError, match="read a test pool"):
        engine.evaluate()
    with pytest.raises(SystemExit, match="val_per_client = 0"):
        probe.tuning_config(ROOT / "examples" / "fmnist-shard2-50.yaml", "harmony", ["data.val_per_client=0"])


# ------------------------------------------------------------------------------ τ policies
def test_entropy_quantile_offloads_its_budget_of_the_id_queries():
    e = np.arange(1, 11) / 10.0  # 0.1 … 1.0
    tau = entropy_quantile_tau(e, 0.3)
    assert tau == 0.8 and (e >= tau).sum() == 3  # the three highest offload
    assert entropy_quantile_tau(e, 0.0) == NO_EXIT_TAU  # budget 0: exit everything
    assert entropy_quantile_tau(e, 1.0) == 0.1 and (e >= 0.1).all()
    assert entropy_quantile_tau(np.full(4, np.inf), 0.5) == NO_EXIT_TAU  # no exit head: always offloads anyway
    # validation τ is the best of the sweep on the validation set at that ρ
    val = ClientOutputs(exit_entropy=np.array([0.1, 0.2, 0.3, 0.9, 1.5, 2.0]),
                        exit_correct=np.array([True, True, False, False, False, False]),
                        server_correct=np.array([True, True, True, True, True, False]))
    taus = validation_taus(val, 4, [4, 2], [0, 2], [0.15, 0.25, 1.0, 2.1], 0.25)
    assert taus[0]["entropy_quantile"] == taus[1]["entropy_quantile"] == 0.9  # one label-free τ for every ρ
    assert taus[0]["validation"] == 0.25  # ID only: exits 0.1, 0.2 (right), offloads 0.3, 0.9 (server right)


def test_mixture_share_reads_the_share_of_unseen_queries_off_their_entropies():
    """The label-free estimate behind ``estimated_mix``: near ρ with large pools, and within a few
    points from a device-sized validation set (50 ID, 40 OOD entropies) and 200 unlabelled queries."""
    rng = np.random.default_rng(0)
    id_e, ood_e = rng.gamma(1.0, 0.25, 4000), rng.uniform(0.4, 2.0, 4000)  # OOD queries: higher exit entropy
    val = ClientOutputs(np.concatenate([id_e, ood_e]), np.zeros(8000, bool), np.zeros(8000, bool))
    for rho in (0.0, 0.3, 0.8):
        n_ood = int(rho * 5000)
        queries = np.concatenate([rng.gamma(1.0, 0.25, 5000 - n_ood), rng.uniform(0.4, 2.0, n_ood)])
        assert abs(mixture_share(val, 4000, queries) - rho) < 0.03, rho
    errors = []
    for trial in range(40):
        small = ClientOutputs(np.concatenate([rng.gamma(1.0, 0.25, 50), rng.uniform(0.4, 2.0, 40)]),
                              np.zeros(90, bool), np.zeros(90, bool))
        rho = (0.0, 0.2, 0.4, 0.6, 0.8)[trial % 5]
        n_ood = int(rho * 200)
        queries = np.concatenate([rng.gamma(1.0, 0.25, 200 - n_ood), rng.uniform(0.4, 2.0, n_ood)])
        errors.append(abs(mixture_share(small, 50, queries) - rho))
    assert max(errors) < 0.2 and np.mean(errors) < 0.08
    no_exit = ClientOutputs(np.full(6, np.inf), np.zeros(6, bool), np.zeros(6, bool))
    assert mixture_share(no_exit, 3, np.full(4, np.inf)) == 0.0  # no exit head: nothing to read


def test_expected_accuracy_threshold_weighs_the_whole_validation_pools():
    # ID: the exit is right below entropy 0.5; OOD: one confident wrong exit, the server always right
    val = ClientOutputs(exit_entropy=np.array([0.1, 0.2, 0.3, 0.8, 0.2, 0.6, 1.5]),
                        exit_correct=np.array([True, True, True, False, False, False, False]),
                        server_correct=np.array([False, False, False, True, True, True, True]))
    taus = [0.05, 0.35, 0.9, 2.0]
    assert expected_accuracy_threshold(val, 4, 0.0, taus) == 0.35  # ID only: exit the three confident ones
    assert expected_accuracy_threshold(val, 4, 1.0, taus) == 0.05  # OOD only: offload everything
    # at ρ = 0.5: τ = 0.35 gives ½·1 + ½·⅔, τ = 0.05 gives ½·¼ + ½·1 — the first wins
    assert expected_accuracy_threshold(val, 4, 0.5, taus) == 0.35

def test_policies_are_reported_beside_the_oracle_and_travel_on_the_wire():
    cfg = tiny_config(**{"data.val_per_client": 20, "train.rounds": 1, "train.local_steps": 3,
                         "eval.measure_latency_samples": 0, "train.algorithm": "multi-exit"})
    engine = LocalEngine(cfg)
    engine.train()
    ev = engine.evaluate(personalise=False)
    assert ev["tau_policy"] == "oracle"
    assert list(ev["policies"]) == ["oracle", "fixed", "validation", "entropy_quantile", "estimated_mix"]
    assert ev["policies"]["oracle"]["accuracy"] == ev["accuracy"]
    assert ev["policies"]["fixed"]["accuracy"] == ev["accuracy_fixed_tau"]
    for name, p in ev["policies"].items():
        assert len(p["accuracy"]) == len(p["offload_probability"]) == 2
        assert all(a <= o + 1e-9 for a, o in zip(p["accuracy"], ev["accuracy"], strict=True)), name  # oracle: best
    # the headline can be a policy a device runs on its own
    headline = LocalEngine(cfg.with_overrides(**{"eval.tau_policy": "entropy_quantile"}))
    headline.client_global, headline.server_global = engine.client_global, engine.server_global  # same model
    ev2 = headline.evaluate(personalise=False)
    assert ev2["accuracy"] == ev["policies"]["entropy_quantile"]["accuracy"]
    assert ev2["offload_probability"] == ev["policies"]["entropy_quantile"]["offload_probability"]
    assert ev2["policies"]["oracle"]["accuracy"] == ev["accuracy"]
    # a device's evaluation with policies crosses the wire unchanged
    clients = engine.evaluate_clients(personalise=False)
    report = EvalReport.from_evaluation(clients[0], cfg.eval.fixed_tau, 80)
    assert report.policies == "validation,entropy_quantile,estimated_mix"
    back = decode(encode(make_envelope(report, dev="d0", seq=1, round=2))).body.to_evaluation()
    for a, b in zip(back.scores, clients[0].scores, strict=True):
        assert a.policies == b.policies and a.oracle == b.oracle
    with pytest.raises(ConfigError, match="set data.val_per_client"):
        tiny_config(**{"eval.tau_policy": "validation"})


@pytest.mark.slow
def test_compare_tabulates_every_policy_for_a_dirichlet_fleet(tmp_path):
    """The command a new user tried (Dirichlet, 20 clients) evaluates at every ρ, with the label-free
    policy beside the oracle in the table and compare.json."""
    out = tmp_path / "cmp"
    sets = ["data.partition=dirichlet", "data.dirichlet_beta=0.3", "fleet.num_clients=20", "model.width=0.25",
            "train.rounds=1", "train.local_steps=1", "train.batch_size=16", "data.val_per_client=20",
            "data.test_per_client=40", "eval.measure_latency_samples=0"]
    argv = [sys.executable, "-m", "testbed.cli", "compare", "examples/fmnist-shard2-50.yaml", "--algorithms",
            "multi-exit", "--out", str(out)]
    for item in sets:
        argv += ["--set", item]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "compare.json").read_text())
    row = doc["rows"][0]
    assert doc["rho"] == [0.0, 0.2, 0.4, 0.6, 0.8] and len(row["accuracy"]) == 5
    assert set(row["policies"]) == {"oracle", "fixed", "validation", "entropy_quantile", "estimated_mix"}
    assert row["policies"]["oracle"]["accuracy"] == row["accuracy"]
    assert len(row["policies"]["entropy_quantile"]["offload_probability"]) == 5
    assert "acc τ=entropy_quantile" in proc.stdout and "acc τ=estimated_mix" in proc.stdout
    results = json.loads((out / "multi-exit" / "seed0" / "results.json").read_text())
    assert len(results["evaluation"]["per_client"]) == 20


def test_tau_policy_analysis_re_evaluates_the_run_and_measures_the_oracles_optimism(tmp_path):
    """benchmarks/tau_policies.py at smoke size: it rebuilds the run's evaluation from its
    checkpoint (refusing when the oracle row differs) and adds the cross-fitted oracle."""
    analysis = _load_probe("tau_policies")
    cfg = tiny_config(**{"data.val_per_client": 20, "train.rounds": 1, "train.local_steps": 2,
                         "eval.measure_latency_samples": 0, "train.algorithm": "multi-exit"})
    LocalEngine(cfg, out_dir=tmp_path / "run").run()
    doc = analysis.analyse(tmp_path / "run", folds=3)
    acc = doc["accuracy"]
    assert set(acc) == {"oracle", "fixed", "validation", "entropy_quantile", "estimated_mix", "oracle_crossfit",
                        "pooled_depth"}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert acc["estimated_mix"] == results["evaluation"]["policies"]["estimated_mix"]["accuracy"]
    assert all(0.0 <= a <= 100.0 for row in acc.values() for a in row)
    # a run whose reported oracle is not what its checkpoint gives is refused, not analysed
    results["evaluation"]["policies"]["oracle"]["accuracy"][0] += 1.0
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="not the run's model or code"):
        analysis.analyse(tmp_path / "run", folds=3)
