"""The distributed runtime computes what the local engine computes (DESIGN.md §1, issue step 6).

One tiny config and seed, run by ``LocalEngine`` in-process and by ``DistributedEngine`` over real
mosquitto, redis-server and Celery worker processes with the devices in a separate agent process:
the final weights must agree (measured: bit-identical) and so must the accuracy table.
"""

from __future__ import annotations

import pytest
import torch

from harmony.engine import LocalEngine
from orchestrator.engine import DistributedEngine
from server import state
from tests.conftest import tiny_config
from tests.runtime_fixtures import local_stack  # noqa: F401  (fixture)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["splitgp", "harmony"])
def test_distributed_equals_local(local_stack, algorithm, tmp_path):  # noqa: F811
    cfg = tiny_config(**{"train.algorithm": algorithm})
    local = LocalEngine(cfg)
    expected = local.run()
    engine = DistributedEngine(cfg, tmp_path, mqtt=local_stack.mqtt, redis_url=local_stack.redis_url,
                               devices_timeout_s=60, round_timeout_s=120)
    try:
        got = engine.run()
    finally:
        engine.close()
    for side in ("client", "server"):
        diff = max_abs_diff(local.model_state()[side], engine.model_state()[side])
        assert diff <= 1e-5, f"{algorithm}: {side} weights differ by {diff}"
        assert diff == 0.0, f"{algorithm}: {side} weights not bit-identical ({diff})"
    assert got["runtime"] == "distributed"
    assert (tmp_path / "results.json").is_file()
    assert got["evaluation"]["accuracy"] == expected["evaluation"]["accuracy"]
    assert got["evaluation"]["accuracy_fixed_tau"] == expected["evaluation"]["accuracy_fixed_tau"]
    for a, b in zip(got["rounds"], expected["rounds"], strict=True):
        for key in ("samples", "train_loss_exit", "train_loss_server", "train_acc_exit", "train_acc_server"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
    r = state.connect(local_stack.redis_url)
    assert r.hget(state.round_key(cfg.train.rounds), "state") == b"done"
