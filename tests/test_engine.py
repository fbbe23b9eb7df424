"""The local engine: determinism, resume, participation, label privacy, learning."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from harmony.algorithms import ALGORITHM_NAMES, parse_algorithm
from harmony.algorithms.messages import FeaturesUp, LogitGradUp
from harmony.engine import LocalEngine
from harmony.fleet import InProcessFleet
from tests.conftest import same_bits, tiny_config


def _states_equal(a: dict, b: dict) -> bool:
    return all(same_bits(a[side][k], b[side][k]) for side in a for k in a[side])


@pytest.mark.slow  # long: out of make test-fast
@pytest.mark.parametrize("algorithm", ["splitgp", "splitfed"])
def test_same_seed_gives_bit_identical_weights(algorithm):
    cfg = tiny_config(**{"train.algorithm": algorithm})
    first, second = LocalEngine(cfg), LocalEngine(cfg)
    first.train()
    second.train()
    assert _states_equal(first.model_state(), second.model_state())
    other = LocalEngine(cfg.with_overrides(seed=8))
    other.train()
    assert not _states_equal(first.model_state(), other.model_state())


def test_in_process_work_flushes_denormals_in_every_intra_op_thread():
    """The local engine computes on a thread that flushes denormals from its first operation, so
    the workers of its parallel kernels flush too — whatever this process computed before (this
    test suite has run parallel kernels in its main thread long before). A thread that flushed
    only itself would leave the workers' chunks denormal, and a local run's bits would depend on
    the process's history and differ from the agents' and the worker's."""
    torch.set_num_threads(2)
    x = torch.full((1 << 20,), 1e-30)
    (x * 2.0).sum()  # this thread's intra-op pool exists (a parallel kernel ran)
    engine = LocalEngine(tiny_config())
    try:
        assert isinstance(engine.fleet, InProcessFleet)
        survivors = engine.fleet.torch.call(lambda: int(((x * 1e-10) != 0).sum()))  # 1e-40: a float32 denormal
        on_it = engine.fleet.torch.call(threading.current_thread)
    finally:
        engine.close()
    assert survivors == 0
    assert on_it is not threading.current_thread()


@pytest.mark.slow  # long: out of make test-fast
def test_client_order_does_not_change_the_result():
    cfg = tiny_config()
    forward = LocalEngine(cfg)
    forward.train()
    backward = LocalEngine(cfg)
    backward.participants = lambda rnd, *_: list(reversed(range(cfg.fleet.num_clients)))  # type: ignore[method-assign]
    backward.train()
    a, b = forward.model_state(), backward.model_state()
    worst = max((a[s][k].double() - b[s][k].double()).abs().max().item() for s in a for k in a[s])
    assert worst <= 1e-6


@pytest.mark.slow  # long: out of make test-fast
def test_resume_continues_bit_identically(tmp_path):
    cfg = tiny_config(**{"train.rounds": 3})
    whole = LocalEngine(cfg, tmp_path / "whole")
    whole.train()
    part = LocalEngine(cfg, tmp_path / "part")  # interrupted after its first round
    part.history.append(part.run_round(1))
    part._save_checkpoint(1)
    resumed = LocalEngine(cfg, tmp_path / "part")
    assert resumed.resume() == 2
    resumed.train()
    assert _states_equal(whole.model_state(), resumed.model_state())
    assert [r.round for r in resumed.history] == [1, 2, 3]


def test_resume_refuses_a_different_config(tmp_path):
    cfg = tiny_config(**{"train.rounds": 1})
    LocalEngine(cfg, tmp_path).train()
    other = LocalEngine(cfg.with_overrides(**{"train.lr": 0.1}), tmp_path)
    with pytest.raises(ValueError, match="different config"):
        other.resume()


def test_partial_participation_picks_seeded_subsets():
    engine = LocalEngine(tiny_config(**{"train.participation": 0.5}))
    picks = [engine.participants(r) for r in range(1, 6)]
    assert all(len(p) == 2 and p == sorted(set(p)) for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    assert picks == [LocalEngine(tiny_config(**{"train.participation": 0.5})).participants(r) for r in range(1, 6)]


@pytest.mark.parametrize("algorithm", ["splitfed", "multi-exit", "splitgp", "splitgp(lambda=1)", "splitgp+ft",
                                       "harmony", "harmony(depth-agnostic)", "splitgp+csa"])
@pytest.mark.slow  # long: out of make test-fast
def test_server_side_never_receives_labels(algorithm):
    """Every payload handed to the server side is inspected: only features (and, for
    logit gradients, floats); never the label tensor or anything integer-valued."""
    cfg = tiny_config(**{"train.algorithm": algorithm, "train.rounds": 1})
    engine = LocalEngine(cfg)
    seen: list[object] = []
    labels = engine.fleet.devices[0].data.train_y
    original = engine.algorithm.server_session

    def recording_session(model, depth, ctx):
        session = original(model, depth, ctx)
        on_features, on_logit_grad = session.on_features, session.on_logit_grad

        def features(msg):
            seen.append(msg)
            return on_features(msg)

        def logit_grad(msg):
            seen.append(msg)
            return on_logit_grad(msg)

        session.on_features, session.on_logit_grad = features, logit_grad
        return session

    engine.algorithm.server_session = recording_session  # type: ignore[method-assign]
    engine.train()
    assert seen, "the server side was never called"
    for msg in seen:
        assert isinstance(msg, (FeaturesUp, LogitGradUp))
        for name, value in vars(msg).items():
            if not isinstance(value, torch.Tensor):
                continue
            if name == "same_label":  # HARMONY's s_j: 0/1 only
                assert value.dtype == torch.uint8 and set(value.unique().tolist()) <= {0, 1}
            elif name == "negative_pairs":  # HARMONY: row indices into the batch, not classes
                assert value.dim() == 2 and value.shape[1] == 2
            else:
                assert value.is_floating_point(), f"{name} is {value.dtype}"
                assert value.dim() >= 2, f"{name} has the shape of a label vector"
        if isinstance(msg, FeaturesUp):
            assert msg.features.dtype == torch.float16
    assert labels.numel() > 0


def test_unknown_algorithm_and_bad_depths_are_named():
    with pytest.raises(ValueError, match="known: splitfed"):
        parse_algorithm("fedsgd")
    assert "splitgp+ft" in ALGORITHM_NAMES
    with pytest.raises(ValueError, match=r"fleet.split_depths: split depth\(s\) \[5\] not allowed .* \[2, 3, 4\]"):
        LocalEngine(tiny_config(**{"fleet.split_depths": [2, 5]}))


def test_results_files(tmp_path):
    engine = LocalEngine(tiny_config(**{"train.rounds": 1}), tmp_path)
    results = engine.run()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["evaluation"]["rho"] == [0.0, 0.5]
    assert len(on_disk["evaluation"]["accuracy"]) == 2
    assert (tmp_path / "rounds.csv").read_text().startswith("round,")
    assert (tmp_path / "evaluation.csv").read_text().startswith("rho,accuracy")
    assert results["fleet"]["split_depths"] == [2, 3, 4, 2]
    # what the bits depend on beyond the config: the same config on another CPU type may differ
    assert on_disk["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert on_disk["machine"]["threads"] == torch.get_num_threads() and on_disk["machine"]["cpu"]
    for row in results["evaluation"]["per_client"]:
        assert all(0.0 <= r["offload_probability"] <= 1.0 for r in row["rho"])


def test_splitfed_always_offloads_and_pays_full_server_latency():
    engine = LocalEngine(tiny_config(**{"train.algorithm": "splitfed", "train.rounds": 1}))
    ev = engine.evaluate()
    assert ev["offload_probability"] == [1.0, 1.0]


def test_divergence_stops_the_run_with_a_clear_error():
    from harmony.engine import TrainingDivergedError

    engine = LocalEngine(tiny_config(**{"train.algorithm": "splitfed", "train.lr": 50.0, "train.rounds": 3}))
    with pytest.raises(TrainingDivergedError, match="lower train.lr"):
        engine.train()
