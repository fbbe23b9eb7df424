"""The experiment plan: what every process of a run agrees on, and who holds which data.

An :class:`Experiment` is built from a config. It fixes the model template (seeded
initialisation), the algorithm, each client's split depth and device profile, the partition of
the dataset into clients (as index lists) and the client-specific test pools, the seeded random
streams and the evaluation round. It holds **no samples**: the planner reads only the dataset's
label files to cut a central dataset into simulated clients, and keeps index lists and counts.

- :meth:`Experiment.device` materialises client ``i``'s training data and test pools and nothing
  else (:class:`DevicePlan`): an agent process loads only its own devices' rows of the files.
- :meth:`Experiment.server` is what the server side needs (:class:`ServerPlan`): architecture,
  depths, ``n_i`` and streams; no samples, no labels. A Celery worker builds it from the run
  manifest (:meth:`Experiment.from_manifest`) and needs no dataset at all.

The plan is a pure function of the config (and, with an override, of where the files are), so
the local engine, the workers, the agents and the orchestrator make the same choices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from harmony.algorithms import Algorithm, BatchStream, ClientSide, ServerSession, SessionContext, parse_algorithm
from harmony.algorithms.base import batches_per_epoch
from harmony.assignment import Decision, Measurement, choose_depth, from_profile, step_needs
from harmony.config import ExperimentConfig
from harmony.data.datasets import Dataset, load_labels, load_rows
from harmony.data.partition import OODTestSet, dirichlet_partition, ood_test_sets, shard_partition, validation_sets
from harmony.evaluate import (
    ClientEvaluation,
    ClientOutputs,
    ServerPredict,
    client_outputs,
    measure_latency_s,
    pool_select,
    score_client,
    validation_taus,
)
from harmony.latency import assign_profiles_by_depth, session_time_s
from harmony.models import ClientModel, DepthCost, MultiExitNet, ServerModel, build_model, cost_table
from harmony.profiles import DeviceProfile, load_profiles
from harmony.rounds import load_trace
from harmony.seeding import numpy_rng, seeded_torch

State = dict[str, torch.Tensor]


class PlanError(RuntimeError):
    """A plan was asked for something it does not hold (e.g. a client's data on the server side)."""


@dataclass(frozen=True)
class DataShape:
    """What the model template needs to know of the dataset: no samples, no labels."""

    dataset: str
    num_classes: int
    input_shape: tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class ClientShare:
    """Client ``i``'s part of the partition: where its samples lie in the dataset files.

    Indices only; the device that serves the client loads those rows (:meth:`Experiment.device`).
    """

    client: int
    train_indices: np.ndarray  # into the train split, sorted
    test: OODTestSet  # its test pools, indices into the test split
    val: OODTestSet | None = None
    """Its validation pools (``data.val_per_client``), indices into the train split, none of them in
    ``train_indices``: held-out samples of its own ID classes, and other classes' training samples."""

    def to_bytes(self) -> bytes:
        t = self.test
        doc: dict[str, Any] = {
            "client": self.client, "train": self.train_indices.tolist(), "n_test": t.n_test,
            "id_pool": t.id_pool.tolist(), "ood_pool": t.ood_pool.tolist(),
            "id_classes": t.id_classes.tolist(), "ood_classes": t.ood_classes.tolist(),
        }
        if self.val is not None:  # only then: without a validation split the bytes (and digests) are as before
            v = self.val
            doc["val"] = {"n_val": v.n_test, "id_pool": v.id_pool.tolist(), "ood_pool": v.ood_pool.tolist(),
                          "id_classes": v.id_classes.tolist(), "ood_classes": v.ood_classes.tolist()}
        return json.dumps(doc, sort_keys=True).encode()

    def device_train_rows(self) -> np.ndarray:
        """The train-split rows the device holds: its training samples, then its validation pools."""
        if self.val is None:
            return self.train_indices
        return np.concatenate([self.train_indices, self.val.id_pool, self.val.ood_pool])

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientShare:
        doc = json.loads(data)

        def ints(key: str) -> np.ndarray:
            return np.asarray(doc[key], dtype=np.int64)

        client = int(doc["client"])
        test = OODTestSet(client, int(doc["n_test"]), ints("id_pool"), ints("ood_pool"), ints("id_classes"),
                          ints("ood_classes"))
        val = None
        if "val" in doc:
            v = doc["val"]
            val = OODTestSet(client, int(v["n_val"]), *(np.asarray(v[k], dtype=np.int64) for k in (
                "id_pool", "ood_pool", "id_classes", "ood_classes")), split="validation")
        return cls(client, ints("train"), test, val)


@dataclass(eq=False)
class ClientData:
    """One client's samples as its device holds them.

    ``train_rows`` are the rows of ``train_x``/``train_y`` that are this client's (all of them on a
    device that loaded only its share; a slice of the full tensors in the in-process fleet, which
    is every device at once). ``test_id_rows``/``test_ood_rows`` are the rows of ``test_x`` that
    form its ID and OOD test pools, in draw order; ``val_id_rows``/``val_ood_rows`` (with
    ``data.val_per_client``) the rows of ``train_x`` that form its validation pools, never among
    ``train_rows``.
    """

    client: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    train_rows: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_id_rows: np.ndarray
    test_ood_rows: np.ndarray
    share: ClientShare
    val_id_rows: np.ndarray | None = None
    val_ood_rows: np.ndarray | None = None

    @property
    def samples(self) -> int:
        return int(self.train_rows.numel())


def feature_dtype(cfg: ExperimentConfig) -> torch.dtype:
    """The dtype of offloaded features (``train.feature_dtype``)."""
    return torch.float16 if cfg.train.feature_dtype == "float16" else torch.float32


class Experiment:
    """The plan of one run (module docstring). Build it with :meth:`plan` (reads label files) or
    :meth:`from_manifest` (reads nothing)."""

    def __init__(self, cfg: ExperimentConfig, shape: DataShape, samples: list[int], *,
                 depths: list[int] | None = None, profiles: list[str] | None = None,
                 shares: dict[int, ClientShare] | None = None, data_dir: str | None = None) -> None:
        self.cfg = cfg
        self.shape = shape
        self.samples = [int(n) for n in samples]
        self.shares = dict(shares or {})
        self.data_dir = data_dir if data_dir is not None else cfg.data.data_dir
        self.algorithm: Algorithm = parse_algorithm(cfg.train.algorithm, cfg.train.lam)
        self.eval_round = cfg.train.rounds + 1
        """The round id of the final evaluation (its streams and its Redis keys)."""
        self.torch_device = torch.device(cfg.device)
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device = 'cuda' but torch sees no CUDA device; set device: cpu")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        # Denormal floats appear once activations die out and make CPU kernels ~18× slower
        # (measured); flushing them to zero changes no result that matters and keeps every
        # process of a run on the same arithmetic. Per-thread state: threads that run torch
        # work for a session set it again (``harmony.fleet.flush_denormal``).
        torch.set_flush_denormal(True)
        with seeded_torch(cfg.seed, "init"):
            self.template: MultiExitNet = build_model(cfg.model.family, cfg.model.width, shape.num_classes,
                                                      shape.input_shape)
        self.costs: dict[int, DepthCost] = cost_table(self.template)
        n = cfg.fleet.num_clients
        if len(self.samples) != n:
            raise PlanError(f"the plan has {len(self.samples)} client sample counts for fleet.num_clients = {n}")
        self.decisions: list[Decision] | None = None
        """Why each client has its depth, where the depths come from profiles or measurements."""
        self.measurements: list[Measurement] | None = None
        """What each client's device measured (its ``hello``), where the depths were decided from it."""
        if depths is None or profiles is None:
            depths, profiles = self._plan_depths()
        self.depths, self.profiles = list(depths), list(profiles)
        self.client_keys = {d: self.template.client_keys(d) for d in sorted(set(self.depths))}
        trace = cfg.fleet.availability_trace
        self.trace: dict[int, list[tuple[float, float]]] = {} if trace is None else load_trace(trace)

    # ------------------------------------------------------------------------------ building
    @classmethod
    def plan(cls, cfg: ExperimentConfig, data_dir: str | None = None) -> Experiment:
        """The full plan: partitions and test pools from the dataset's labels (no images read).
        ``data_dir``: where the files are on this host, over ``data.data_dir``."""
        where = data_dir if data_dir is not None else cfg.data.data_dir
        labels = load_labels(cfg.data.dataset, where)
        parts = _partition(cfg, labels.train_y)
        d = cfg.data
        rule = d.id_rule_resolved
        # a client's ID classes are decided on its data share: its training samples plus, with a
        # validation split, the samples held out of them (without one: exactly its training set)
        tests = ood_test_sets([labels.train_y[idx] for idx in parts], labels.test_y, d.test_per_client,
                              d.rhos, cfg.seed, id_rule=rule, id_threshold=d.id_threshold)
        vals: list[OODTestSet | None] = [None] * len(parts)
        if d.val_per_client > 0:
            parts, held = validation_sets(parts, labels.train_y, d.val_per_client, d.rhos, cfg.seed, id_rule=rule,
                                          id_threshold=d.id_threshold)
            vals = list(held)
        shares = {i: ClientShare(i, parts[i], tests[i], vals[i]) for i in range(len(parts))}
        shape = DataShape(labels.name, labels.num_classes, tuple(labels.input_shape))  # type: ignore[arg-type]
        return cls(cfg, shape, [int(p.size) for p in parts], shares=shares, data_dir=data_dir)

    def manifest(self) -> dict[str, Any]:
        """What another process needs to rebuild this plan without data (:meth:`from_manifest`)."""
        return {"config": self.cfg.model_dump(mode="json"),
                "data": {"dataset": self.shape.dataset, "num_classes": self.shape.num_classes,
                         "input_shape": list(self.shape.input_shape)},
                "depths": self.depths, "profiles": self.profiles, "samples": self.samples}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], shares: dict[int, ClientShare] | None = None,
                      data_dir: str | None = None) -> Experiment:
        """The plan as a worker (no ``shares``) or an agent (its devices' shares) rebuilds it."""
        from harmony.config import validate_config

        data = manifest["data"]
        shape = DataShape(data["dataset"], int(data["num_classes"]), tuple(data["input_shape"]))  # type: ignore[arg-type]
        return cls(validate_config(manifest["config"]), shape, manifest["samples"], depths=manifest["depths"],
                   profiles=manifest["profiles"], shares=shares, data_dir=data_dir)

    def _plan_depths(self) -> tuple[list[int], list[str]]:
        cfg, fleet = self.cfg, self.cfg.fleet
        n = fleet.num_clients
        allowed = list(self.template.split_depths)
        profiles = load_profiles()
        if fleet.split_depths is not None:
            pattern = fleet.split_depths
            depths = pattern if len(pattern) == n else [pattern[i % len(pattern)] for i in range(n)]
            self._check_depths(depths, "fleet.split_depths")
        elif fleet.depth_distribution is not None:
            self._check_depths(list(fleet.depth_distribution), "fleet.depth_distribution")
            keys = sorted(fleet.depth_distribution)
            p = np.array([fleet.depth_distribution[k] for k in keys], dtype=float)
            rng = numpy_rng(cfg.seed, "split_depths")
            depths = [int(d) for d in rng.choice(keys, size=n, p=p / p.sum())]
        elif fleet.profiles is not None:
            for name in fleet.profiles:
                if name not in profiles:
                    raise ValueError(f"fleet.profiles: unknown device profile {name!r}; known: {sorted(profiles)}")
            names = [fleet.profiles[i % len(fleet.profiles)] for i in range(n)]
            self.decisions = [self.decide(from_profile(f"client {i}", profiles[p])) for i, p in enumerate(names)]
            depths = [dec.depth for dec in self.decisions]
        elif fleet.assignment == "measured":  # decided once the devices' measurements are in (assign_measured)
            depths = [min(allowed)] * n
        else:
            depths = [allowed[i % len(allowed)] for i in range(n)]
        if self.algorithm.fixed_max_depth:
            depths = [max(allowed)] * n
        if fleet.profiles is not None:
            client_profiles = [fleet.profiles[i % len(fleet.profiles)] for i in range(n)]
        else:
            for name in cfg.eval.client_profiles:
                if name not in profiles:
                    raise ValueError(f"eval.client_profiles: unknown profile {name!r}; known: {sorted(profiles)}")
            client_profiles = assign_profiles_by_depth(depths, cfg.eval.client_profiles)
        if cfg.eval.server_profile not in profiles:
            raise ValueError(f"eval.server_profile: unknown profile {cfg.eval.server_profile!r}; "
                             f"known: {sorted(profiles)}")
        return [int(d) for d in depths], client_profiles

    def _check_depths(self, depths: list[int], key: str) -> None:
        allowed = self.template.split_depths
        bad = sorted({d for d in depths if d not in allowed})
        if bad:
            raise ValueError(f"{key}: split depth(s) {bad} not allowed for {self.template.family}; "
                             f"allowed: {list(allowed)}")

    # ------------------------------------------------------------------------------ measured depths
    def _rule(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"budget_s": cfg.fleet.step_budget_s, "batch_size": cfg.train.batch_size,
                "batches_per_step": self.algorithm.batches_per_step, "momentum": cfg.train.momentum,
                "bits_per_element": cfg.eval.bits_per_element}

    def decide(self, measurement: Measurement) -> Decision:
        """The depth a device with ``measurement`` gets (:mod:`harmony.assignment`); an algorithm
        that trains every client at the deepest depth overrides it, saying so."""
        decision = choose_depth(self.costs, measurement, **self._rule())
        if self.algorithm.fixed_max_depth:
            deepest = max(self.template.split_depths)
            decision = replace(decision, depth=deepest, needs=step_needs(
                self.costs[deepest], batch_size=self.cfg.train.batch_size,
                batches_per_step=self.algorithm.batches_per_step, momentum=self.cfg.train.momentum,
                bits_per_element=self.cfg.eval.bits_per_element, compute_flops=measurement.compute_flops,
                uplink_bps=measurement.uplink_bps),
                reason=f"depth {deepest}: {self.cfg.train.algorithm} trains every client at the deepest depth "
                       f"(measured: {decision.reason})")
        return decision

    def assign_measured(self, measurements: list[Measurement]) -> list[Decision]:
        """Every client's depth from its device's measurement (client ``i`` ↔ ``measurements[i]``)."""
        if len(measurements) != self.num_clients:
            raise PlanError(f"{len(measurements)} measurements for fleet.num_clients = {self.num_clients}")
        self.measurements = list(measurements)
        self.decisions = [self.decide(m) for m in measurements]
        for i, decision in enumerate(self.decisions):
            self.set_depth(i, decision.depth)
        return self.decisions

    def record_classes(self, classes: list[str | None]) -> None:
        """Each client's device class as its device reported it (``hello.device_class``; client ``i`` ↔
        ``classes[i]``), in place of the by-depth guess from ``eval.client_profiles``, which is kept
        only for a device that named no class (decided again now that the depths are known)."""
        if len(classes) != self.num_clients:
            raise PlanError(f"{len(classes)} device classes for fleet.num_clients = {self.num_clients}")
        guessed = assign_profiles_by_depth(self.depths, self.cfg.eval.client_profiles)
        self.profiles = [cls if cls else guess for cls, guess in zip(classes, guessed, strict=True)]

    def client_profile(self, client: int) -> DeviceProfile:
        """The figures the latency model and the simulated clock use for ``client``: its device's
        measured compute rate and uplink where its depth was decided from its measurement (its
        ``hello``: :meth:`assign_measured`), else its class's (``harmony/profiles.yaml``)."""
        name = self.profiles[client]
        table = load_profiles()
        m = None if self.measurements is None else self.measurements[client]
        if m is None:
            return table[name]
        base = table.get(name) or DeviceProfile(name, m.compute_flops, m.uplink_bps, m.memory_bytes, 1, m.source)
        return replace(base, compute_flops=m.compute_flops, uplink_bps=m.uplink_bps, source=m.source)

    def set_depth(self, client: int, depth: int) -> None:
        """Move ``client`` to split depth ``depth`` (an allowed one)."""
        self._check_depths([depth], "split depth")
        self.depths[client] = depth
        if depth not in self.client_keys:
            self.client_keys[depth] = self.template.client_keys(depth)

    def redecide(self, client: int, measured_step_s: float) -> Decision:
        """Client ``client``'s decision after its sessions measured ``measured_step_s`` of client
        compute per step (``fleet.reassign_drift``); the caller applies the depth."""
        assert self.decisions is not None
        old = self.decisions[client]
        rate = old.measurement.compute_flops * old.needs.compute_s / measured_step_s
        m = replace(old.measurement, compute_flops=rate,
                    source=f"{old.measurement.source}; re-measured {rate / 1e9:.2f} GFLOP/s by its sessions")
        self.decisions[client] = self.decide(m)
        return self.decisions[client]

    # ------------------------------------------------------------------------------ shared rules
    @property
    def num_clients(self) -> int:
        return self.cfg.fleet.num_clients

    def participants(self, rnd: int, available: list[int] | None = None, attempt: int = 0) -> list[int]:
        """The clients of try ``attempt`` of round ``rnd``: a seeded draw of ``train.participation``
        of the fleet among the ``available`` ones (default: all), as many as are available."""
        pool = list(range(self.num_clients)) if available is None else sorted(available)
        m = min(len(pool), max(1, round(self.cfg.train.participation * self.num_clients)))
        if m >= len(pool):
            return pool
        rng = numpy_rng(self.cfg.seed, rnd, "participants") if attempt == 0 else \
            numpy_rng(self.cfg.seed, rnd, attempt, "participants")
        return sorted(pool[int(k)] for k in rng.choice(len(pool), m, replace=False))

    def session_estimate_s(self, client: int) -> float:
        """Modelled wall time of one session of ``client`` from its device profile (the simulated
        clock; also what ``fleet.deadline_slack`` scales)."""
        profiles = load_profiles()
        return session_time_s(self.costs[self.depths[client]], self.steps(client), self.cfg.train.batch_size,
                              self.algorithm.batches_per_step, self.client_profile(client),
                              profiles[self.cfg.eval.server_profile].compute_flops, self.cfg.eval.bits_per_element)

    def context(self, rnd: int, client: int) -> SessionContext:
        """The (device, round) session's context: every random stream of it derives from this."""
        return SessionContext(self.cfg.seed, rnd, client, self.cfg.train, self.torch_device)

    def steps(self, client: int) -> int:
        """Local steps of client ``client`` per round."""
        return self.algorithm.steps_per_round(batches_per_epoch(self.samples[client], self.cfg.train.batch_size),
                                              self.cfg.train)

    def initial_states(self) -> tuple[State, State]:
        """The round-1 client-side (every depth's keys) and server-side weights, from the template."""
        full = self.template.state_dict()
        client = {k: full[k].clone() for keys in self.client_keys.values() for k in keys}
        server = {k: full[k].clone() for k in self.template.server_keys()}
        return client, server

    def place(self, module: Any) -> Any:
        """A module on the run's torch device, in its memory format."""
        module = module.to(self.torch_device)
        if self.cfg.model.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def client_model(self, depth: int) -> ClientModel:
        """A fresh on-device model at ``depth`` (template weights; callers load their state)."""
        return self.place(self.template.client_model(depth))

    def server_model(self) -> ServerModel:
        """A fresh server back end (template weights; callers load their state)."""
        return self.place(self.template.server_model())

    # ------------------------------------------------------------------------------ the two views
    def server(self) -> ServerPlan:
        """The server side's view: no samples, no labels."""
        return ServerPlan(self)

    def device(self, client: int, dataset: Dataset | None = None) -> DevicePlan:
        """Client ``client``'s device: its own data only (see :meth:`devices`)."""
        return self.devices([client], dataset)[client]

    def devices(self, clients: Iterable[int], dataset: Dataset | None = None) -> dict[int, DevicePlan]:
        """The devices of ``clients``, each with only its own samples. With ``dataset`` (the
        in-process fleet, which is every device in one process) they index its tensors; without,
        the rows of these clients are read from the files once and the rest dropped."""
        clients = list(clients)
        missing = [i for i in clients if i not in self.shares]
        if missing:
            raise PlanError(f"this plan holds no data share of client(s) {missing} (a server-side plan holds "
                            "none; an agent holds only its own devices')")
        out: dict[int, DevicePlan] = {}
        if dataset is not None:
            # moved once and shared by every device (on CUDA each .to() would be a copy of the dataset)
            train_x, train_y, test_x, test_y = (t.to(self.torch_device) for t in (
                dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y))
            for i in clients:
                share = self.shares[i]
                rows = torch.as_tensor(share.train_indices, dtype=torch.long, device=self.torch_device)
                val = share.val
                out[i] = DevicePlan(self, ClientData(i, train_x, train_y, rows, test_x, test_y,
                                                     share.test.id_pool, share.test.ood_pool, share,
                                                     None if val is None else val.id_pool,
                                                     None if val is None else val.ood_pool))
            return out
        shares = [self.shares[i] for i in clients]
        train_rows = np.concatenate([s.device_train_rows() for s in shares])
        test_rows = np.concatenate([np.concatenate([s.test.id_pool, s.test.ood_pool]) for s in shares])
        train_x, train_y, test_x, test_y = load_rows(self.cfg.data.dataset, self.data_dir, train_rows, test_rows)
        t0 = e0 = 0
        for i, share in zip(clients, shares, strict=True):
            n, n_id, n_ood = share.train_indices.size, share.test.id_pool.size, share.test.ood_pool.size
            m = n_id + n_ood
            held = share.device_train_rows().size  # its training rows, then its validation pools
            v_id = 0 if share.val is None else share.val.id_pool.size
            out[i] = DevicePlan(self, ClientData(
                i, train_x[t0:t0 + held].clone().to(self.torch_device),
                train_y[t0:t0 + held].clone().to(self.torch_device),
                torch.arange(n, device=self.torch_device),
                test_x[e0:e0 + m].clone().to(self.torch_device), test_y[e0:e0 + m].clone().to(self.torch_device),
                np.arange(n_id), n_id + np.arange(n_ood), share,
                None if share.val is None else n + np.arange(v_id),
                None if share.val is None else n + v_id + np.arange(held - n - v_id)))
            t0, e0 = t0 + held, e0 + m
        return out


def _partition(cfg: ExperimentConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's training indices: a pure function of the labels, the config and the seed."""
    d, seed, n = cfg.data, cfg.seed, cfg.fleet.num_clients
    if d.partition == "shard":
        parts = shard_partition(labels, n, d.shards_per_client, d.num_shards, seed=seed)
    else:
        parts = dirichlet_partition(labels, n, d.dirichlet_beta, seed=seed)
    if d.train_fraction < 1.0:
        kept = []
        for i, idx in enumerate(parts):
            k = max(1, math.ceil(d.train_fraction * idx.size))
            kept.append(np.sort(numpy_rng(seed, "train_fraction", i).permutation(idx)[:k]))
        parts = kept
    return parts


class ServerPlan:
    """What the server side of a run needs: architecture, depths, ``n_i``, streams — no data."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        self.cfg, self.algorithm = experiment.cfg, experiment.algorithm
        self.depths, self.samples = experiment.depths, experiment.samples

    def new_model(self) -> ServerModel:
        return self.experiment.server_model()

    def session(self, rnd: int, client: int, model: ServerModel) -> ServerSession:
        """The server half of client ``client``'s session of round ``rnd``, on ``model`` (its replica)."""
        return self.algorithm.server_session(model, self.depths[client], self.experiment.context(rnd, client))


class DevicePlan:
    """What one device needs: its depth, its own data, its streams, and the client-side code."""

    def __init__(self, experiment: Experiment, data: ClientData) -> None:
        self.experiment = experiment
        self.cfg, self.algorithm = experiment.cfg, experiment.algorithm
        self.client, self.data = data.client, data

    @property
    def depth(self) -> int:
        """This device's split depth (the plan's: ``Experiment.set_depth`` moves it)."""
        return self.experiment.depths[self.client]

    def new_model(self) -> ClientModel:
        return self.experiment.client_model(self.depth)

    def batches(self, ctx: SessionContext, purpose: str) -> BatchStream:
        d = self.data
        return BatchStream(d.train_x, d.train_y, d.train_rows, self.cfg.train.batch_size, ctx.generator(purpose),
                           self.cfg.model.channels_last)

    def session(self, rnd: int, model: ClientModel) -> ClientSide:
        """The client half of this device's session of round ``rnd``, on ``model`` (its start state loaded)."""
        ctx = self.experiment.context(rnd, self.client)
        return self.algorithm.client_side(model, self.batches(ctx, "batches"), ctx)

    def personalise(self, model: ClientModel) -> None:
        """The algorithm's post-training personalisation of ``model``, in place (streams of the evaluation round)."""
        ctx = self.experiment.context(self.experiment.eval_round, self.client)
        self.algorithm.personalise(model, self.batches(ctx, "personalise"), ctx)

    @property
    def has_validation(self) -> bool:
        """Whether this device holds a validation split (``data.val_per_client`` > 0)."""
        return self.data.val_id_rows is not None

    def _outputs(self, model: ClientModel, server: ServerPredict, split: str, rhos: list[float],
                 whole_id_pool: bool = False, whole_ood_pool: bool = False
                 ) -> tuple[ClientOutputs, torch.Tensor, int, int, list[int], list[int]]:
        """The models over the pools of ``split`` that ``rhos`` need: ``(outputs, inputs, n_id, n_ood,
        id_counts, ood_counts)``. ``test`` reads only the test pools, ``validation`` only the
        validation pools (rows of the device's train tensors, never trained on)."""
        d = self.data
        if split == "test":
            pools, x_all, y_all, id_rows, ood_rows = d.share.test, d.test_x, d.test_y, d.test_id_rows, d.test_ood_rows
        elif split == "validation":
            if d.share.val is None or d.val_id_rows is None or d.val_ood_rows is None:
                raise PlanError(f"client {self.client} has no validation split: set data.val_per_client (e.g. 50)")
            pools, x_all, y_all, id_rows, ood_rows = d.share.val, d.train_x, d.train_y, d.val_id_rows, d.val_ood_rows
        else:
            raise ValueError(f"split {split!r}: expected 'test' or 'validation'")
        counts = [pools.counts(r) for r in rhos]
        id_counts, ood_counts = [c[0] for c in counts], [c[1] for c in counts]
        n_id = len(id_rows) if whole_id_pool else max(id_counts)
        n_ood = len(ood_rows) if whole_ood_pool else max(ood_counts)
        rows = torch.as_tensor(np.concatenate([id_rows[:n_id], ood_rows[:n_ood]]), device=self.experiment.torch_device)
        x = x_all[rows]
        outputs = client_outputs(model, server, x, y_all[rows], self.algorithm.early_exit, feature_dtype(self.cfg),
                                 self.cfg.eval.batch_size, self.cfg.model.channels_last)
        return outputs, x, n_id, n_ood, id_counts, ood_counts

    def pool_outputs(self, model: ClientModel, server: ServerPredict, split: str = "validation"
                     ) -> tuple[ClientOutputs, int, int]:
        """The models over the whole ID and OOD pools of ``split``: ``(outputs, n_id, n_ood)``,
        the ID samples first (what the tuning tools break down into exit and fallback accuracy)."""
        d = self.data
        id_rows, ood_rows = (d.val_id_rows, d.val_ood_rows) if split == "validation" else \
            (d.test_id_rows, d.test_ood_rows)
        if id_rows is None or ood_rows is None:
            raise PlanError(f"client {self.client} has no validation split: set data.val_per_client (e.g. 50)")
        outputs, _, n_id, n_ood, _, _ = self._outputs(model, server, split, [1.0] if len(ood_rows) else [0.0],
                                                      whole_id_pool=True)
        return outputs, n_id, n_ood

    def evaluate(self, model: ClientModel, server: ServerPredict, *, rhos: list[float] | None = None,
                 taus: list[float] | None = None, fixed_tau: float | None = None,
                 measure: bool = True, split: str = "test") -> ClientEvaluation:
        """This device's side of the evaluation: its on-device model over its own test pools, the
        offloaded samples answered by ``server``, then the τ sweep per ρ (defaults: the config's).
        The same code in both runtimes: in-process ``server`` calls the server model, on an agent
        it is the ``infer`` exchange. ``measure``: also time batch-1 inference
        (``eval.measure_latency_samples`` repeats; skipped when that is 0).

        With a validation split the device first runs its models over its validation pools and
        chooses the thresholds of the ``validation`` and ``entropy_quantile`` τ policies there
        (:func:`harmony.evaluate.validation_taus`), then scores them on the test pools beside
        the oracle and the fixed τ. ``split="validation"``: the same sweep over the validation
        pools instead, and nothing of the test pools is read — what every tuning tool uses."""
        cfg = self.cfg
        rhos = list(cfg.data.rhos) if rhos is None else rhos
        taus = list(cfg.eval.taus) if taus is None else taus
        fixed_tau = cfg.eval.fixed_tau if fixed_tau is None else fixed_tau
        policy_taus = None
        if split == "test" and self.has_validation:
            val, _, v_id, _, v_id_counts, v_ood_counts = self._outputs(model, server, "validation", rhos,
                                                                       whole_id_pool=True, whole_ood_pool=True)
        outputs, x, n_id, n_ood, id_counts, ood_counts = self._outputs(model, server, split, rhos)
        if split == "test" and self.has_validation:
            # the queries' exit entropies (no labels) let a device estimate the mix it faces
            queries = [outputs.exit_entropy[pool_select(n_id, a, b)] for a, b in zip(id_counts, ood_counts,
                                                                                       strict=True)]
            policy_taus = validation_taus(val, v_id, v_id_counts, v_ood_counts, taus, cfg.eval.offload_budget,
                                          queries)
        scores = score_client(outputs, n_id, n_ood, id_counts, ood_counts, rhos, taus, fixed_tau, policy_taus)
        measured = None
        if measure and cfg.eval.measure_latency_samples > 0:
            measured = measure_latency_s(model, server, x, self.algorithm.early_exit,
                                         cfg.eval.measure_latency_samples, feature_dtype(cfg), cfg.model.channels_last)
        return ClientEvaluation(scores, measured)

    def evaluated_samples(self, rhos: list[float]) -> int:
        """How many test samples :meth:`evaluate` runs for ``rhos`` (the ID and OOD pools of the largest ρ)."""
        counts = [self.data.share.test.counts(r) for r in rhos]
        return max(c[0] for c in counts) + max(c[1] for c in counts)
