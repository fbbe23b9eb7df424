"""The distributed round driver: ``LocalEngine`` with the transport swapped for MQTT, Celery and Redis.

Sameness by construction: :class:`DistributedEngine` inherits everything from the local engine —
data, partitions, split depths, participant selection, ``client_start_state``, evaluation, results —
and overrides only ``run_round``. Per round (state machine in ``hsfl:round:{r}``: planned → running →
aggregating → done, or failed):

1. store the server back end ``W_s`` and each participant's round-start client state in Redis
   (``hsfl:model:{sha}``) and publish the client states as retained blobs;
2. enqueue one ``hsfl.session`` Celery task per participant (ids and hashes only);
3. when a session reports it is subscribed (``hsfl:round:{r}:ready``), command its device with
   ``round_start`` (a redelivered session reports a new token and the device replays the round);
4. wait for ``hsfl:round:{r}:done``, run ``hsfl.aggregate`` (each session's ``θ_i`` weighted by ``n_i`` in float64 and
   merged in client order, exactly the local ``WeightedSum`` arithmetic), load the aggregated states.

Evaluation runs where it would on real hardware (:meth:`DistributedEngine.evaluate_clients`): each
device personalises (``personalise``), then evaluates its model on its own test set (``evaluate``)
with the local engine's own per-client code, offloading to one ``hsfl.infer`` Celery task per
device (``infer`` → ``infer_reply`` over MQTT) and sending its per-client result (``eval_report``),
which that task stores in ``hsfl:round:{r}:eval``. This process only averages the reports into
the table, with the local engine's code; the numbers equal the local engine's bit for bit
(``harmony.evaluate`` says why). Only "measured latency" differs by nature: each device times
itself, and its server part is the real ``infer`` round trip rather than a server forward.

Restarts. Each try of a round gets an ``attempt`` id in ``hsfl:round:{r}``; session tasks of an
older attempt skip or stop (``server.state.TaskGuard``), so an orchestrator killed mid-round and
started again with ``resume`` re-runs that round from its round-start state (the last finished
round's models, read back from Redis with the run history) without stale sessions holding
worker threads or talking to the devices. A fresh (non-resume) ``run`` starts a new run record.

Departures from DESIGN.md, with reasons: the run manifest (config + device → client index) is a
blob whose hash is ``assign.config_digest`` and is also kept in Redis as ``hsfl:config:{sha}`` (a key
§5 does not list) so workers can rebuild the plan; the round driver runs in the ``harmony run``
process and the long-running ``orchestrator`` process only keeps the registry; round keys are not
namespaced by run, so a stack serves one experiment at a time (a new run clears them).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery

from broker.blobs import BlobAssembler, bytes_to_state_dict, sha256_hex, split_blob, state_dict_to_bytes
from broker.client import BrokerClient
from broker.schemas import Assign, EvalReport, Evaluate, Personalise, RoundStart
from broker.topics import Topics
from harmony.config import ExperimentConfig
from harmony.engine import LocalEngine, ProgressFn, RoundRecord, TrainingDivergedError, _clone, write_results
from harmony.evaluate import ClientEvaluation, ClientScore, ThresholdScore
from harmony.timing import PhaseClock
from orchestrator.registry import Registry
from server import state
from server.app import QUEUE

WAKE_S = 0.5
"""Longest wait between two looks at a round's state in Redis; tasks wake the orchestrator at once
through ``state.notify`` (a BLPOP rather than polling Redis every 10 ms, which competed with the
sessions for the CPU); this bounds the wait when a wake-up is lost (e.g. Redis restarted)."""

log = logging.getLogger(__name__)


class RoundFailedError(RuntimeError):
    """A round missed its deadline or a session failed; the round is marked ``failed`` in Redis."""


class DistributedEngine(LocalEngine):
    """Runs an experiment over a running stack (Mosquitto, Redis, Celery workers, agents)."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None = None, progress: ProgressFn | None = None,
                 *, mqtt: tuple[str, int], redis_url: str, topics: Topics | None = None,
                 username: str | None = None, password: str | None = None,
                 devices_timeout_s: float = 120.0, round_timeout_s: float = 900.0) -> None:
        super().__init__(cfg, out_dir, progress)
        self.redis_url = redis_url
        self.r = state.connect(redis_url)
        self.celery = Celery("hsfl", broker=redis_url, backend=redis_url)
        self.celery.conf.update(task_default_queue=QUEUE, task_serializer="json", result_serializer="json",
                                accept_content=["json"])
        self.topics = topics or Topics()
        self.round_timeout_s = round_timeout_s
        self.mqtt = BrokerClient(f"orchestrator-{uuid.uuid4().hex[:8]}", mqtt[0], mqtt[1], username=username,
                                 password=password, topics=self.topics, clean_start=True, session_expiry_s=0)
        self.mqtt.connect()
        self.registry = Registry(self.mqtt, self.r)
        n = cfg.fleet.num_clients
        self.device_ids = self.registry.wait_for(n, devices_timeout_s)[:n]
        self.published: dict[str, int] = {}
        self._eval_round = cfg.train.rounds + 1
        self._assign()

    # ------------------------------------------------------------------------------ set-up
    def _assign(self) -> None:
        manifest = {"config": self.cfg.model_dump(mode="json"),
                    "clients": {dev: i for i, dev in enumerate(self.device_ids)}}
        data = json.dumps(manifest, sort_keys=True).encode()
        self.manifest_sha = sha256_hex(data)
        self.r.set(state.config_key(self.manifest_sha), data)
        self._publish(data)
        for i, dev in enumerate(self.device_ids):
            self.r.hset(state.dev_key(dev), mapping={"client": i, "split_depth": self.plan.depths[i]})
            self.mqtt.send(self.topics.cmd(dev), Assign(split_depth=self.plan.depths[i],
                                                        algorithm=self.cfg.train.algorithm,
                                                        config_digest=self.manifest_sha))

    def _ensure_run(self) -> None:
        """Rounds driven without :meth:`run` (``run_round`` alone) belong to a run of this manifest."""
        if self.r.hget(state.run_key(), "manifest") != self.manifest_sha.encode():
            self._reset_run()

    def _reset_run(self) -> None:
        """A fresh run of this manifest: forget the rounds of any earlier run (which ``resume`` would read)."""
        self._clear_rounds()
        self.r.delete(state.run_key())
        self.r.hset(state.run_key(), mapping={"id": uuid.uuid4().hex, "manifest": self.manifest_sha,
                                              "last_round": 0})

    def _clear_rounds(self) -> None:
        for pattern in (f"{state.PREFIX}round:*", f"{state.PREFIX}agg:*"):
            keys = list(self.r.scan_iter(pattern))
            if keys:
                self.r.delete(*keys)

    def _publish(self, data: bytes) -> str:
        sha = sha256_hex(data)
        if sha not in self.published:
            self.mqtt.publish_blob(data)
            self.published[sha] = len(split_blob(data))
        return sha

    def _unpublish(self, keep: set[str]) -> None:
        for sha, count in list(self.published.items()):
            if sha not in keep and sha != self.manifest_sha:
                self.mqtt.clear_blob(sha, count)
                del self.published[sha]

    def close(self) -> None:
        self._unpublish(set())
        self.mqtt.close()

    # ------------------------------------------------------------------------------ rounds
    def run_round(self, rnd: int) -> RoundRecord:
        t0 = time.perf_counter()
        clock = PhaseClock("publish", "sessions", "aggregate", "load")  # the round_done event's split
        self._ensure_run()
        chosen = self.participants(rnd)
        devs = [self.device_ids[i] for i in chosen]
        self.progress("round_start", round=rnd, rounds=self.cfg.train.rounds, sessions=len(chosen))
        r = self.r
        with clock("publish"):
            server_sha, client_prev_sha, client_shas, steps = self._start_round(rnd, chosen, devs)
        with clock("sessions"):
            self._await_sessions(rnd, chosen, devs, client_shas, server_sha, steps)
        r.hset(state.round_key(rnd), "state", "aggregating")
        with clock("aggregate"):
            result = self.celery.send_task("hsfl.aggregate", kwargs={
                "rnd": rnd, "devices": devs, "client_prev_sha": client_prev_sha, "server_prev_sha": server_sha,
            }).get(timeout=self.round_timeout_s)
        with clock("load"):
            self.client_global = state.get_model(r, result["client_sha"])
            self.server_global = state.get_model(r, result["server_sha"])
            totals = np.zeros(5)
            for i, stats, upload in zip(chosen, result["stats"], result["uploads"], strict=True):
                totals += stats
                if self.algorithm.lam > 0.0:
                    self.local_states[i] = _clone(state.get_model(r, upload))
        try:
            self._check_finite(rnd)
        except TrainingDivergedError:
            r.hset(state.round_key(rnd), "state", "failed")
            raise
        record = self._round_record(rnd, len(chosen), totals, t0)
        if self._interim_eval_due(rnd):
            self._eval_round = rnd
            record.eval_accuracy = self.evaluate(personalise=False)["accuracy"]
        r.hset(state.round_key(rnd), mapping={"state": "done", "client_sha": result["client_sha"],
                                              "server_sha": result["server_sha"],
                                              "uploads": json.dumps(result["uploads"]),
                                              "record": json.dumps(asdict(record))})
        r.hset(state.run_key(), "last_round", rnd)
        state.event(r, "round_done", round=rnd, split=clock.seconds())
        return record

    def _start_round(self, rnd: int, chosen: list[int], devs: list[str]
                     ) -> tuple[str, str, dict[int, str], dict[str, int]]:
        """Store and publish the round-start models, plan the round in Redis and enqueue its
        sessions; returns (server sha, previous client sha, each client's start sha, steps per device)."""
        r = self.r
        server_sha, _ = state.put_model(r, self.server_global)
        client_prev_sha, _ = state.put_model(r, self.client_global)
        client_shas = {}
        for i in chosen:
            sha, data = state.put_model(r, self.client_start_state(i))
            client_shas[i] = self._publish(data)
        self._unpublish(set(client_shas.values()))
        attempt = uuid.uuid4().hex[:12]
        pipe = r.pipeline(transaction=True)
        pipe.delete(state.ready_key(rnd), state.done_key(rnd), state.eval_key(rnd), state.notify_key(rnd),
                    *(state.agg_key(rnd, d) for d in devs))
        pipe.hset(state.round_key(rnd), mapping={"state": "planned", "participants": json.dumps(devs),
                                                 "deadline": time.time() + self.round_timeout_s,
                                                 "attempt": attempt})
        pipe.execute()
        steps = {}
        for i, dev in zip(chosen, devs, strict=True):
            ctx_batches = self._batches(i, self._ctx(rnd, i), "batches")
            steps[dev] = self.algorithm.steps_per_round(ctx_batches, self.cfg.train)
            self.celery.send_task("hsfl.session", kwargs={
                "rnd": rnd, "dev": dev, "index": i, "manifest_sha": self.manifest_sha, "server_sha": server_sha,
                "steps": steps[dev], "timeout_s": self.round_timeout_s, "attempt": attempt})
        r.hset(state.round_key(rnd), "state", "running")
        state.event(r, "round_running", round=rnd, sessions=len(devs))
        return server_sha, client_prev_sha, client_shas, steps

    def _ctx(self, rnd: int, i: int) -> Any:
        from harmony.algorithms import SessionContext

        return SessionContext(self.cfg.seed, rnd, i, self.cfg.train, self.device)

    def _await_sessions(self, rnd: int, chosen: list[int], devs: list[str], client_shas: dict[int, str],
                        server_sha: str, steps: dict[str, int]) -> None:
        """Command each device once its session is subscribed; return when every session is done."""
        commanded: dict[str, bytes] = {}
        done: set[str] = set()
        deadline = time.monotonic() + self.round_timeout_s
        index = dict(zip(devs, chosen, strict=True))
        while True:
            ready = self.r.hgetall(state.ready_key(rnd))
            for dev_b, token in ready.items():
                dev = dev_b.decode()
                if dev in index and commanded.get(dev) != token:
                    commanded[dev] = token
                    self.mqtt.send(self.topics.cmd(dev), RoundStart(
                        round=rnd, steps=steps[dev], client_model_sha256=client_shas[index[dev]],
                        server_model_sha256=server_sha, deadline_ts=time.time() + self.round_timeout_s), round=rnd)
            now_done = {d.decode() for d in self.r.smembers(state.done_key(rnd))} & set(devs)
            for dev in sorted(now_done - done, key=devs.index):
                self.progress("session_done", round=rnd, device=index[dev])
            done = now_done
            if done == set(devs):
                return
            if time.monotonic() > deadline:
                self.r.hset(state.round_key(rnd), "state", "failed")
                raise RoundFailedError(f"round {rnd}: sessions of {sorted(set(devs) - done)} did not finish within "
                                       f"{self.round_timeout_s} s (see the worker and agent logs)")
            state.wait_notify(self.r, rnd, WAKE_S)

    # ------------------------------------------------------------------------------ evaluation
    def personalised_model(self, i: int) -> Any:
        """Device ``i`` personalises (``personalise`` command); its model comes back as a blob."""
        if not self._personalises():
            return super().personalised_model(i)
        data = self._personalise_on_devices([i])[i]
        model = self.client_models[self.plan.depths[i]]
        model.load_state_dict(bytes_to_state_dict(data))
        return model

    def _personalises(self) -> bool:
        from harmony.algorithms.base import Algorithm

        return type(self.algorithm).personalise is not Algorithm.personalise

    def _personalise_on_devices(self, clients: list[int]) -> dict[int, bytes]:
        """Send ``personalise`` to every device in ``clients`` at once; their models as state-dict bytes."""
        rnd = self.cfg.train.rounds + 1
        subs = {i: self.mqtt.subscribe(self.topics.up(self.device_ids[i])) for i in clients}
        out: dict[int, bytes] = {}
        try:
            for i in clients:
                sha = self._publish(state_dict_to_bytes(self.client_start_state(i)))
                command = Personalise(steps=max(1, self.cfg.train.finetune_steps), lr=self.cfg.train.finetune_lr,
                                      model_sha256=sha)
                self.mqtt.send(self.topics.cmd(self.device_ids[i]), command, round=rnd)
            deadline = time.monotonic() + self.round_timeout_s
            for i in clients:
                assembler: BlobAssembler | None = None
                data = None
                while data is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RoundFailedError(f"device {self.device_ids[i]} did not upload its personalised model "
                                               f"within {self.round_timeout_s} s (see the agent log)")
                    env = self.mqtt.wait_for("blob_chunk", lambda e: e.round == rnd, timeout=remaining,
                                             subscription=subs[i])
                    assembler = assembler or BlobAssembler(env.body.sha256)
                    if env.body.sha256 == assembler.sha256 and env.body.index in (assembler.missing()
                                                                                  or [env.body.index]):
                        data = assembler.add(env.body)
                out[i] = data
        finally:
            for sub in subs.values():
                self.mqtt.unsubscribe(sub)
        return out

    def evaluate_clients(self, personalise: bool = True) -> list[ClientEvaluation]:
        """Every device evaluates its own model against the global server model (see the module docstring).

        The evaluation round (envelope ``round`` and Redis keys) is ``train.rounds + 1`` for the final
        evaluation and the round just finished for a periodic one (``eval.eval_every``)."""
        cfg, r = self.cfg, self.r
        rnd = cfg.train.rounds + 1 if personalise else self._eval_round
        clients = list(range(cfg.fleet.num_clients))
        server_sha, _ = state.put_model(r, self.server_global)
        if personalise and self._personalises():
            blobs = self._personalise_on_devices(clients)
        else:
            blobs = {i: state_dict_to_bytes(self.client_start_state(i)) for i in clients}
        shas = {i: self._publish(blobs[i]) for i in clients}
        devs = [self.device_ids[i] for i in clients]
        attempt = uuid.uuid4().hex[:12]
        pipe = r.pipeline(transaction=True)
        pipe.hdel(state.ready_key(rnd), *(f"infer:{d}" for d in devs))
        pipe.delete(state.eval_key(rnd))
        pipe.hset(state.round_key(rnd), "eval_attempt", attempt)
        pipe.execute()
        for dev in devs:
            self.celery.send_task("hsfl.infer", kwargs={
                "dev": dev, "manifest_sha": self.manifest_sha, "server_sha": server_sha,
                "idle_s": self.round_timeout_s, "rnd": rnd, "attempt": attempt})
        command = {i: Evaluate(model_sha256=shas[i], rhos=list(cfg.data.rhos), entropy_thresholds=list(cfg.eval.taus),
                               fixed_tau=cfg.eval.fixed_tau) for i in clients}
        reports = self._await_reports(rnd, attempt, dict(zip(devs, clients, strict=True)), command)
        return [self._client_evaluation(self.device_ids[i], reports[self.device_ids[i]]) for i in clients]

    def _await_reports(self, rnd: int, attempt: str, index: dict[str, int], command: dict[int, Evaluate]
                       ) -> dict[str, EvalReport]:
        """Command each device once its ``hsfl.infer`` task is subscribed (again, if that task was
        redelivered); return when every device's report is in Redis."""
        commanded: dict[str, bytes] = {}
        reports: dict[str, EvalReport] = {}
        deadline = time.monotonic() + self.round_timeout_s
        while True:
            for field, token in self.r.hgetall(state.ready_key(rnd)).items():
                dev = field.decode().removeprefix("infer:")
                if field.startswith(b"infer:") and dev in index and dev not in reports and commanded.get(dev) != token:
                    commanded[dev] = token
                    self.mqtt.send(self.topics.cmd(dev), command[index[dev]], round=rnd)
            for dev_b, raw in self.r.hgetall(state.eval_key(rnd)).items():
                doc = json.loads(raw)
                dev = dev_b.decode()
                if doc["attempt"] == attempt and dev in index and dev not in reports:
                    reports[dev] = EvalReport(**doc["report"])
                    self.progress("evaluation_done", device=index[dev])
            if len(reports) == len(index):
                return reports
            if time.monotonic() > deadline:
                raise RoundFailedError(f"evaluation {rnd}: devices {sorted(set(index) - set(reports))} did not report "
                                       f"within {self.round_timeout_s} s (see the worker and agent logs)")
            state.wait_notify(self.r, rnd, WAKE_S)

    def _client_evaluation(self, dev: str, report: EvalReport) -> ClientEvaluation:
        """A device's report as the local engine's :class:`ClientEvaluation` (same floats, same order)."""
        if report.rhos != list(self.cfg.data.rhos):
            raise ValueError(f"device {dev}: eval_report.rhos {report.rhos} differ from data.rhos "
                             f"{list(self.cfg.data.rhos)} (is the agent running another config?)")
        scores = [ClientScore(rho, ThresholdScore(tau, acc, off), ThresholdScore(report.fixed_tau, acc_f, off_f))
                  for rho, acc, tau, off, acc_f, off_f in zip(
                      report.rhos, report.accuracy, report.tau, report.offload_probability,
                      report.accuracy_fixed_tau, report.offload_probability_fixed_tau, strict=True)]
        measured = None
        if report.client_latency_s is not None and report.server_latency_s is not None:
            measured = (report.client_latency_s, report.server_latency_s)
        return ClientEvaluation(scores, measured)

    # ------------------------------------------------------------------------------ driver
    def run(self, resume: bool = False) -> dict[str, Any]:
        if resume:
            self.resume_from_redis()
        else:
            self._reset_run()
        results = super().run(resume=False)
        results["runtime"] = "distributed"
        results["devices"] = self.device_ids
        del results["machine"]  # the training ran on the workers and devices, not in this process
        if self.out_dir is not None:
            write_results(self.out_dir, results)
        return results

    def resume_from_redis(self) -> int:
        """Continue after an orchestrator restart: the last done round's models and the run's
        round records from Redis; returns the next round to run."""
        run = self.r.hgetall(state.run_key())
        if run.get(b"manifest", b"").decode() != self.manifest_sha:
            raise ValueError(f"--resume: the run in Redis ({state.run_key()}) was started with another config or "
                             "other devices; run without --resume to start afresh")
        last = int(run.get(b"last_round", b"0"))
        if last == 0:
            return self.start_round
        info = self.r.hgetall(state.round_key(last))
        self.client_global = state.get_model(self.r, info[b"client_sha"].decode())
        self.server_global = state.get_model(self.r, info[b"server_sha"].decode())
        if self.algorithm.lam > 0.0:
            for k in range(1, last + 1):  # the latest upload of each client
                devs = json.loads(self.r.hget(state.round_key(k), "participants"))
                uploads = json.loads(self.r.hget(state.round_key(k), "uploads"))
                for dev, sha in zip(devs, uploads, strict=True):
                    self.local_states[self.device_ids.index(dev)] = state.get_model(self.r, sha)
        records = [self.r.hget(state.round_key(k), "record") for k in range(1, last + 1)]
        self.history = [RoundRecord(**json.loads(raw)) for raw in records if raw is not None]
        self.start_round = last + 1
        return self.start_round
