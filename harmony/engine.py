"""The local engine: N clients × R rounds in one process, an emulated fleet.

Per round: select participants; for each, copy the round-start client state and the
server back end ``W_s`` into a session and run ``K`` U-shaped steps through the
algorithm's own client and server sides (:func:`run_session`); then FedAvg the server
replicas and partially average the client sides, weighted by ``n_i``. Every random
choice comes from a stream of (seed, round, device, purpose), so the same seed gives
bit-identical weights on the CPU, in any client order, and after ``--resume``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmony.aggregation import WeightedSum, personalise_mix
from harmony.algorithms import Algorithm, BatchStream, SessionContext, parse_algorithm, run_session
from harmony.config import ExperimentConfig
from harmony.data import load_dataset
from harmony.data.partition import dirichlet_partition, ood_test_sets, shard_partition
from harmony.evaluate import (
    ClientEvaluation,
    ServerPredict,
    client_outputs,
    measure_latency_s,
    score_client,
    server_predictor,
)
from harmony.latency import assign_profiles_by_depth, modelled_latency_s
from harmony.models import ClientModel, DepthCost, MultiExitNet, ServerModel, build_model, cost_table
from harmony.profiles import DeviceProfile, load_profiles
from harmony.seeding import numpy_rng, seeded_torch

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
ProgressFn = Callable[..., None]


@dataclass
class RoundRecord:
    """What one round did, as shown in the progress bar and written to rounds.csv."""

    round: int
    participants: int
    samples: int
    train_loss_exit: float
    train_loss_server: float
    train_acc_exit: float
    train_acc_server: float
    seconds: float
    eval_accuracy: list[float] | None = None


@dataclass
class FleetPlan:
    """Per client: split depth, device profile (for the latency model), training indices."""

    depths: list[int]
    profiles: list[str]
    train_indices: list[np.ndarray]
    weights: list[int] = field(default_factory=list)


class TrainingDivergedError(RuntimeError):
    """A round produced NaN or Inf weights; the run stops rather than report garbage."""


def _clone(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


class LocalEngine:
    """Runs one experiment config in-process. ``progress(event, **fields)`` reports rounds."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None = None,
                 progress: ProgressFn | None = None) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress or (lambda event, **fields: None)
        self.algorithm: Algorithm = parse_algorithm(cfg.train.algorithm, cfg.train.lam)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device = 'cuda' but torch sees no CUDA device; set device: cpu")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        # Denormal floats appear once activations die out and make CPU kernels ~18× slower
        # (measured); flushing them to zero changes no result that matters and keeps both
        # runtimes, which all call this, on the same arithmetic.
        torch.set_flush_denormal(True)
        self._setup()

    # ----------------------------------------------------------------------------- set-up
    def _setup(self) -> None:
        cfg = self.cfg
        ds = load_dataset(cfg.data.dataset, cfg.data.data_dir)
        self.dataset = ds
        self.train_x = ds.train_x.to(self.device)
        self.train_y = ds.train_y.to(self.device)
        self.test_x = ds.test_x.to(self.device)
        self.test_y = ds.test_y.to(self.device)
        with seeded_torch(cfg.seed, "init"):
            self.template: MultiExitNet = build_model(
                cfg.model.family, cfg.model.width, ds.num_classes, tuple(ds.input_shape)
            )
        self.costs: dict[int, DepthCost] = cost_table(self.template)
        self.plan = self._plan_fleet()
        self.client_models: dict[int, ClientModel] = {
            d: self._place(self.template.client_model(d)) for d in sorted(set(self.plan.depths))
        }
        self.server_model: ServerModel = self._place(self.template.server_model())
        self.client_keys = {d: list(m.state_dict()) for d, m in self.client_models.items()}
        full = self.template.state_dict()
        self.client_global: State = {
            k: full[k].clone() for keys in self.client_keys.values() for k in keys
        }
        self.server_global: State = {k: full[k].clone() for k in self.server_model.state_dict()}
        self.local_states: dict[int, State] = {}
        self.history: list[RoundRecord] = []
        self.start_round = 1
        labels = ds.train_y.cpu().numpy()
        self.test_sets = ood_test_sets(
            [labels[idx] for idx in self.plan.train_indices], ds.test_y.cpu().numpy(),
            cfg.data.test_per_client, cfg.data.rhos, cfg.seed,
        )

    def _place(self, module: torch.nn.Module) -> Any:
        module = module.to(self.device)
        if self.cfg.model.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def _plan_fleet(self) -> FleetPlan:
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
            depths = [self._depth_for_profile(profiles[p]) for p in names]
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
        return FleetPlan(depths, client_profiles, self._partition(n))

    def _check_depths(self, depths: list[int], key: str) -> None:
        allowed = self.template.split_depths
        bad = sorted({d for d in depths if d not in allowed})
        if bad:
            raise ValueError(f"{key}: split depth(s) {bad} not allowed for {self.template.family}; "
                             f"allowed: {list(allowed)}")

    def _depth_for_profile(self, profile: DeviceProfile) -> int:
        """Deepest allowed depth whose training step (≈3× forward FLOPs) fits the budget."""
        batch = self.cfg.train.batch_size
        fitting = [
            d for d in self.template.split_depths
            if 3 * batch * (self.costs[d].client_flops + self.costs[d].exit_head_flops) / profile.compute_flops
            <= self.cfg.fleet.step_budget_s
            and 4 * self.costs[d].client_param_bytes <= profile.memory_bytes
        ]
        return max(fitting) if fitting else min(self.template.split_depths)

    def _partition(self, n: int) -> list[np.ndarray]:
        d, seed = self.cfg.data, self.cfg.seed
        labels = self.dataset.train_y.cpu().numpy()
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

    # ----------------------------------------------------------------------------- rounds
    def client_start_state(self, i: int) -> State:
        """Client ``i``'s model at round start: ``λ·last local + (1−λ)·avg`` (avg if never trained)."""
        keys = self.client_keys[self.plan.depths[i]]
        avg = {k: self.client_global[k] for k in keys}
        if self.algorithm.lam == 0.0 or i not in self.local_states:
            return avg
        return personalise_mix(self.local_states[i], avg, self.algorithm.lam)

    def participants(self, rnd: int) -> list[int]:
        n = self.cfg.fleet.num_clients
        m = max(1, round(self.cfg.train.participation * n))
        if m >= n:
            return list(range(n))
        return sorted(int(i) for i in numpy_rng(self.cfg.seed, rnd, "participants").choice(n, m, replace=False))

    def _batches(self, i: int, ctx: SessionContext, purpose: str) -> BatchStream:
        idx = torch.as_tensor(self.plan.train_indices[i], dtype=torch.long, device=self.device)
        return BatchStream(self.train_x, self.train_y, idx, self.cfg.train.batch_size,
                           ctx.generator(purpose), self.cfg.model.channels_last)

    def run_client_session(self, i: int, rnd: int) -> tuple[State, State, int, Any]:
        """One (device, round) session; returns (client state, server replica, n_i, stats)."""
        depth = self.plan.depths[i]
        ctx = SessionContext(self.cfg.seed, rnd, i, self.cfg.train, self.device)
        client_model = self.client_models[depth]
        client_model.load_state_dict(self.client_start_state(i))
        self.server_model.load_state_dict(self.server_global)
        batches = self._batches(i, ctx, "batches")
        client = self.algorithm.client_side(client_model, batches, ctx)
        server = self.algorithm.server_session(self.server_model, depth, ctx)
        run_session(client, server, self.algorithm.steps_per_round(batches, self.cfg.train))
        return client.state(), server.state(), int(self.plan.train_indices[i].size), client.stats

    def run_round(self, rnd: int) -> RoundRecord:
        t0 = time.perf_counter()
        chosen = self.participants(rnd)
        self.progress("round_start", round=rnd, rounds=self.cfg.train.rounds, sessions=len(chosen))
        client_sum, server_sum = WeightedSum(), WeightedSum()
        totals = np.zeros(5)
        for i in chosen:
            c_state, s_state, n_i, stats = self.run_client_session(i, rnd)
            client_sum.add(c_state, n_i)
            server_sum.add(s_state, n_i)
            if self.algorithm.lam > 0.0:
                self.local_states[i] = _clone(c_state)
            totals += [stats.samples, stats.loss_exit, stats.loss_server, stats.correct_exit, stats.correct_server]
            self.progress("session_done", round=rnd, device=i)
        self.client_global = client_sum.average(self.client_global)
        self.server_global = server_sum.average(self.server_global)
        self._check_finite(rnd)
        record = self._round_record(rnd, len(chosen), totals, t0)
        if self._interim_eval_due(rnd):
            record.eval_accuracy = self.evaluate(personalise=False)["accuracy"]
        return record

    def _interim_eval_due(self, rnd: int) -> bool:
        """Whether round ``rnd`` is followed by an evaluation of the aggregated models
        (every ``eval.eval_every`` rounds, not after the last: the final evaluation follows it)."""
        every = self.cfg.eval.eval_every
        return bool(every) and rnd % every == 0 and rnd < self.cfg.train.rounds

    def _check_finite(self, rnd: int) -> None:
        """Raise :class:`TrainingDivergedError` if an aggregated model has NaN/Inf weights."""
        for side, state in (("client", self.client_global), ("server", self.server_global)):
            bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise TrainingDivergedError(
                    f"round {rnd}: the aggregated {side} model has non-finite values in {bad[:3]}; "
                    f"training diverged at train.lr = {self.cfg.train.lr} — lower train.lr"
                )

    @staticmethod
    def _round_record(rnd: int, participants: int, totals: np.ndarray, t0: float) -> RoundRecord:
        """The round's record from the summed session stats (samples, losses, correct counts)."""
        seen = max(1.0, totals[0])
        return RoundRecord(
            round=rnd, participants=participants, samples=int(totals[0]),
            train_loss_exit=totals[1] / seen, train_loss_server=totals[2] / seen,
            train_acc_exit=totals[3] / seen, train_acc_server=totals[4] / seen,
            seconds=time.perf_counter() - t0,
        )

    # ----------------------------------------------------------------------------- evaluation
    def personalised_model(self, i: int) -> ClientModel:
        """Client ``i``'s final on-device model, after the algorithm's personalisation."""
        model = self.client_models[self.plan.depths[i]]
        model.load_state_dict(self.client_start_state(i))
        ctx = SessionContext(self.cfg.seed, self.cfg.train.rounds + 1, i, self.cfg.train, self.device)
        self.algorithm.personalise(model, self._batches(i, ctx, "personalise"), ctx)
        return model

    def feature_dtype(self) -> torch.dtype:
        """The dtype of offloaded features (``train.feature_dtype``)."""
        return torch.float16 if self.cfg.train.feature_dtype == "float16" else torch.float32

    def client_evaluation(self, i: int, model: ClientModel, server: ServerPredict, *,
                          rhos: list[float] | None = None, taus: list[float] | None = None,
                          fixed_tau: float | None = None, measure: bool = True) -> ClientEvaluation:
        """Client ``i``'s side of the evaluation: its on-device model over its own test pools,
        the offloaded samples answered by ``server``, then the τ sweep per ρ (defaults: the
        config's). This is the code a device runs in the distributed runtime, with ``server``
        its ``infer`` exchange. ``measure``: also time batch-1 inference
        (``eval.measure_latency_samples`` repeats; skipped when that is 0)."""
        cfg = self.cfg
        rhos = list(cfg.data.rhos) if rhos is None else rhos
        taus = list(cfg.eval.taus) if taus is None else taus
        fixed_tau = cfg.eval.fixed_tau if fixed_tau is None else fixed_tau
        early = self.algorithm.early_exit
        ts = self.test_sets[i]
        counts = [ts.counts(r) for r in rhos]
        id_counts, ood_counts = [c[0] for c in counts], [c[1] for c in counts]
        n_id, n_ood = max(id_counts), max(ood_counts)
        idx = torch.as_tensor(np.concatenate([ts.id_pool[:n_id], ts.ood_pool[:n_ood]]), device=self.device)
        outputs = client_outputs(model, server, self.test_x[idx], self.test_y[idx], early, self.feature_dtype(),
                                 cfg.eval.batch_size, cfg.model.channels_last)
        scores = score_client(outputs, n_id, n_ood, id_counts, ood_counts, rhos, taus, fixed_tau)
        measured = None
        if measure and cfg.eval.measure_latency_samples > 0:
            measured = measure_latency_s(model, server, self.test_x[idx], early, cfg.eval.measure_latency_samples,
                                         self.feature_dtype(), cfg.model.channels_last)
        return ClientEvaluation(scores, measured)

    def evaluate_clients(self, personalise: bool = True) -> list[ClientEvaluation]:
        """Every client's :meth:`client_evaluation` against the global server model, in client
        order; batch-1 latency is measured once per split depth and shared by its clients."""
        self.server_model.load_state_dict(self.server_global)
        predict = server_predictor(self.server_model)
        measured: dict[int, tuple[float, float]] = {}
        evaluations = []
        for i in range(self.cfg.fleet.num_clients):
            depth = self.plan.depths[i]
            model = self.personalised_model(i) if personalise else self._avg_model(i)
            ev = self.client_evaluation(i, model, predict, measure=depth not in measured)
            if ev.measured_s is not None:
                measured[depth] = ev.measured_s
            evaluations.append(ClientEvaluation(ev.scores, measured.get(depth)))
        return evaluations

    def evaluate(self, personalise: bool = True) -> dict[str, Any]:
        """Accuracy (oracle τ and fixed τ), offload probability and latency per ρ."""
        cfg = self.cfg
        rhos = cfg.data.rhos
        profiles = load_profiles()
        server_rate = profiles[cfg.eval.server_profile].compute_flops
        early = self.algorithm.early_exit
        per_client = []
        for i, ev in enumerate(self.evaluate_clients(personalise)):
            depth = self.plan.depths[i]
            profile = profiles[self.plan.profiles[i]]
            rows = []
            for s in ev.scores:
                modelled = modelled_latency_s(
                    self.costs[depth], s.oracle.offload_probability if early else 1.0, profile.compute_flops,
                    profile.uplink_bps, server_rate, cfg.eval.bits_per_element, has_exit_head=early,
                )
                t_c, t_s = ev.measured_s if ev.measured_s is not None else (float("nan"), float("nan"))
                rows.append({
                    "rho": s.rho, "accuracy": s.oracle.accuracy, "tau": s.oracle.tau,
                    "offload_probability": s.oracle.offload_probability,
                    "accuracy_fixed_tau": s.fixed.accuracy,
                    "offload_probability_fixed_tau": s.fixed.offload_probability,
                    "latency_ms": 1e3 * modelled,
                    "measured_latency_ms": 1e3 * (t_c + s.oracle.offload_probability * t_s),
                })
            per_client.append({"client": i, "split_depth": depth, "profile": self.plan.profiles[i], "rho": rows})

        def mean_of(key: str, scale: float = 1.0) -> list[float]:
            return [scale * float(np.mean([c["rho"][k][key] for c in per_client])) for k in range(len(rhos))]

        return {
            "rho": list(rhos),
            "accuracy": mean_of("accuracy", 100.0),
            "accuracy_fixed_tau": mean_of("accuracy_fixed_tau", 100.0),
            "fixed_tau": cfg.eval.fixed_tau,
            "offload_probability": mean_of("offload_probability"),
            "offload_probability_fixed_tau": mean_of("offload_probability_fixed_tau"),
            "latency_ms": mean_of("latency_ms"),
            "measured_latency_ms": mean_of("measured_latency_ms"),
            "per_client": per_client,
        }

    def _avg_model(self, i: int) -> ClientModel:
        model = self.client_models[self.plan.depths[i]]
        model.load_state_dict(self.client_start_state(i))
        return model

    # ----------------------------------------------------------------------------- driver
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoint.pt"

    def _save_checkpoint(self, rnd: int) -> None:
        path = self.checkpoint_path()
        if path is None:
            return
        payload = {
            "round": rnd,
            "config": json.dumps(self.cfg.model_dump(), sort_keys=True),
            "client_global": self.client_global,
            "server_global": self.server_global,
            "local_states": {str(k): v for k, v in self.local_states.items()},
            "history": json.dumps([asdict(r) for r in self.history]),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def resume(self) -> int:
        """Load the last checkpoint in the output directory; returns the next round to run."""
        path = self.checkpoint_path()
        if path is None or not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume first")
        payload = torch.load(path, weights_only=True, map_location=self.device)
        if payload["config"] != json.dumps(self.cfg.model_dump(), sort_keys=True):
            raise ValueError(f"--resume: {path} was written by a different config; use a fresh --out directory")
        self.client_global = payload["client_global"]
        self.server_global = payload["server_global"]
        self.local_states = {int(k): v for k, v in payload["local_states"].items()}
        self.history = [RoundRecord(**r) for r in json.loads(payload["history"])]
        self.start_round = int(payload["round"]) + 1
        return self.start_round

    def train(self) -> list[RoundRecord]:
        for rnd in range(self.start_round, self.cfg.train.rounds + 1):
            record = self.run_round(rnd)
            self.history.append(record)
            self._save_checkpoint(rnd)
            self.progress("round_end", record=record)
        return self.history

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train every round, evaluate, and (with an output directory) write the results."""
        t0 = time.perf_counter()
        if resume:
            self.resume()
        self.train()
        self.progress("evaluate_start")
        evaluation = self.evaluate()
        results = {
            "name": self.cfg.name,
            "algorithm": self.algorithm.name,
            "seed": self.cfg.seed,
            "runtime": "local",
            "config": self.cfg.model_dump(),
            "fleet": {"split_depths": self.plan.depths, "profiles": self.plan.profiles,
                      "train_samples": [int(i.size) for i in self.plan.train_indices]},
            "costs": {str(d): asdict(c) for d, c in self.costs.items()},
            "rounds": [asdict(r) for r in self.history],
            "evaluation": evaluation,
            "wall_seconds": time.perf_counter() - t0,
            "machine": machine_info(self.device),
        }
        if self.out_dir is not None:
            write_results(self.out_dir, results)
        return results

    def model_state(self) -> dict[str, State]:
        """The trained global states (what the equivalence and determinism tests compare)."""
        return {"client": self.client_global, "server": self.server_global}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a run's bits depend on beyond its config: the same config on another CPU type can
    give other floats (the kernels torch picks depend on the instruction set), so results.json
    records the CPU, torch's kernel capability, its version and the thread count."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or platform.machine())
    info = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    """``results.json`` plus ``rounds.csv`` and ``evaluation.csv`` beside it."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    rounds = results["rounds"]
    if rounds:
        with open(out_dir / "rounds.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[k for k in rounds[0] if k != "eval_accuracy"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rounds)
    ev = results["evaluation"]
    with open(out_dir / "evaluation.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = ["accuracy", "accuracy_fixed_tau", "offload_probability", "latency_ms", "measured_latency_ms"]
        w.writerow(["rho", *keys])
        for k, rho in enumerate(ev["rho"]):
            w.writerow([rho, *(ev[key][k] for key in keys)])
