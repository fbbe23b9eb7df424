"""Non-IID client partitions and client-specific test sets (docs/design.md §4).

Every function here is pure: its output is determined by (labels, parameters, seed). All
randomness comes from ``np.random.default_rng`` seeded with the given ``seed`` (or with
``[seed, client]`` for per-client streams, so one client's test set does not depend on
how many other clients exist); the global numpy RNG is never touched.

Partitions return one int64 array of sample indices per client, sorted ascending:

* :func:`shard_partition` -- Shard-k (McMahan et al. 2017): sort by label, cut into
  ``num_shards`` equal shards, give each client ``shards_per_client`` random shards.
* :func:`dirichlet_partition` -- Dir(beta) label skew (Hsu et al. 2019; the per-class
  scheme of Yurochkin et al. 2019 / NIID-Bench).

Client-specific test sets, drawn from the global test set:

* :func:`ood_test_sets` -- client-specific out-of-distribution (OOD) test sets with OOD
  ratio rho. The *ID classes* of client i are decided on its training labels by an ID rule
  (:func:`id_class_weights`: by default ``present``, the classes present in its training set;
  ``share`` and ``mass`` for partitions such as Dirichlet where a client holds a few samples of
  most classes); every other class is an *OOD class* for client i. For a ratio rho in [0, 1] the client's test set
  has ``n_test`` queries, of which ``n_ood = round(rho * n_test)`` come from its OOD classes
  and ``n_id = n_test - n_ood`` from its ID classes (``round`` is Python's built-in,
  round-half-to-even). So rho = n_ood / (n_id + n_ood) is exactly the fraction of the
  client's test queries whose class is not one of its ID classes (under ``present``: never
  occurs in its training set). rho = 0 is a purely
  in-distribution test set; rho = 0.8 means four in five queries are OOD for that client.
  The test sets for different rho are prefixes of two fixed pools, so they share samples
  and an evaluator can run its models once on the pools and slice per rho.
* :func:`validation_sets` -- a validation split held out of each client's data, with the
  same ID/OOD construction as the test sets (OOD samples from the train split, so disjoint
  from every test sample).
* :func:`out_of_client_test_sets` -- "out-of-client" drift (Jiang & Lin 2023, FedTHE):
  client i is tested on samples drawn with the label distribution of another client j != i.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "IndexArray",
    "OODTestSet",
    "OutOfClientTestSet",
    "ID_RULES",
    "dirichlet_partition",
    "id_class_weights",
    "ood_test_sets",
    "out_of_client_test_sets",
    "shard_partition",
    "validation_sets",
]

logger = logging.getLogger(__name__)

IndexArray = npt.NDArray[np.int64]


def _as_labels(labels: npt.ArrayLike, what: str = "labels") -> npt.NDArray[np.int64]:
    array = np.asarray(labels)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(f"{what} must be a 1-D integer array, got {array.dtype} of shape {array.shape}")
    if array.size and array.min() < 0:
        raise ValueError(f"{what} must be non-negative class ids, got minimum {array.min()}")
    return array.astype(np.int64, copy=False)


def _check_positive(**values: int | float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


# --------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------


def shard_partition(
    labels: npt.ArrayLike,
    num_clients: int,
    shards_per_client: int,
    num_shards: int = 100,
    *,
    seed: int,
) -> list[IndexArray]:
    """Shard-k partition: sort by label, cut ``num_shards`` equal shards, deal k per client.

    Samples are ordered by ``np.argsort(labels, kind='stable')`` (ties keep index order) and
    cut into ``num_shards`` consecutive shards of ``len(labels) // num_shards`` samples; the
    ``len(labels) % num_shards`` samples at the end of that order (of the largest labels)
    belong to no shard and to no client. Shards are dealt by ``perm =
    default_rng(seed).permutation(num_shards)``: client i gets shards
    ``perm[i*k:(i+1)*k]``, so no shard goes to two clients and, when
    ``num_clients * k < num_shards``, the remaining shards are unused.
    """
    labels = _as_labels(labels)
    _check_positive(num_clients=num_clients, shards_per_client=shards_per_client, num_shards=num_shards)
    if num_clients * shards_per_client > num_shards:
        raise ValueError(
            f"num_clients ({num_clients}) x shards_per_client ({shards_per_client}) = "
            f"{num_clients * shards_per_client} exceeds num_shards ({num_shards}); use fewer clients, "
            "fewer shards per client, or more shards"
        )
    shard_size = len(labels) // num_shards
    if shard_size == 0:
        raise ValueError(f"num_shards ({num_shards}) exceeds the number of samples ({len(labels)})")
    order = np.argsort(labels, kind="stable")
    shards = order[: num_shards * shard_size].reshape(num_shards, shard_size)
    perm = np.random.default_rng(seed).permutation(num_shards)
    k = shards_per_client
    return [np.sort(shards[perm[i * k : (i + 1) * k]].ravel()).astype(np.int64) for i in range(num_clients)]


def _dirichlet_draw(
    rng: np.random.Generator, class_indices: Sequence[IndexArray], num_clients: int, beta: float, cap: float
) -> list[IndexArray]:
    """One draw of the per-class Dirichlet split; clients already above ``cap`` get no more."""
    sizes = np.zeros(num_clients, dtype=np.int64)
    chunks: list[list[IndexArray]] = [[] for _ in range(num_clients)]
    for indices in class_indices:
        shuffled = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(num_clients, beta))
        masked = np.where(sizes < cap, proportions, 0.0)
        if masked.sum() > 0:
            proportions = masked
        if proportions.sum() <= 0:  # every component underflowed (tiny beta): fall back to uniform
            proportions = np.ones(num_clients)
        cuts = (np.cumsum(proportions / proportions.sum()) * len(shuffled)).astype(np.int64)[:-1]
        for client, part in enumerate(np.split(shuffled, cuts)):
            chunks[client].append(part)
            sizes[client] += len(part)
    return [np.concatenate(parts).astype(np.int64) for parts in chunks]


def dirichlet_partition(
    labels: npt.ArrayLike,
    num_clients: int,
    beta: float,
    seed: int,
    min_size: int = 10,
    max_retries: int = 1000,
) -> list[IndexArray]:
    """Dir(beta) label-skew partition; every client ends with at least ``min_size`` samples.

    For each class c (in ascending order), its samples are shuffled and split among the
    clients with proportions q_c ~ Dir(beta * 1); as in the reference implementation
    (NIID-Bench, Li et al. 2022) a client that already holds more than ``N / num_clients``
    samples gets no share of later classes. Smaller beta gives more skewed clients (fewer
    classes each). The whole draw is repeated, continuing the same seeded generator, until
    the smallest client has ``min_size`` samples; after ``max_retries`` failed draws a
    ValueError says what to change. Every sample goes to exactly one client.
    """
    labels = _as_labels(labels)
    _check_positive(num_clients=num_clients, beta=beta, max_retries=max_retries)
    if min_size < 0 or num_clients * min_size > len(labels):
        raise ValueError(
            f"min_size ({min_size}) x num_clients ({num_clients}) must be between 0 and the "
            f"number of samples ({len(labels)})"
        )
    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cap = len(labels) / num_clients
    smallest = 0
    for attempt in range(1, max_retries + 1):
        parts = _dirichlet_draw(rng, class_indices, num_clients, beta, cap)
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            logger.debug("dirichlet partition beta=%s clients=%d attempts=%d", beta, num_clients, attempt)
            return [np.sort(p) for p in parts]
    raise ValueError(
        f"dirichlet_partition: after max_retries ({max_retries}) draws some client still had fewer than "
        f"min_size ({min_size}) samples (last smallest: {smallest}); raise beta ({beta}), lower min_size, "
        "or use fewer clients"
    )


# --------------------------------------------------------------------------------------
# Client-specific test sets
# --------------------------------------------------------------------------------------


def _weighted_sample(
    rng: np.random.Generator, candidates: IndexArray, weights: npt.NDArray[np.float64], size: int
) -> IndexArray:
    """``size`` candidates drawn one by one without replacement, each with prob. proportional to weight.

    Efraimidis-Spirakis: order by Exp(1) / weight. The result is in draw order, so every
    prefix is itself such a weighted sample.
    """
    keys = rng.exponential(size=len(candidates)) / weights
    return candidates[np.argsort(keys, kind="stable")[:size]].astype(np.int64)


def _label_distribution_sample(
    rng: np.random.Generator,
    test_labels: npt.NDArray[np.int64],
    class_weights: dict[int, float],
    size: int,
    candidates_of: _ClassCandidates | None = None,
) -> IndexArray:
    """Test indices of the weighted classes, drawn so that classes follow ``class_weights``.

    A test sample of class c has weight ``class_weights[c] / (#test samples of c)``, so each
    draw picks class c with probability proportional to ``class_weights[c]`` (as long as no
    class has run out of test samples). ``candidates_of`` caches the candidate indices per
    class set (many clients share one); the draw is the same with or without it.
    """
    classes = np.asarray(sorted(class_weights), dtype=np.int64)
    candidates, counts = (candidates_of or _ClassCandidates(test_labels)).of(classes)
    if candidates.size == 0:
        return candidates
    per_class = np.zeros(len(counts))
    for c in classes:
        per_class[c] = class_weights[int(c)] / max(counts[c], 1)
    return _weighted_sample(rng, candidates, per_class[test_labels[candidates]], size)


class _ClassCandidates:
    """The test indices of a class set and their per-class counts, computed once per class set:
    a fleet of 10,000 clients has few distinct class sets (Shard-2: mostly the 55 of one or two classes),
    and ``np.isin`` over the whole test set per client was most of the planning time."""

    def __init__(self, test_labels: npt.NDArray[np.int64]) -> None:
        self.test_labels = test_labels
        self._cache: dict[tuple[int, ...], tuple[IndexArray, npt.NDArray[np.int64]]] = {}

    def of(self, classes: npt.NDArray[np.int64]) -> tuple[IndexArray, npt.NDArray[np.int64]]:
        key = tuple(int(c) for c in classes)
        if key not in self._cache:
            candidates = np.flatnonzero(np.isin(self.test_labels, classes)).astype(np.int64)
            counts = np.bincount(self.test_labels[candidates], minlength=int(classes.max()) + 1) \
                if candidates.size else np.zeros(0, dtype=np.int64)
            self._cache[key] = (candidates, counts)
        return self._cache[key]


def _split_counts(rho: float, n_test: int) -> tuple[int, int]:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    n_ood = int(round(rho * n_test))
    return n_test - n_ood, n_ood


@dataclass(frozen=True, eq=False)
class OODTestSet:
    """Client-specific OOD test pools of one client; indices point into the global test set.

    ``id_pool`` holds test samples of the client's ID classes, in draw order, drawn so that
    classes follow the client's training label distribution; ``ood_pool`` holds test samples
    of its OOD classes in uniformly random order (uniform over samples, so over classes in
    proportion to their test-set frequency; uniform over classes for the usual balanced
    test sets). Each pool has ``n_test`` entries, or fewer if fewer test samples exist; the
    two pools are disjoint. The test set for ratio rho is ``id_pool[:n_id]`` followed by
    ``ood_pool[:n_ood]`` with ``n_ood = round(rho * n_test)`` and ``n_id = n_test - n_ood``.
    """

    client: int
    n_test: int
    id_pool: IndexArray
    ood_pool: IndexArray
    id_classes: IndexArray
    ood_classes: IndexArray
    split: str = "test"
    """``test`` (indices into the test split) or ``validation`` (indices into the train split:
    :func:`validation_sets`)."""

    def counts(self, rho: float) -> tuple[int, int]:
        """``(n_id, n_ood)`` for ratio ``rho``; ValueError if a pool is too short for it."""
        n_id, n_ood = _split_counts(rho, self.n_test)
        size = "n_test" if self.split == "test" else "data.val_per_client"
        for kind, needed, pool, classes in (
            ("in-distribution", n_id, self.id_pool, self.id_classes),
            ("OOD", n_ood, self.ood_pool, self.ood_classes),
        ):
            if needed > len(pool):
                raise ValueError(
                    f"client {self.client}: rho={rho} needs {needed} {kind} {self.split} samples but the "
                    f"{self.split} set has only {len(pool)} of its {kind} classes {classes.tolist()}; lower {size}"
                    + (" or use a more skewed partition (shard, smaller beta) or another data.id_rule (share, "
                       "mass)" if kind == "OOD" else "")
                )
        return n_id, n_ood

    def indices(self, rho: float) -> IndexArray:
        """Test-set indices for ratio ``rho``: the first n_id ID samples, then the first n_ood OOD samples."""
        n_id, n_ood = self.counts(rho)
        return np.concatenate([self.id_pool[:n_id], self.ood_pool[:n_ood]])

    def is_ood(self, rho: float) -> npt.NDArray[np.bool_]:
        """Boolean mask aligned with :meth:`indices`: True for the OOD queries."""
        n_id, n_ood = self.counts(rho)
        return np.concatenate([np.zeros(n_id, dtype=bool), np.ones(n_ood, dtype=bool)])


ID_RULES = ("present", "share", "mass")
"""The rules for a client's in-distribution classes (:func:`id_class_weights`)."""

DEFAULT_ID_THRESHOLD = {"present": 0.0, "share": 0.05, "mass": 0.9}
"""Each rule's threshold when none is given."""


def id_class_weights(train_labels: npt.ArrayLike, rule: str = "present", threshold: float | None = None
                     ) -> dict[int, float]:
    """A client's ID classes, each with its fraction of the client's training samples.

    - ``present``: every class with at least one training sample (``threshold`` unused; the
      rule of Shard-k, where a client holds a few classes and none of the others);
    - ``share``: the classes making up at least ``threshold`` of its samples (default 0.05);
    - ``mass``: the fewest classes, largest first (ties: smaller class id), whose samples make
      up at least ``threshold`` of its samples (default 0.9).

    Under Dirichlet(β) a client holds a few samples of most classes, so ``present`` leaves no
    OOD class; ``share`` and ``mass`` call the rare classes OOD (they are still trained on).
    The weights are the fractions of the whole training set (not renormalised).
    """
    labels = _as_labels(train_labels)
    if rule not in ID_RULES:
        raise ValueError(f"id rule {rule!r}: expected one of {', '.join(ID_RULES)}")
    if threshold is None:
        threshold = DEFAULT_ID_THRESHOLD[rule]
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"id threshold must lie in [0, 1], got {threshold}")
    if labels.size == 0:
        return {}
    counts = np.bincount(labels)
    fractions = counts / labels.size
    if rule == "mass":
        order = np.argsort(-counts, kind="stable")
        covered = np.cumsum(fractions[order])
        k = int(np.searchsorted(covered, threshold - 1e-12)) + 1
        keep = np.zeros(counts.size, dtype=bool)
        keep[order[:min(k, int((counts > 0).sum()))]] = True
    else:
        keep = (counts > 0) & (fractions >= (threshold if rule == "share" else 0.0))
    return {int(c): float(fractions[c]) for c in np.flatnonzero(keep)}


def _id_class_weights(train_labels: npt.NDArray[np.int64], min_class_fraction: float) -> dict[int, float]:
    return id_class_weights(train_labels, "share", min_class_fraction)


def ood_test_sets(
    train_labels_per_client: Sequence[npt.ArrayLike],
    test_labels: npt.ArrayLike,
    n_test: int,
    rhos: Sequence[float],
    seed: int,
    *,
    min_class_fraction: float = 0.0,
    id_rule: str = "present",
    id_threshold: float | None = None,
) -> list[OODTestSet]:
    """Client-specific OOD test pools, one :class:`OODTestSet` per client.

    Args:
        train_labels_per_client: the labels of each client's training samples
            (e.g. ``train_labels[partition[i]]``).
        test_labels: labels of the global test set; returned indices point into it.
        n_test: number of test queries per client and per rho.
        rhos: the OOD ratios that will be evaluated; each in [0, 1]. They are only used to
            check up front that both pools are long enough (ValueError naming the client
            otherwise); ``OODTestSet.indices`` accepts any rho the pools can serve.
        seed: client i uses ``default_rng([seed, i])``.
        min_class_fraction: a class is an ID class of client i only if it makes up at least
            this fraction of the client's training samples. The default 0 makes every class
            present in the training set an ID class, so OOD means "absent from training";
            with a positive value, rare training classes count as OOD too (the ``share`` rule).
        id_rule, id_threshold: the rule for the ID classes (:func:`id_class_weights`), used
            when ``min_class_fraction`` is 0.

    ID classes are those present in the client's training labels (subject to
    ``min_class_fraction``); OOD classes are all other classes of the test set. See the
    module docstring for the definition of rho.
    """
    test = _as_labels(test_labels, "test_labels")
    _check_positive(n_test=n_test)
    for rho in rhos:
        _split_counts(rho, n_test)
    if not 0.0 <= min_class_fraction <= 1.0:
        raise ValueError(f"min_class_fraction must lie in [0, 1], got {min_class_fraction}")
    test_classes = np.unique(test)
    candidates_of = _ClassCandidates(test)
    ood_of: dict[tuple[int, ...], tuple[IndexArray, IndexArray]] = {}  # ID class set → OOD classes, candidates
    result = []
    for client, train_labels in enumerate(train_labels_per_client):
        rng = np.random.default_rng([seed, client])
        labels = _as_labels(train_labels, f"train labels of client {client}")
        weights = _id_class_weights(labels, min_class_fraction) if min_class_fraction > 0 else \
            id_class_weights(labels, id_rule, id_threshold)
        id_classes = np.asarray(sorted(weights), dtype=np.int64)
        key = tuple(int(c) for c in id_classes)
        if key not in ood_of:
            ood_classes = np.setdiff1d(test_classes, id_classes).astype(np.int64)
            ood_of[key] = (ood_classes, np.flatnonzero(np.isin(test, ood_classes)).astype(np.int64))
        ood_classes, ood_candidates = ood_of[key]
        id_pool = _label_distribution_sample(rng, test, weights, n_test, candidates_of)
        # a copy, not a view: the slice would keep the whole permutation alive (64 KB per
        # client on Fashion-MNIST, whatever n_test is)
        ood_pool = rng.permutation(ood_candidates)[:n_test].copy()
        test_set = OODTestSet(client, n_test, id_pool, ood_pool, id_classes, ood_classes)
        for rho in rhos:
            test_set.counts(rho)
        result.append(test_set)
    return result


def validation_sets(
    data_per_client: Sequence[npt.ArrayLike],
    train_labels: npt.ArrayLike,
    n_val: int,
    rhos: Sequence[float],
    seed: int,
    *,
    id_rule: str = "present",
    id_threshold: float | None = None,
) -> tuple[list[IndexArray], list[OODTestSet]]:
    """Hold a validation set out of each client's data: ``(training indices, validation pools)``.

    ``data_per_client[i]`` are client i's sample indices into the train split (its share of
    the partition). Its ID classes are decided on those samples by ``id_rule``
    (:func:`id_class_weights`), exactly as :func:`ood_test_sets` decides them when given the
    same labels. With ``default_rng([seed, i, 1])`` (a stream of its own, so the test pools do
    not move), ``n_val`` of its samples of ID classes are drawn uniformly (so their classes
    follow its data's proportions, like the test ID pool) and removed from its training
    indices: they are never trained on. The OOD pool is ``n_val`` samples of the train split
    drawn uniformly among its OOD classes, none of them the client's own; as train-split
    samples they are disjoint from every test pool. The validation set at ratio rho is then
    built from the two pools as the test set is (:class:`OODTestSet`, ``split="validation"``,
    ``n_test = n_val``). ValueError naming the client if a pool is too short for some rho
    or nothing would be left to train on.
    """
    labels = _as_labels(train_labels, "train_labels")
    _check_positive(n_val=n_val)
    for rho in rhos:
        _split_counts(rho, n_val)
    all_classes = np.unique(labels)
    training: list[IndexArray] = []
    pools: list[OODTestSet] = []
    for client, indices in enumerate(data_per_client):
        own = np.asarray(indices, dtype=np.int64)
        rng = np.random.default_rng([seed, client, 1])
        own_labels = labels[own]
        weights = id_class_weights(own_labels, id_rule, id_threshold)
        id_classes = np.asarray(sorted(weights), dtype=np.int64)
        ood_classes = np.setdiff1d(all_classes, id_classes).astype(np.int64)
        held = rng.permutation(own[np.isin(own_labels, id_classes)])[:n_val].astype(np.int64)
        rest = np.setdiff1d(own, held).astype(np.int64)
        if rest.size == 0:
            raise ValueError(f"client {client}: data.val_per_client = {n_val} holds out all of its {own.size} "
                             "samples, leaving nothing to train on; lower data.val_per_client")
        candidates = np.setdiff1d(np.flatnonzero(np.isin(labels, ood_classes)), own).astype(np.int64)
        ood_pool = rng.permutation(candidates)[:n_val].copy()
        pool = OODTestSet(client, n_val, held, ood_pool, id_classes, ood_classes, split="validation")
        for rho in rhos:
            pool.counts(rho)
        training.append(rest)
        pools.append(pool)
    return training, pools


@dataclass(frozen=True, eq=False)
class OutOfClientTestSet:
    """Out-of-client test set of ``client``: drawn with the label distribution of ``source_client``."""

    client: int
    source_client: int
    indices: IndexArray


def out_of_client_test_sets(
    train_labels_per_client: Sequence[npt.ArrayLike],
    test_labels: npt.ArrayLike,
    n_test: int,
    seed: int,
) -> list[OutOfClientTestSet]:
    """Out-of-client test sets (Jiang & Lin 2023, FedTHE).

    For each client i, ``j`` is drawn uniformly from the other clients with
    ``default_rng([seed, i])``, and ``n_test`` test samples are drawn without replacement so
    that their classes follow client j's training label distribution (test sample of class c
    weighted by p_j(c) / #test samples of c). Indices are returned sorted ascending.
    """
    test = _as_labels(test_labels, "test_labels")
    _check_positive(n_test=n_test)
    labels_per_client = [
        _as_labels(y, f"train labels of client {i}") for i, y in enumerate(train_labels_per_client)
    ]
    num_clients = len(labels_per_client)
    if num_clients < 2:
        raise ValueError(f"out-of-client test sets need at least 2 clients, got {num_clients}")
    result = []
    for client in range(num_clients):
        rng = np.random.default_rng([seed, client])
        source = int(rng.integers(num_clients - 1))
        source += source >= client
        weights = _id_class_weights(labels_per_client[source], 0.0)
        indices = _label_distribution_sample(rng, test, weights, n_test)
        if len(indices) < n_test:
            raise ValueError(
                f"client {client}: out-of-client source client {source} has classes {sorted(weights)} "
                f"with only "
                f"{len(indices)} test samples, fewer than n_test ({n_test}); lower n_test"
            )
        result.append(OutOfClientTestSet(client, source, np.sort(indices)))
    return result
