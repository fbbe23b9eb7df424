"""It learns: Multi-exit SFL on a small real Fashion-MNIST subset clears an honest floor."""

from __future__ import annotations

import pytest

from harmony.engine import LocalEngine
from tests.conftest import tiny_config


@pytest.mark.slow  # long: out of make test-fast
def test_multi_exit_learns_fashion_mnist():
    # 4 clients, near-IID Dirichlet(100) over 6% of the training set (~900 samples each),
    # half-width cnn8, 3 rounds. Measured over seeds 0–2: 75.5 / 76.8 / 74.6 % test accuracy;
    # chance is 10 %. The floor sits 10 points under the worst seed.
    cfg = tiny_config(**{
        "seed": 1, "train.algorithm": "multi-exit", "train.rounds": 3, "data.train_fraction": 0.06,
        "model.width": 0.5, "train.batch_size": 32, "train.lr": 0.01, "data.test_per_client": 250,
        "data.partition": "dirichlet", "data.dirichlet_beta": 100.0, "data.rhos": [0.0],
    })
    results = LocalEngine(cfg).run()
    assert results["evaluation"]["accuracy"][0] >= 65.0
    losses = [r["train_loss_server"] for r in results["rounds"]]
    assert losses[-1] < losses[0]


@pytest.mark.slow  # long: out of make test-fast
def test_personalisation_wins_in_distribution_and_generalisation_wins_ood():
    """The hybrid-SFL trade-off on Shard-2: max personalisation (λ=1) beats SplitFed on
    in-distribution queries (ρ=0); SplitFed never exits and so keeps its (lower) accuracy
    flatter as ρ grows."""
    base = {"train.rounds": 3, "data.train_fraction": 0.05, "model.width": 0.5, "train.batch_size": 32,
            "train.lr": 0.01, "data.test_per_client": 100, "data.rhos": [0.0, 0.8], "seed": 3}
    personal = LocalEngine(tiny_config(**base, **{"train.algorithm": "splitgp(lambda=1)"})).run()["evaluation"]
    splitfed = LocalEngine(tiny_config(**base, **{"train.algorithm": "splitfed"})).run()["evaluation"]
    assert personal["accuracy"][0] > splitfed["accuracy"][0] + 15.0
    drop_personal = personal["accuracy"][0] - personal["accuracy"][1]
    drop_splitfed = splitfed["accuracy"][0] - splitfed["accuracy"][1]
    assert drop_personal > drop_splitfed
