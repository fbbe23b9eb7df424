"""The distributed fleet: agents over MQTT, server halves as Celery tasks, round state in Redis.

:class:`MqttCeleryFleet` implements :class:`harmony.fleet.Fleet`; the round loop that calls it is
the engine's (:mod:`harmony.engine`), the same one the local runtime runs. Per round (state machine
in ``hsfl:round:{r}``: planned → running → aggregating → done, or failed):

1. store the server back end ``W_s`` and each participant's round-start client state in Redis
   (``hsfl:model:{sha}``) and publish the client states as retained blobs;
2. enqueue one ``hsfl.session`` Celery task per participant (ids and hashes only);
3. when a session reports it is subscribed (``hsfl:round:{r}:ready``), command its device with
   ``round_start`` (a redelivered session reports a new token and the device replays the round);
4. as each session is done (``hsfl:round:{r}:done``) hand the engine its result; aggregation is
   the ``hsfl.aggregate`` task over the sessions the engine accepted, in its order (each ``θ_i``
   weighted by ``n_i`` in float64: the in-process fleet's ``WeightedSum`` arithmetic).

Evaluation runs where it would on real hardware: each device personalises (``personalise``),
then evaluates its model on its own test pools (``evaluate``) with the same per-device code the
in-process fleet runs, offloading to one ``hsfl.infer`` task per device (``infer`` →
``infer_reply``) and sending its result (``eval_report``), which that task stores in
``hsfl:round:{r}:eval``. Only "measured latency" differs by nature: each device times itself.

Set-up: the planner's run manifest (config, data shape, depths, ``n_i``, device → client) is a
blob whose hash is ``assign.config_digest``, also kept in Redis as ``hsfl:config:{sha}`` for the
workers; each device also gets a share blob with only its own index lists. Restarts: each try of
a round gets an ``attempt`` id in ``hsfl:round:{r}``; session tasks of an older attempt skip or
stop (``server.state.TaskGuard``), so an orchestrator killed mid-round and started with ``resume``
re-runs that round from the last finished round's models (read back from Redis). Round keys are
not namespaced by run, so a stack serves one experiment at a time (a new run clears them).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from broker.blobs import sha256_hex, split_blob, state_dict_to_bytes
from broker.client import BrokerClient, PendingPublish, wait_all
from broker.schemas import Assign, EvalReport, Evaluate, Personalise, RoundStart
from broker.topics import Topics
from harmony.algorithms import StepStats
from harmony.evaluate import ClientEvaluation
from harmony.experiment import Experiment, State
from harmony.fleet import ProgressFn, ResumePoint, SessionResult
from harmony.rounds import RoundFailedError, RoundPlan
from harmony.timing import PhaseClock
from orchestrator.registry import Registry
from server import state
from server.app import celery_app

WAKE_S = 0.5
"""Longest wait between two looks at a round's state in Redis; tasks wake the orchestrator at once
through ``state.notify`` (a BLPOP rather than polling Redis every 10 ms, which competed with the
sessions for the CPU); this bounds the wait when a wake-up is lost (e.g. Redis restarted)."""

log = logging.getLogger(__name__)


class MqttCeleryFleet:
    """The devices registered with a running stack (Mosquitto, Redis, Celery workers, agents)."""

    runtime = "distributed"
    resumes_itself = True

    def __init__(self, experiment: Experiment, *, mqtt: tuple[str, int], redis_url: str,
                 topics: Topics | None = None, username: str | None = None, password: str | None = None,
                 devices_timeout_s: float = 120.0, round_timeout_s: float = 900.0) -> None:
        self.experiment = experiment
        self.cfg = experiment.cfg
        self.progress: ProgressFn = lambda event, **fields: None
        self.redis_url = redis_url
        self.r = state.connect(redis_url)
        self.celery = celery_app(redis_url)
        self.topics = topics or Topics()
        self.round_timeout_s = round_timeout_s
        self.mqtt = BrokerClient(f"orchestrator-{uuid.uuid4().hex[:8]}", mqtt[0], mqtt[1], username=username,
                                 password=password, topics=self.topics, clean_start=True, session_expiry_s=0)
        self.mqtt.connect()
        self.registry = Registry(self.mqtt, self.r)
        n = experiment.num_clients
        self.device_ids: list[str] = self.registry.wait_for(n, devices_timeout_s)[:n]
        self.published: dict[str, int] = {}
        self._round: dict[str, Any] = {}  # what the round in progress published (its shas, its clock)
        self._assign()

    # ------------------------------------------------------------------------------ set-up
    def _assign(self) -> None:
        ex = self.experiment
        pending: list[PendingPublish] = []  # publications awaited together, not one round trip each
        shares = {dev: self._publish(ex.shares[i].to_bytes(), pending) for i, dev in enumerate(self.device_ids)}
        manifest = {**ex.manifest(), "clients": {dev: i for i, dev in enumerate(self.device_ids)}, "shares": shares}
        data = json.dumps(manifest, sort_keys=True).encode()
        self.manifest_sha = sha256_hex(data)
        self.r.set(state.config_key(self.manifest_sha), data)
        self._publish(data, pending)
        self._keep = {self.manifest_sha, *shares.values()}
        wait_all(pending)  # every blob is on the broker before a device is told to fetch it
        pipe = self.r.pipeline(transaction=False)
        for i, dev in enumerate(self.device_ids):
            pipe.hset(state.dev_key(dev), mapping={"client": i, "split_depth": ex.depths[i]})
        pipe.execute()
        wait_all([self.mqtt.send(self.topics.cmd(dev), Assign(split_depth=ex.depths[i],
                                                               config_digest=self.manifest_sha), wait=False)
                  for i, dev in enumerate(self.device_ids)])

    def begin_run(self, resume: bool) -> ResumePoint | None:
        if resume:
            return self._resume_point()
        self._reset_run()
        return None

    def _ensure_run(self) -> None:
        """Rounds driven without ``Engine.run`` (``run_round`` alone) belong to a run of this manifest."""
        if self.r.hget(state.run_key(), "manifest") != self.manifest_sha.encode():
            self._reset_run()

    def _reset_run(self) -> None:
        """A fresh run of this manifest: forget the rounds of any earlier run (which a resume would read)."""
        for pattern in (f"{state.PREFIX}round:*", f"{state.PREFIX}agg:*"):
            keys = list(self.r.scan_iter(pattern))
            if keys:
                self.r.delete(*keys)
        self.r.delete(state.run_key())
        self.r.hset(state.run_key(), mapping={"id": uuid.uuid4().hex, "manifest": self.manifest_sha,
                                              "last_round": 0})

    def _resume_point(self) -> ResumePoint | None:
        """Where the run in Redis stands: the last done round's models, the latest upload of each
        client (for λ > 0) and the round records; None when no round finished yet."""
        run = self.r.hgetall(state.run_key())
        if run.get(b"manifest", b"").decode() != self.manifest_sha:
            raise ValueError(f"--resume: the run in Redis ({state.run_key()}) was started with another config or "
                             "other devices; run without --resume to start afresh")
        last = int(run.get(b"last_round", b"0"))
        if last == 0:
            return None
        info = self.r.hgetall(state.round_key(last))
        local_states: dict[int, State] = {}
        if self.experiment.algorithm.lam > 0.0:
            for k in range(1, last + 1):
                devs = json.loads(self.r.hget(state.round_key(k), "participants"))
                uploads = json.loads(self.r.hget(state.round_key(k), "uploads"))
                for dev, sha in zip(devs, uploads, strict=True):
                    local_states[self.device_ids.index(dev)] = state.get_model(self.r, sha)
        records = [self.r.hget(state.round_key(k), "record") for k in range(1, last + 1)]
        return ResumePoint(last, state.get_model(self.r, info[b"client_sha"].decode()),
                           state.get_model(self.r, info[b"server_sha"].decode()), local_states,
                           [json.loads(raw) for raw in records if raw is not None])

    def _publish(self, data: bytes, pending: list[PendingPublish] | None = None) -> str:
        """Publish blob ``data`` unless it is on the broker already; with ``pending``, its
        publications are appended there for the caller to await (``wait_all``) with the others."""
        sha = sha256_hex(data)
        if sha not in self.published:
            self.mqtt.publish_blob(data, pending=pending)
            self.published[sha] = len(split_blob(data))
        return sha

    def _unpublish(self, keep: set[str], pending: list[PendingPublish] | None = None) -> None:
        for sha, count in list(self.published.items()):
            if sha not in keep and sha not in self._keep:
                self.mqtt.clear_blob(sha, count, pending=pending)
                del self.published[sha]

    def close(self) -> None:
        self._keep = set()
        pending: list[PendingPublish] = []
        self._unpublish(set(), pending)
        wait_all(pending)
        self.mqtt.close()

    def describe(self) -> dict[str, Any]:
        # the training ran on the workers and devices, not in this process: no machine record
        return {"devices": self.device_ids}

    # ------------------------------------------------------------------------------ rounds
    def train(self, rnd: int, starts: dict[int, State], server_start: State, plan: RoundPlan
              ) -> Iterator[SessionResult]:
        """Sessions the plan drops are not started; a participant whose status is ``offline`` (its
        last will) at the start or mid-session is dropped at once, its session stopped; at
        ``plan.deadline_s`` the sessions still running are stragglers, stopped and left out."""
        clock = PhaseClock("publish", "sessions", "aggregate", "load")  # the round_done event's split
        self._ensure_run()
        self.registry.poll(0)
        gone = [i for i in starts if i in plan.drops or self.registry.online.get(self.device_ids[i]) is False]
        for i in gone:
            yield SessionResult.missing(i, "dropped")
        chosen = [i for i in starts if i not in gone]
        devs = [self.device_ids[i] for i in chosen]
        with clock("publish"):
            server_sha, _ = state.put_model(self.r, server_start)
            pending: list[PendingPublish] = []  # awaited together: a round trip per blob was ~10 ms at 200 devices
            client_shas = {i: self._publish(state.put_model(self.r, starts[i])[1], pending) for i in chosen}
            self._unpublish(set(client_shas.values()), pending)
            wait_all(pending)  # every start state is on the broker before any device is told to fetch it
            attempt = uuid.uuid4().hex[:12]
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(state.ready_key(rnd), state.done_key(rnd), state.eval_key(rnd), state.notify_key(rnd),
                        *(state.agg_key(rnd, d) for d in devs))
            pipe.hset(state.round_key(rnd), mapping={"state": "planned", "participants": json.dumps(devs),
                                                     "deadline": time.time() + self.round_timeout_s,
                                                     "attempt": attempt})
            pipe.execute()
            for i, dev in zip(chosen, devs, strict=True):
                self.celery.send_task("hsfl.session", kwargs={
                    "rnd": rnd, "dev": dev, "index": i, "manifest_sha": self.manifest_sha, "server_sha": server_sha,
                    "steps": self.experiment.steps(i), "timeout_s": self.round_timeout_s, "attempt": attempt})
            self.r.hset(state.round_key(rnd), "state", "running")
            state.event(self.r, "round_running", round=rnd, sessions=len(devs))
        self._round = {"rnd": rnd, "clock": clock, "server": (server_start, server_sha)}
        with clock("sessions"):
            yield from self._await_sessions(rnd, chosen, devs, client_shas, plan.deadline_s)

    def _await_sessions(self, rnd: int, chosen: list[int], devs: list[str], client_shas: dict[int, str],
                        deadline_s: float | None) -> Iterator[SessionResult]:
        """Command each device once its session is subscribed; yield each session's result once
        done, each dropout as soon as the device's status says ``offline``, and each straggler at
        the deadline (without one, a round that outlasts ``round_timeout_s`` fails)."""
        commanded: dict[str, bytes] = {}
        waiting = set(devs)
        t0 = time.monotonic()
        limit = self.round_timeout_s if deadline_s is None else min(deadline_s, self.round_timeout_s)
        index = dict(zip(devs, chosen, strict=True))
        while True:
            sent = []
            for dev_b, token in self.r.hgetall(state.ready_key(rnd)).items():
                dev = dev_b.decode()
                if dev in waiting and commanded.get(dev) != token:
                    commanded[dev] = token
                    sent.append(self.mqtt.send(self.topics.cmd(dev), RoundStart(
                        round=rnd, steps=self.experiment.steps(index[dev]),
                        client_model_sha256=client_shas[index[dev]]), round=rnd, wait=False))
            wait_all(sent, 10.0)  # the commands of every session that became ready, in one round trip
            finished = {d.decode() for d in self.r.smembers(state.done_key(rnd))} & waiting
            for dev in sorted(finished, key=devs.index):
                waiting.discard(dev)
                result = self._session_result(rnd, dev, index[dev])
                result.seconds = time.monotonic() - t0
                yield result
            self.registry.poll(0)
            for dev in sorted((d for d in waiting if self.registry.online.get(d) is False), key=devs.index):
                waiting.discard(dev)
                self._stop_session(rnd, dev, "dropped")
                yield SessionResult.missing(index[dev], "dropped", time.monotonic() - t0)
            if not waiting:
                return
            if time.monotonic() - t0 > limit:
                if deadline_s is None:
                    self.r.hset(state.round_key(rnd), "state", "failed")
                    raise RoundFailedError(f"round {rnd}: sessions of {sorted(waiting)} did not finish within "
                                           f"{self.round_timeout_s} s (see the worker and agent logs)")
                for dev in sorted(waiting, key=devs.index):
                    self._stop_session(rnd, dev, "late")
                    yield SessionResult.missing(index[dev], "late", time.monotonic() - t0)
                return
            state.wait_notify(self.r, rnd, WAKE_S)

    def _stop_session(self, rnd: int, dev: str, why: str) -> None:
        """Supersede device ``dev``'s session of round ``rnd`` (its task stops within a second and
        frees its worker thread; ``server.state.TaskGuard``) and record why."""
        self.r.hset(state.ready_key(rnd), dev, f"stopped:{why}")
        state.event(self.r, f"session_{why}", round=rnd, device=dev)

    def _session_result(self, rnd: int, dev: str, client: int) -> SessionResult:
        meta = state.session_meta(self.r, rnd, dev)
        return SessionResult(client, state.get_model(self.r, meta["client_sha"]), int(meta["weight"]),
                             StepStats.from_vector(meta["stats"]), extra={"upload": meta["client_sha"]})

    def aggregate(self, rnd: int, results: list[SessionResult], client_prev: State, server_prev: State
                  ) -> tuple[State, State]:
        clock = self._round["clock"] if self._round.get("rnd") == rnd else PhaseClock("aggregate", "load")
        self.r.hset(state.round_key(rnd), "state", "aggregating")
        with clock("aggregate"):
            start, sha = self._round.get("server", (None, None))
            server_prev_sha = sha if start is server_prev else state.put_model(self.r, server_prev)[0]
            client_prev_sha, _ = state.put_model(self.r, client_prev)
            devs = [self.device_ids[res.client] for res in results]
            result = self.celery.send_task("hsfl.aggregate", kwargs={
                "rnd": rnd, "devices": devs, "client_prev_sha": client_prev_sha, "server_prev_sha": server_prev_sha,
            }).get(timeout=self.round_timeout_s)
        with clock("load"):
            client_global = state.get_model(self.r, result["client_sha"])
            server_global = state.get_model(self.r, result["server_sha"])
        self._round.update(shas=(result["client_sha"], result["server_sha"]))
        return client_global, server_global

    def round_done(self, rnd: int, record: dict[str, Any], results: list[SessionResult]) -> None:
        client_sha, server_sha = self._round["shas"]
        self.r.hset(state.round_key(rnd), mapping={
            "state": "done", "client_sha": client_sha, "server_sha": server_sha,
            "uploads": json.dumps([res.extra["upload"] for res in results]), "record": json.dumps(record)})
        self.r.hset(state.run_key(), "last_round", rnd)
        state.event(self.r, "round_done", round=rnd, split=self._round["clock"].seconds())

    def round_failed(self, rnd: int, reason: str) -> None:
        self.r.hset(state.round_key(rnd), "state", "failed")
        state.event(self.r, "round_failed", round=rnd, reason=reason[:500])

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, rnd: int, models: dict[int, State], server: State, personalise: bool
                 ) -> list[ClientEvaluation]:
        """Every device evaluates its own model against ``server`` (module docstring); ``rnd`` is the
        envelope round and the Redis keys (the evaluation round for the final evaluation)."""
        cfg, r = self.cfg, self.r
        clients = sorted(models)
        server_sha, _ = state.put_model(r, server)
        if personalise and self.experiment.algorithm.personalises:
            blobs = self._personalise_on_devices(rnd, {i: models[i] for i in clients})
        else:
            blobs = {i: state_dict_to_bytes(models[i]) for i in clients}
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
        evaluations = []
        for i in clients:
            report = reports[self.device_ids[i]]
            if report.rhos != list(cfg.data.rhos):
                raise ValueError(f"device {self.device_ids[i]}: eval_report.rhos {report.rhos} differ from data.rhos "
                                 f"{list(cfg.data.rhos)} (is the agent running another config?)")
            evaluations.append(report.to_evaluation())
        return evaluations

    def _personalise_on_devices(self, rnd: int, models: dict[int, State]) -> dict[int, bytes]:
        """Send ``personalise`` to every device at once; their personalised models as state-dict bytes."""
        subs = {i: self.mqtt.subscribe(self.topics.up(self.device_ids[i])) for i in models}
        out: dict[int, bytes] = {}
        try:
            for i, model in models.items():
                sha = self._publish(state_dict_to_bytes(model))
                self.mqtt.send(self.topics.cmd(self.device_ids[i]), Personalise(model_sha256=sha), round=rnd)
            deadline = time.monotonic() + self.round_timeout_s
            for i in models:
                try:
                    out[i] = self.mqtt.receive_blob(subs[i], timeout=max(0.0, deadline - time.monotonic()),
                                                    accept=lambda e: e.round == rnd)
                except TimeoutError:
                    raise RoundFailedError(f"device {self.device_ids[i]} did not upload its personalised model "
                                           f"within {self.round_timeout_s} s (see the agent log)") from None
        finally:
            for sub in subs.values():
                self.mqtt.unsubscribe(sub)
        return out

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

