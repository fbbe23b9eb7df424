"""The experiment plan: who holds which data (the server side none, a device only its own), and a
config that validates without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harmony.data import load_dataset
from harmony.data.datasets import _load_cached, clear_dataset_cache
from harmony.engine import LocalEngine
from harmony.experiment import ClientShare, Experiment, PlanError
from tests.conftest import FMNIST, tiny_config

ROOT = Path(__file__).resolve().parents[1]
DATA = str(FMNIST.parent)


def test_validating_a_config_imports_no_torch():
    code = ("import sys; from harmony.config import load_config; "
            "c = load_config('examples/quickstart.yaml', ['train.algorithm=harmony(no-csa)']); "
            "assert c.train.algorithm == 'harmony(no-csa)'; "
            "bad = [m for m in ('torch', 'harmony.models', 'harmony.algorithms') if m in sys.modules]; "
            "assert not bad, bad; print('light')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "light"
    code = "from harmony.config import load_config; load_config('examples/quickstart.yaml', ['train.algorithm=fedsgd'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "train.algorithm = 'fedsgd': unknown algorithm 'fedsgd'; known: splitfed" in proc.stderr


def test_planning_reads_labels_only_and_the_server_side_holds_no_data():
    clear_dataset_cache()
    cfg = tiny_config()
    plan = Experiment.plan(cfg)
    assert _load_cached.cache_info().currsize == 0, "planning loaded the images"
    assert plan.shape.num_classes == 10 and plan.shape.input_shape == (1, 28, 28)
    assert plan.samples == [plan.shares[i].train_indices.size for i in range(4)]
    manifest = json.loads(json.dumps(plan.manifest()))  # what a worker reads from Redis
    assert set(manifest) == {"config", "data", "depths", "profiles", "samples"}
    server_side = Experiment.from_manifest(manifest)
    server = server_side.server()
    assert server.samples == plan.samples and server.depths == plan.depths
    assert server_side.shares == {}
    with pytest.raises(PlanError, match=r"no data share of client\(s\) \[0\]"):
        server_side.device(0)
    # nothing on the server side is a tensor of samples or labels: only the model template's weights
    tensors = [v for v in vars(server_side).values() if isinstance(v, torch.Tensor)]
    assert not tensors
    assert server_side.steps(2) == plan.steps(2) and server_side.participants(3) == plan.participants(3)
    assert _load_cached.cache_info().currsize == 0


def test_a_device_loads_only_its_own_rows_and_they_equal_the_dataset():
    cfg = tiny_config()
    plan = Experiment.plan(cfg)
    shares = {i: ClientShare.from_bytes(plan.shares[i].to_bytes()) for i in (0, 1)}  # as an agent gets them
    clear_dataset_cache()
    agent_side = Experiment.from_manifest(json.loads(json.dumps(plan.manifest())), shares)
    devices = agent_side.devices([0, 1])
    assert _load_cached.cache_info().currsize == 0, "the agent side memoised the whole dataset"
    with pytest.raises(PlanError):
        agent_side.device(2)
    full = load_dataset(cfg.data.dataset)
    for i, device in devices.items():
        d, share = device.data, plan.shares[i]
        assert d.train_x.shape[0] == share.train_indices.size == plan.samples[i]
        assert torch.equal(d.train_x, full.train_x[share.train_indices])
        assert torch.equal(d.train_y, full.train_y[share.train_indices])
        pools = np.concatenate([share.test.id_pool, share.test.ood_pool])
        assert torch.equal(d.test_x, full.test_x[pools])
        assert not set(share.train_indices) & set(plan.shares[2].train_indices)
    # the same batches, hence the same session, as the in-process fleet's full-dataset view
    in_process = plan.devices([0], full)[0]
    ctx = plan.context(1, 0)
    a, b = devices[0].batches(ctx, "batches"), in_process.batches(plan.context(1, 0), "batches")
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_local_engine_rounds_need_the_plan_only():
    """The engine's state is the plan's initial weights; its fleet holds every device (in-process)."""
    engine = LocalEngine(tiny_config(**{"train.rounds": 1}))
    client, server = engine.experiment.initial_states()
    assert all(torch.equal(client[k], engine.client_global[k]) for k in client)
    assert sorted(engine.fleet.devices) == [0, 1, 2, 3]
    result = engine.run_session(1, 1)
    assert result.client == 1 and result.n_i == engine.experiment.samples[1] and result.stats.samples > 0
