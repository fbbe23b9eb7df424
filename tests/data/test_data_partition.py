"""Partitions and client-specific test sets: invariants, determinism, hand-computed cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harmony.data.idx import read_idx
from harmony.data.partition import (
    dirichlet_partition,
    ood_test_sets,
    out_of_client_test_sets,
    shard_partition,
)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
RHOS = [0.0, 0.2, 0.4, 0.6, 0.8]


def _labels(split: str, per_class: int, seed: int) -> np.ndarray:
    """Real Fashion-MNIST labels when installed; otherwise a balanced stand-in of the same shape."""
    path = FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz"
    if path.is_file():
        return read_idx(path).astype(np.int64)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class))


@pytest.fixture(scope="module")
def train_labels() -> np.ndarray:
    return _labels("train", 6000, 1)


@pytest.fixture(scope="module")
def test_labels() -> np.ndarray:
    return _labels("t10k", 1000, 2)


@pytest.fixture(scope="module")
def shard2(train_labels: np.ndarray) -> list[np.ndarray]:
    return shard_partition(train_labels, num_clients=50, shards_per_client=2, seed=0)


def _assert_disjoint_sorted(parts: list[np.ndarray], n: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "indices must be sorted ascending without duplicates"
        assert part.size == 0 or (part[0] >= 0 and part[-1] < n)
    union = np.concatenate(parts)
    assert len(np.unique(union)) == len(union), "clients must be pairwise disjoint"


# ---------------------------------------------------------------- shard


def test_shard2_fashion_mnist(train_labels: np.ndarray, shard2: list[np.ndarray]) -> None:
    assert len(shard2) == 50
    assert all(len(part) == 1200 for part in shard2)
    assert all(len(np.unique(train_labels[part])) <= 2 for part in shard2)
    _assert_disjoint_sorted(shard2, len(train_labels))


def test_shard_seed_determinism(train_labels: np.ndarray, shard2: list[np.ndarray]) -> None:
    same = shard_partition(train_labels, 50, 2, seed=0)
    other = shard_partition(train_labels, 50, 2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(shard2, same, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(shard2, other, strict=True))


def test_shard_hand_computed() -> None:
    labels = np.array([3, 1, 0, 2, 1, 3, 0, 2, 0, 1, 2, 3, 1, 0, 3, 2, 0, 1, 2, 3])
    # stable sort by label, then 4 shards of 5 samples:
    shards = [
        [2, 6, 8, 13, 16],  # label 0
        [1, 4, 9, 12, 17],  # label 1
        [3, 7, 10, 15, 18],  # label 2
        [0, 5, 11, 14, 19],  # label 3
    ]
    seed = 7
    perm = np.random.default_rng(seed).permutation(4)  # documented dealing order
    parts = shard_partition(labels, num_clients=2, shards_per_client=2, num_shards=4, seed=seed)
    for client, part in enumerate(parts):
        expected = sorted(shards[perm[2 * client]] + shards[perm[2 * client + 1]])
        assert part.tolist() == expected
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))


def test_shard_drops_the_remainder_at_the_end_of_the_sorted_order() -> None:
    labels = np.array([2, 0, 1, 0, 1, 0, 1])  # stable order by label: 1 3 5 2 4 6 | 0
    parts = shard_partition(labels, num_clients=3, shards_per_client=1, num_shards=3, seed=0)
    # shards of 2: [1 3] [5 2] [4 6]; sample 0 (label 2, last in the order) is in no shard
    assert sorted(tuple(p.tolist()) for p in parts) == [(1, 3), (2, 5), (4, 6)]


def test_shard_too_many_clients_is_explained() -> None:
    with pytest.raises(
        ValueError, match=r"num_clients \(51\) x shards_per_client \(2\) = 102 exceeds num_shards"
    ):
        shard_partition(np.zeros(1000, dtype=np.int64), 51, 2, seed=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 300),
    num_shards=st.integers(1, 20),
    clients=st.integers(1, 10),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_shard_invariants(n: int, num_shards: int, clients: int, k: int, seed: int) -> None:
    if clients * k > num_shards:
        return
    labels = np.random.default_rng(seed).integers(0, 5, n)
    parts = shard_partition(labels, clients, k, num_shards, seed=seed)
    _assert_disjoint_sorted(parts, n)
    assert all(len(p) == k * (n // num_shards) for p in parts)


# ---------------------------------------------------------------- dirichlet


def test_dirichlet_covers_everything_disjointly(train_labels: np.ndarray) -> None:
    parts = dirichlet_partition(train_labels, 20, beta=0.5, seed=3, min_size=50)
    _assert_disjoint_sorted(parts, len(train_labels))
    assert sum(len(p) for p in parts) == len(train_labels)
    assert min(len(p) for p in parts) >= 50
    again = dirichlet_partition(train_labels, 20, beta=0.5, seed=3, min_size=50)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_small_beta_is_more_skewed(train_labels: np.ndarray) -> None:
    def mean_classes(beta: float) -> float:
        parts = dirichlet_partition(train_labels, 20, beta=beta, seed=0)
        return float(np.mean([len(np.unique(train_labels[p])) for p in parts]))

    assert mean_classes(0.1) < mean_classes(10.0)


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(ValueError, match="max_retries"):
        dirichlet_partition(labels, 50, beta=0.01, seed=0, min_size=15, max_retries=3)


# ---------------------------------------------------------------- OOD test sets


@pytest.fixture(scope="module")
def ood_sets(train_labels: np.ndarray, test_labels: np.ndarray, shard2: list[np.ndarray]) -> list:
    return ood_test_sets([train_labels[p] for p in shard2], test_labels, 500, RHOS, seed=0)


def test_ood_parts_respect_client_classes(
    train_labels: np.ndarray, test_labels: np.ndarray, shard2: list[np.ndarray], ood_sets: list
) -> None:
    for part, test_set in zip(shard2, ood_sets, strict=True):
        train_classes = set(np.unique(train_labels[part]).tolist())
        assert set(test_set.id_classes.tolist()) == train_classes
        assert set(test_set.ood_classes.tolist()) == set(range(10)) - train_classes
        assert not set(test_set.id_pool.tolist()) & set(test_set.ood_pool.tolist())
        for rho in RHOS:
            indices, is_ood = test_set.indices(rho), test_set.is_ood(rho)
            n_ood = round(rho * 500)
            assert len(indices) == 500 and int(is_ood.sum()) == n_ood
            assert len(np.unique(indices)) == 500
            assert set(test_labels[indices[~is_ood]].tolist()) <= train_classes
            assert not set(test_labels[indices[is_ood]].tolist()) & train_classes


def test_ood_sets_are_nested_prefixes(ood_sets: list) -> None:
    for test_set in ood_sets:
        for rho in RHOS:
            n_ood = round(rho * 500)
            indices = test_set.indices(rho)
            np.testing.assert_array_equal(indices[: 500 - n_ood], test_set.id_pool[: 500 - n_ood])
            np.testing.assert_array_equal(indices[500 - n_ood :], test_set.ood_pool[:n_ood])
        low, high = test_set.indices(0.2), test_set.indices(0.6)
        assert set(high[~test_set.is_ood(0.6)]) <= set(low[~test_set.is_ood(0.2)])
        assert set(low[test_set.is_ood(0.2)]) <= set(high[test_set.is_ood(0.6)])


def test_ood_id_pool_follows_training_distribution() -> None:
    test_labels = np.repeat(np.arange(3), 1000)
    train = np.array([0] * 900 + [1] * 100)
    (test_set,) = ood_test_sets([train], test_labels, 500, [0.0, 0.5], seed=4)
    counts = np.bincount(test_labels[test_set.id_pool], minlength=3)
    assert counts[2] == 0 and 400 <= counts[0] <= 490
    assert test_set.ood_classes.tolist() == [2]


def test_ood_min_class_fraction_turns_rare_classes_into_ood() -> None:
    test_labels = np.repeat(np.arange(3), 100)
    train = np.array([0] * 95 + [1] * 5)
    (test_set,) = ood_test_sets([train], test_labels, 50, [0.5], seed=0, min_class_fraction=0.1)
    assert test_set.id_classes.tolist() == [0] and test_set.ood_classes.tolist() == [1, 2]


def test_ood_errors_when_client_has_every_class() -> None:
    test_labels = np.repeat(np.arange(3), 100)
    with pytest.raises(ValueError, match="client 0: rho=0.2 needs 20 OOD test samples"):
        ood_test_sets([np.arange(3)], test_labels, 100, [0.0, 0.2], seed=0)


def test_ood_is_deterministic_and_rejects_bad_rho(train_labels: np.ndarray, test_labels: np.ndarray) -> None:
    clients = [train_labels[train_labels < 5][:300], train_labels[train_labels >= 3][:300]]
    first = ood_test_sets(clients, test_labels, 100, RHOS, seed=5, min_class_fraction=0.05)
    again = ood_test_sets(clients, test_labels, 100, RHOS, seed=5, min_class_fraction=0.05)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.indices(0.4), b.indices(0.4))
    with pytest.raises(ValueError, match=r"rho must lie in \[0, 1\]"):
        first[0].indices(1.5)


# ---------------------------------------------------------------- out-of-client


def test_out_of_client_uses_another_clients_distribution(
    train_labels: np.ndarray, test_labels: np.ndarray, shard2: list[np.ndarray]
) -> None:
    per_client = [train_labels[p] for p in shard2]
    sets = out_of_client_test_sets(per_client, test_labels, 200, seed=0)
    assert [s.client for s in sets] == list(range(50))
    for s in sets:
        assert s.source_client != s.client and 0 <= s.source_client < 50
        assert len(s.indices) == 200 and np.all(np.diff(s.indices) > 0)
        assert set(test_labels[s.indices].tolist()) <= set(per_client[s.source_client].tolist())
    again = out_of_client_test_sets(per_client, test_labels, 200, seed=0)
    assert [s.source_client for s in again] == [s.source_client for s in sets]
    other = out_of_client_test_sets(per_client, test_labels, 200, seed=1)
    assert [s.source_client for s in other] != [s.source_client for s in sets]


def test_out_of_client_needs_two_clients() -> None:
    with pytest.raises(ValueError, match="at least 2 clients"):
        out_of_client_test_sets([np.zeros(5, dtype=np.int64)], np.zeros(5, dtype=np.int64), 2, seed=0)
