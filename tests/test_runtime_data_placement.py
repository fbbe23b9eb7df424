"""Federated means it: in the distributed runtime the Celery worker holds no sample and no label
(it serves a whole run with its dataset directory pointing at an empty folder), and an agent
process holds the samples of the devices it hosts and no other's — and the run still equals the
local engine's bit for bit.

Real mosquitto, redis-server and Celery worker processes (``LocalStack``); the two agents run in
this process so that what they loaded can be inspected.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_agent.agent import Agent
from harmony.data import load_dataset
from harmony.data.datasets import _load_cached, clear_dataset_cache
from harmony.engine import LocalEngine
from harmony.experiment import Experiment
from orchestrator.engine import DistributedEngine
from testbed.stack import LocalStack
from tests.conftest import FMNIST, same_bits, tiny_config

DATA = str(FMNIST.parent)


@pytest.mark.slow
def test_worker_without_dataset_and_agents_with_only_their_devices(tmp_path, monkeypatch):
    empty = tmp_path / "no-data"
    empty.mkdir()
    # every process would look in the empty folder: the config names it (nothing else is searched)
    # and so does the worker's environment; only the planner and the agents are told where the files are
    # every device in the round (quorum 1: no derived deadline can leave a slow first session out), so
    # the model must be the local run's with all of them
    cfg = tiny_config(**{"train.algorithm": "harmony", "data.data_dir": str(empty), "train.rounds": 1,
                         "fleet.quorum": 1.0})
    monkeypatch.setenv("HARMONY_DATA_DIR", str(empty))
    stack = LocalStack(tmp_path / "stack")
    info = stack.start(agents=0, registry=False, worker_concurrency=4)
    clear_dataset_cache()
    agents = [Agent(*info.mqtt, ["emu-0", "emu-1"], data_dir=DATA),
              Agent(*info.mqtt, ["emu-2", "emu-3"], data_dir=DATA)]
    try:
        for agent in agents:
            for device in agent.devices:
                device.start()
        engine = DistributedEngine(cfg, tmp_path / "run", mqtt=info.mqtt, redis_url=info.redis_url,
                                   devices_timeout_s=60, round_timeout_s=120, data_dir=DATA)
        try:
            got = engine.run()
        finally:
            engine.close()
        # neither the planner (this process) nor the agents memoised the dataset's images
        assert _load_cached.cache_info().currsize == 0
        held = {dev: plan for agent in agents for dev, plan in agent.shared.devices.items()}
        first = agents[0].shared.devices
    finally:
        for agent in agents:
            agent.stop()
        stack.stop()
    worker_log = (tmp_path / "stack" / "worker.log").read_text()
    assert "DatasetNotFoundError" not in worker_log and "Traceback" not in worker_log

    plan = Experiment.plan(cfg, DATA)
    assert sorted(first) == ["emu-0", "emu-1"]
    assert sorted(p.client for p in first.values()) == [0, 1]
    full = load_dataset(cfg.data.dataset)
    for dev, device in held.items():
        share = plan.shares[device.client]
        d = device.data
        # exactly its own rows: its training samples and its two test pools, nothing more
        assert d.train_x.shape[0] == d.train_y.shape[0] == share.train_indices.size
        assert torch.equal(d.train_x, full.train_x[share.train_indices]), dev
        pools = np.concatenate([share.test.id_pool, share.test.ood_pool])
        assert d.test_x.shape[0] == pools.size and torch.equal(d.test_x, full.test_x[pools]), dev
    held_by_first = {int(k) for p in first.values() for k in p.data.share.train_indices}
    assert not held_by_first & set(plan.shares[2].train_indices.tolist())

    local = LocalEngine(tiny_config(**{"train.algorithm": "harmony", "train.rounds": 1}))
    expected = local.run()
    for side in ("client", "server"):
        a, b = local.model_state()[side], engine.model_state()[side]
        assert all(same_bits(a[k], b[k]) for k in a), f"{side} weights differ from the local run"
    assert got["evaluation"]["accuracy"] == expected["evaluation"]["accuracy"]
