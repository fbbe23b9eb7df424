"""The engine: the one round loop and evaluation of a run, over a :class:`~harmony.fleet.Fleet`.

Per round: select participants; hand the fleet each one's round-start client state and the server
back end ``W_s``; collect the sessions' results as they complete; fold them (FedAvg of the server
replicas, depth-aware partial averaging of the client sides, weighted by ``n_i``) in participant
order; check the weights are finite; record the round. The rules live here once; the fleets
(:class:`~harmony.fleet.InProcessFleet` for the local runtime, ``orchestrator.fleet.MqttCeleryFleet``
for the distributed one) only do the work and report it. Every random choice comes from a stream
of (seed, round, device, purpose), so the same seed gives bit-identical weights on the CPU, in any
client order, in either runtime, and after ``--resume``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmony.aggregation import personalise_mix
from harmony.config import ExperimentConfig, evaluation_changes, training_view
from harmony.evaluate import ClientEvaluation
from harmony.experiment import Experiment, State
from harmony.fleet import Fleet, InProcessFleet, ProgressFn, ResumePoint, SessionResult, machine_info
from harmony.latency import modelled_latency_s
from harmony.profiles import load_profiles
from harmony.rounds import RoundFailedError, RoundPlan, plan_round

log = logging.getLogger(__name__)

__all__ = ["Engine", "LocalEngine", "RoundFailedError", "RoundRecord", "TrainingDivergedError", "machine_info",
           "write_results"]


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
    attempts: int = 1  # tries until the round met its quorum
    invited: int = 0  # participants of the successful try (``participants`` completed in time)
    stragglers: list[int] = field(default_factory=list)  # clients past the deadline, left out
    dropouts: list[int] = field(default_factory=list)  # clients that vanished mid-session, left out
    offline: list[int] = field(default_factory=list)  # clients unavailable at the round's start
    deadline_s: float | None = None
    clock_s: float | None = None  # the simulated clock at the round's end (simulated clock only)
    reassigned: list[dict[str, Any]] = field(default_factory=list)  # depth re-decisions after measured drift
    rejoined: list[int] = field(default_factory=list)  # completed again after being left out as gone


def _session_timing(result: SessionResult) -> dict[str, float]:
    """A session event's timing fields: ``seconds`` from the round's start (what the deadline
    measures) and, where the fleet knows when the device was told to start, ``queued_s`` (waiting
    for a worker thread, say) and ``train_s`` (the device's session itself)."""
    timing = {"seconds": result.seconds}
    if result.queued_s is not None:
        timing.update(queued_s=result.queued_s, train_s=max(0.0, result.seconds - result.queued_s))
    return timing


class TrainingDivergedError(RuntimeError):
    """A round produced NaN or Inf weights; the run stops rather than report garbage."""


class Engine:
    """Runs one experiment plan over a fleet. ``progress(event, **fields)`` reports rounds
    (``round_start``, ``session_done``, ``round_end``, ``evaluate_start``, …)."""

    def __init__(self, experiment: Experiment, fleet: Fleet, out_dir: str | Path | None = None,
                 progress: ProgressFn | None = None) -> None:
        self.experiment = experiment
        self.fleet = fleet
        self.cfg: ExperimentConfig = experiment.cfg
        self.algorithm = experiment.algorithm
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:  # an unusable --out fails here, before any training
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress or (lambda event, **fields: None)
        fleet.progress = self.progress
        self.client_global, self.server_global = experiment.initial_states()
        self.local_states: dict[int, State] = {}
        self.gone: set[int] = set()
        """Clients left out as dropouts or offline, not seen completing a session since."""
        self.history: list[RoundRecord] = []
        self.start_round = 1
        self.clock_s = 0.0
        """The run's simulated clock (``fleet.clock: simulated``): the sum of the rounds' modelled durations."""

    # ----------------------------------------------------------------------------- rounds
    def participants(self, rnd: int, available: list[int] | None = None, attempt: int = 0) -> list[int]:
        return self.experiment.participants(rnd, available, attempt)

    def client_start_state(self, i: int) -> State:
        """Client ``i``'s model at round start: ``λ·last local + (1−λ)·avg`` (avg if never trained)."""
        keys = self.experiment.client_keys[self.experiment.depths[i]]
        avg = {k: self.client_global[k] for k in keys}
        if self.algorithm.lam == 0.0 or i not in self.local_states:
            return avg
        return personalise_mix(self.local_states[i], avg, self.algorithm.lam)

    def run_session(self, i: int, rnd: int) -> SessionResult:
        """One session of client ``i`` in round ``rnd`` from the current global models, outside a
        round (nothing is aggregated or recorded): for benchmarks and probes."""
        plan = RoundPlan(rnd, 0, [i], [])
        return next(iter(self.fleet.train(rnd, {i: self.client_start_state(i)}, self.server_global, plan)))

    def run_round(self, rnd: int) -> RoundRecord:
        """One round: plan it (availability, participants, deadline, quorum — :mod:`harmony.rounds`),
        let the fleet run it, keep the sessions that completed in time, and fold them; below
        quorum the round is tried again (``fleet.round_retries``) with the devices then available."""
        t0 = time.perf_counter()
        fleet_cfg = self.cfg.fleet
        tries = fleet_cfg.round_retries + 1
        failures: list[str] = []
        lost: list[int] = []
        for attempt in range(tries):
            if lost and fleet_cfg.retry_grace_s > 0:  # devices restarting may be back in a few seconds
                self.fleet.wait_back(lost, fleet_cfg.retry_grace_s)
            plan = plan_round(self.experiment, rnd, attempt, self.clock_s, draw=self.participants,
                              unreachable=self.fleet.unreachable(), derive_deadline=self.fleet.concurrent)
            results, late, dropped, round_s = self._run_try(plan)
            if len(results) >= plan.quorum:
                break
            self.clock_s += round_s if plan.deadline_s is None else plan.deadline_s
            lost = sorted(set(dropped) | set(plan.offline))
            reason = (f"round {rnd} try {attempt + 1} of {tries}: {len(results)} of {len(plan.participants)} "
                      f"invited sessions completed, quorum {plan.quorum}"
                      + (f" (offline: {plan.offline})" if plan.offline else ""))
            failures.append(reason)
            message = f"{reason}; {'trying again' if attempt + 1 < tries else 'giving up'}"
            log.warning("%s", message)
            self.progress("round_retry", round=rnd, attempt=attempt, reason=reason, message=message,
                          retrying=attempt + 1 < tries)
            self.fleet.round_failed(rnd, reason)
        else:
            raise RoundFailedError(f"round {rnd} fell below quorum in all {tries} tries: " + "; ".join(failures)
                                   + " (lower fleet.quorum, raise fleet.round_deadline_s, or bring devices back)")
        self.clock_s += round_s
        self.client_global, self.server_global = self.fleet.aggregate(rnd, results, self.client_global,
                                                                      self.server_global)
        totals = np.zeros(5)
        for result in results:
            totals += result.stats.vector()
            if self.algorithm.lam > 0.0:
                self.local_states[result.client] = result.state
        try:
            self._check_finite(rnd)
        except TrainingDivergedError as err:
            self.fleet.round_failed(rnd, str(err))
            raise
        record = self._round_record(rnd, len(results), totals, t0)
        record.attempts = plan.attempt + 1
        record.invited = len(plan.participants)
        record.stragglers, record.dropouts, record.offline = late, dropped, plan.offline
        record.rejoined = sorted(res.client for res in results if res.client in self.gone)
        self.gone = (self.gone - {res.client for res in results}) | set(dropped) | set(plan.offline)
        for i in record.rejoined:
            self.progress("rejoined", round=rnd, device=i)
        record.deadline_s = plan.deadline_s
        record.clock_s = self.clock_s if self.cfg.fleet.clock == "simulated" else None
        record.reassigned = self._reassign_drifted(rnd, results)
        if self._interim_eval_due(rnd):
            record.eval_accuracy = self.evaluate(personalise=False, rnd=rnd)["accuracy"]
        self.fleet.round_done(rnd, asdict(record), results)
        return record

    def _run_try(self, plan: RoundPlan) -> tuple[list[SessionResult], list[int], list[int], float]:
        """One try of a round: (the completed sessions in participant order, stragglers, dropouts,
        the try's duration on the run's clock)."""
        rnd = plan.round
        done: dict[int, SessionResult] = {}
        late: list[int] = []
        dropped: list[int] = []
        longest = 0.0
        if plan.hopeless(0, 0):  # too few devices reachable: no session is started
            log.info("round %d try %d: %d device(s) reachable, quorum %d: no session started", rnd, plan.attempt + 1,
                     len(plan.participants), plan.quorum)
            return [], [], [], 0.0
        self.progress("round_start", round=rnd, rounds=self.cfg.train.rounds, sessions=len(plan.participants),
                      attempt=plan.attempt, deadline_s=plan.deadline_s)
        starts = {i: self.client_start_state(i) for i in plan.participants}
        sessions = self.fleet.train(rnd, starts, self.server_global, plan)
        for result in sessions:
            timing = _session_timing(result)
            if result.status == "dropped":
                dropped.append(result.client)
                self.progress("session_dropped", round=rnd, device=result.client, **timing)
            elif result.status == "late" or (plan.deadline_s is not None and result.seconds > plan.deadline_s):
                late.append(result.client)
                self.progress("session_late", round=rnd, device=result.client, **timing)
            else:
                done[result.client] = result
                longest = max(longest, result.seconds)
                self.progress("session_done", round=rnd, device=result.client, **timing,
                              steps=self.experiment.steps(result.client))
            if plan.hopeless(len(done), len(late) + len(dropped)):
                # the quorum is out of reach: end the try now (the fleet stops the sessions still running)
                log.info("round %d try %d: %d left out, quorum %d out of reach; ending the try", rnd,
                         plan.attempt + 1, len(late) + len(dropped), plan.quorum)
                break
        close = getattr(sessions, "close", None)  # a generator: its fleet stops what still runs
        if close is not None:
            close()
        round_s = plan.deadline_s if late and plan.deadline_s is not None else longest
        order = [i for i in plan.participants if i in done]  # participant order, whatever order they finished in
        return [done[i] for i in order], sorted(late), sorted(dropped), round_s

    def _reassign_drifted(self, rnd: int, results: list[SessionResult]) -> list[dict[str, Any]]:
        """``fleet.reassign_drift``: a device whose measured client compute per step (what it
        reported, ``SessionResult.extra["compute_s"]``) differs from its decision's estimate by
        more than that fraction gets its depth decided again from what it measured; a device that
        changes depth starts from the global model there (its personal state is of the old depth)."""
        drift = self.cfg.fleet.reassign_drift
        ex = self.experiment
        if drift is None or ex.decisions is None:
            return []
        events: list[dict[str, Any]] = []
        moved: list[int] = []
        for result in results:
            compute_s = result.extra.get("compute_s")
            if compute_s is None or compute_s <= 0:
                continue
            i = result.client
            old = ex.decisions[i]
            measured = compute_s / self.experiment.steps(i)
            if abs(measured / old.needs.compute_s - 1.0) <= drift:
                continue
            new = ex.redecide(i, measured)
            event = {"client": i, "device": old.device, "from_depth": old.depth, "to_depth": new.depth,
                     "measured_step_s": measured, "estimated_step_s": old.needs.compute_s, "reason": new.reason}
            events.append(event)
            self.progress("reassigned", round=rnd, **event)
            if new.depth != old.depth:
                ex.set_depth(i, new.depth)
                self.local_states.pop(i, None)
                moved.append(i)
                # a depth no client held yet: its exit head starts from the template
                fresh, _ = ex.initial_states()
                self.client_global.update({k: v for k, v in fresh.items() if k not in self.client_global})
        if moved:
            self.fleet.reassign(moved)
        return events

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
    def evaluate_clients(self, personalise: bool = True, rnd: int | None = None) -> dict[int, ClientEvaluation]:
        """Every client's evaluation against the global server model, in client order (the final
        one, ``personalise``, in the evaluation round; a periodic one in round ``rnd``)."""
        if rnd is None:
            rnd = self.experiment.eval_round
        models = {i: self.client_start_state(i) for i in range(self.experiment.num_clients)}
        return self.fleet.evaluate(rnd, models, self.server_global, personalise)

    def evaluate(self, personalise: bool = True, rnd: int | None = None) -> dict[str, Any]:
        """Accuracy, offload probability and latency per ρ under the headline τ policy
        (``eval.tau_policy``, default the oracle τ), the fixed τ, and every τ policy evaluated
        (``policies``: the oracle and fixed τ, and with a validation split the thresholds each
        device chose there; docs/design.md §14)."""
        cfg, ex = self.cfg, self.experiment
        headline = cfg.eval.tau_policy
        rhos = cfg.data.rhos
        profiles = load_profiles()
        server_rate = profiles[cfg.eval.server_profile].compute_flops
        early = self.algorithm.early_exit
        per_client = []
        evaluations = self.evaluate_clients(personalise, rnd)
        missing = [i for i in range(ex.num_clients) if i not in evaluations]
        if not evaluations:
            raise RoundFailedError(f"evaluation: none of the {ex.num_clients} devices could be evaluated (all gone)")
        if missing:
            log.warning("evaluation without clients %s: their devices are gone", missing)
            self.progress("evaluation_incomplete", missing=missing)
        for i, ev in evaluations.items():
            depth = ex.depths[i]
            profile = ex.client_profile(i)  # its measured figures where its hello decided its depth
            rows = []
            for s in ev.scores:
                chosen = s.policy(headline)
                modelled = modelled_latency_s(
                    ex.costs[depth], chosen.offload_probability if early else 1.0, profile.compute_flops,
                    profile.uplink_bps, server_rate, cfg.eval.bits_per_element, has_exit_head=early,
                )
                t_c, t_s = ev.measured_s if ev.measured_s is not None else (float("nan"), float("nan"))
                rows.append({
                    "rho": s.rho, "accuracy": chosen.accuracy, "tau": chosen.tau,
                    "offload_probability": chosen.offload_probability,
                    "accuracy_fixed_tau": s.fixed.accuracy,
                    "offload_probability_fixed_tau": s.fixed.offload_probability,
                    "latency_ms": 1e3 * modelled,
                    "measured_latency_ms": 1e3 * (t_c + chosen.offload_probability * t_s),
                    "policies": {name: {"tau": p.tau, "accuracy": p.accuracy,
                                        "offload_probability": p.offload_probability}
                                 for name, p in s.all_policies().items()},
                })
            per_client.append({"client": i, "split_depth": depth, "profile": ex.profiles[i],
                               "compute_flops": profile.compute_flops, "uplink_bps": profile.uplink_bps,
                               "figures": profile.source, "rho": rows})

        def mean_of(key: str, scale: float = 1.0) -> list[float]:
            return [scale * float(np.mean([c["rho"][k][key] for c in per_client])) for k in range(len(rhos))]

        def policy_mean(name: str, key: str, scale: float = 1.0) -> list[float]:
            return [scale * float(np.mean([c["rho"][k]["policies"][name][key] for c in per_client]))
                    for k in range(len(rhos))]

        # the policies every evaluated client has (a device without a validation split has only two)
        names = [n for n in per_client[0]["rho"][0]["policies"]
                 if all(n in c["rho"][0]["policies"] for c in per_client)]
        return {
            "rho": list(rhos),
            "tau_policy": headline,
            "policies": {n: {"accuracy": policy_mean(n, "accuracy", 100.0),
                             "offload_probability": policy_mean(n, "offload_probability")} for n in names},
            "accuracy": mean_of("accuracy", 100.0),
            "accuracy_fixed_tau": mean_of("accuracy_fixed_tau", 100.0),
            "fixed_tau": cfg.eval.fixed_tau,
            "offload_probability": mean_of("offload_probability"),
            "offload_probability_fixed_tau": mean_of("offload_probability_fixed_tau"),
            "latency_ms": mean_of("latency_ms"),
            "measured_latency_ms": mean_of("measured_latency_ms"),
            "per_client": per_client,
            "unevaluated": missing,  # clients whose devices were gone: the means are over the others
        }

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
        """Load the last checkpoint in the output directory; returns the next round to run. The
        config must be the checkpoint's, but for the evaluation-only keys of a finished run
        (:data:`harmony.config.EVALUATION_ONLY_KEYS`), which then only evaluate again."""
        path = self.checkpoint_path()
        if path is None or not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume first")
        payload = torch.load(path, weights_only=True, map_location=self.experiment.torch_device)
        if payload["config"] != json.dumps(self.cfg.model_dump(), sort_keys=True):
            old, new = json.loads(payload["config"]), self.cfg.model_dump()
            same_training = training_view(old) == training_view(new)
            if not (same_training and int(payload["round"]) >= self.cfg.train.rounds):
                hint = " (evaluation settings may change only once training has finished)" if same_training else ""
                raise ValueError(f"--resume: {path} was written by a different config; use a fresh --out "
                                 f"directory{hint}")
            log.info("--resume: training finished; evaluating again with other %s",
                     ", ".join(evaluation_changes(old, new)))
        self._restore(ResumePoint(int(payload["round"]), payload["client_global"], payload["server_global"],
                                  {int(k): v for k, v in payload["local_states"].items()},
                                  json.loads(payload["history"])))
        return self.start_round

    def _restore(self, point: ResumePoint) -> None:
        self.client_global, self.server_global = point.client_global, point.server_global
        self.local_states = dict(point.local_states)
        self.history = [RoundRecord(**r) for r in point.records]
        self.start_round = point.last_round + 1

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
        point = self.fleet.begin_run(resume)
        if point is not None:
            self._restore(point)
        elif resume and not self.fleet.resumes_itself:
            self.resume()
        self.train()
        self.progress("evaluate_start")
        evaluation = self.evaluate()
        ex = self.experiment
        results = {
            "name": self.cfg.name,
            "algorithm": self.algorithm.name,
            "seed": self.cfg.seed,
            "runtime": self.fleet.runtime,
            "config": self.cfg.model_dump(),
            "fleet": {"split_depths": ex.depths, "profiles": ex.profiles, "train_samples": ex.samples,
                      "assignment": None if ex.decisions is None else [d.as_dict() for d in ex.decisions]},
            "costs": {str(d): asdict(c) for d, c in ex.costs.items()},
            "rounds": [asdict(r) for r in self.history],
            "evaluation": evaluation,
            "wall_seconds": time.perf_counter() - t0,
            **self.fleet.describe(),
        }
        if self.out_dir is not None:
            write_results(self.out_dir, results)
        return results

    def model_state(self) -> dict[str, State]:
        """The trained global states (what the equivalence and determinism tests compare)."""
        return {"client": self.client_global, "server": self.server_global}

    def close(self) -> None:
        self.fleet.close()


class LocalEngine(Engine):
    """The local runtime: the config's plan over an :class:`~harmony.fleet.InProcessFleet`
    (every device in this process). A constructor only; the round loop is :class:`Engine`'s."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None = None,
                 progress: ProgressFn | None = None) -> None:
        experiment = Experiment.plan(cfg)
        if cfg.fleet.assignment == "measured" and experiment.decisions is None:
            raise ValueError("fleet.assignment: measured in the local runtime needs fleet.profiles (the emulated "
                             "devices' figures stand for their measurements); on a stack (harmony run --stack) the "
                             "agents' measured hello is used")
        super().__init__(experiment, InProcessFleet(experiment), out_dir, progress)


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    """``results.json`` plus ``rounds.csv`` and ``evaluation.csv`` beside it."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    rounds = results["rounds"]
    if rounds:
        with open(out_dir / "rounds.csv", "w", newline="") as f:
            scalars = [k for k, v in rounds[0].items() if k != "eval_accuracy" and not isinstance(v, list)]
            w = csv.DictWriter(f, fieldnames=scalars, extrasaction="ignore")
            w.writeheader()
            w.writerows(rounds)
    ev = results["evaluation"]
    with open(out_dir / "evaluation.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = ["accuracy", "accuracy_fixed_tau", "offload_probability", "latency_ms", "measured_latency_ms"]
        w.writerow(["rho", *keys])
        for k, rho in enumerate(ev["rho"]):
            w.writerow([rho, *(ev[key][k] for key in keys)])
