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
not namespaced by run, so a stack serves one experiment at a time: a run holds the stack's lease
(``server.state.StackLease``, ``hsfl:lease``) from before it writes anything until it closes, and a
second run is refused (``StackBusyError``) naming the first and how to stop it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Container, Iterable, Iterator, Mapping
from typing import Any, Literal

from celery.result import AsyncResult

from broker.blobs import sha256_hex, split_blob, state_dict_to_bytes
from broker.client import BrokerClient, PendingPublish, TlsSettings, wait_all
from broker.errors import BrokerError
from broker.schemas import Assign, Cancel, EvalReport, Evaluate, Personalise, RoundStart
from broker.topics import Topics
from harmony.algorithms import StepStats
from harmony.assignment import from_hello
from harmony.evaluate import ClientEvaluation
from harmony.experiment import Experiment, State
from harmony.fleet import ProgressFn, ResumePoint, SessionResult
from harmony.rounds import RoundFailedError, RoundPlan, derived_deadline_s
from harmony.timing import PhaseClock
from orchestrator.registry import Registry, devices_for_clients
from server import state
from server.app import celery_app, redelivery_bound_s

WAKE_S = 0.5
"""Longest wait between two looks at a round's state in Redis; tasks wake the orchestrator at once
through ``state.notify`` (a BLPOP rather than polling Redis every 10 ms, which competed with the
sessions for the CPU); this bounds the wait when a wake-up is lost (e.g. Redis restarted)."""

ROUND_TIMEOUT_S = 900.0
"""Default ``round_timeout_s`` (``harmony run --round-timeout``): well above the Celery redelivery
bound (``server.app.redelivery_bound_s``, 130 s by default), so a task lost with its worker comes
back within the round."""

log = logging.getLogger(__name__)


def _missing(client: int, status: Literal["dropped", "late"], t0: float, started: float | None) -> SessionResult:
    """A session left out now, ``t0`` being its round's start: its ``queued_s`` runs until its device
    was told to start (``started``; None: it never was, as when no worker thread took its session)."""
    result = SessionResult.missing(client, status, time.monotonic() - t0)
    result.queued_s = None if started is None else started - t0
    return result


class _DeviceGone(Exception):
    """A device's status turned ``offline`` while the fleet waited for it."""


class MqttCeleryFleet:
    """The devices registered with a running stack (Mosquitto, Redis, Celery workers, agents)."""

    runtime = "distributed"
    resumes_itself = True
    concurrent = True

    def __init__(self, experiment: Experiment, *, mqtt: tuple[str, int], redis_url: str,
                 topics: Topics | None = None, username: str | None = None, password: str | None = None,
                 tls: TlsSettings | None = None, devices_timeout_s: float = 120.0,
                 round_timeout_s: float = ROUND_TIMEOUT_S, known_devices: Container[str] | None = None,
                 run_label: Mapping[str, Any] | None = None) -> None:
        self.experiment = experiment
        self.cfg = experiment.cfg
        self.progress: ProgressFn = lambda event, **fields: None
        self.redis_url = redis_url
        self.r = state.connect(redis_url)
        self.celery = celery_app(redis_url)
        self.topics = topics or Topics()
        self.round_timeout_s = round_timeout_s
        if round_timeout_s <= redelivery_bound_s():
            log.warning("round timeout %.0f s <= the Celery redelivery bound %d s (HSFL_VISIBILITY_S + "
                        "HSFL_RESTORE_INTERVAL_S): a task lost with a worker before it started cannot come back "
                        "within a round; lower HSFL_VISIBILITY_S or raise --round-timeout", round_timeout_s,
                        redelivery_bound_s())
        self.mqtt = BrokerClient(f"orchestrator-{uuid.uuid4().hex[:8]}", mqtt[0], mqtt[1], username=username,
                                 password=password, tls=tls, topics=self.topics, clean_start=True, session_expiry_s=0,
                                 reconnect_min_delay_s=0.2, reconnect_max_delay_s=5.0)
        self.mqtt.connect()
        state.check_reachable(redis_url)  # a wrong --redis fails now, not after the reconnect tries
        self._connects = self.mqtt.connect_count  # a change: the broker was away (republish, _after_reconnect)
        if username is None:
            log.warning("the broker %s:%d let this orchestrator in without a login: the stack is OPEN — anyone who "
                        "reaches it can publish as any device (hello, status, features, eval_report) or stop one; "
                        "start it with authentication (`harmony up` without --insecure, docs/security.md)", *mqtt)
        self.registry = Registry(self.mqtt, self.r, known=known_devices)
        n = experiment.num_clients
        # a flashed board holding one client's rows gets that client; the others in natural order
        self.device_ids: list[str] = devices_for_clients(
            self.registry.wait_for(n, devices_timeout_s), self.registry.profiles,
            [sha256_hex(experiment.shares[i].to_bytes()) for i in range(n)])
        # one experiment per stack: the lease before anything of this run is written (run_label: what
        # names this run to a second one, which is refused; e.g. its output directory)
        self.lease = state.StackLease(self.r, {"id": uuid.uuid4().hex[:12], "pid": os.getpid(),
                                               "host": socket.gethostname(), "config": self.cfg.name,
                                               "started": round(time.time(), 3), **(run_label or {})})
        self._assigned_at: dict[str, float | None] = {}  # device → the agent start its assign went to
        self.published: dict[str, int] = {}
        self._stale: set[str] = set()  # published before the broker was lost (_after_reconnect)
        self._round: dict[str, Any] = {}  # what the round in progress published (its shas, its clock)
        self._sent: list[AsyncResult] = []  # every task sent (their results are forgotten at the run's end)
        self._finished = False  # the final evaluation is done: close() cleans the run's keys
        try:
            self.lease.acquire()
        except BaseException:
            self.mqtt.close()
            raise
        try:  # a measured assignment or the assign that fails gives the stack back
            if self.cfg.fleet.assignment == "measured":
                self._decide_depths()
            self._assign()
        except BaseException:
            self.lease.release()
            self.mqtt.close()
            raise

    def _send_task(self, name: str, *, kwargs: dict[str, Any]) -> AsyncResult:
        """Send a Celery task, keeping its result handle so that a finished run forgets its result."""
        result = self.celery.send_task(name, kwargs=kwargs)
        self._sent.append(result)
        return result

    # ------------------------------------------------------------------------------ set-up
    def _decide_depths(self) -> None:
        """``fleet.assignment: measured``: each device's depth from the resources its ``hello`` measured."""
        family = self.cfg.model.family
        measurements = [from_hello(dev, self.registry.profiles[dev], family) for dev in self.device_ids]
        decisions = self.experiment.assign_measured(measurements)
        # each client's class as its device says it is, not a guess from its depth (the results, the
        # events and the latency model name what trained)
        self.experiment.record_classes([self.registry.profiles[dev].get("device_class") for dev in self.device_ids])
        for decision, cls in zip(decisions, self.experiment.profiles, strict=True):
            log.info("device %s (%s): %s", decision.device, cls, decision.reason)
            state.event(self.r, "depth_assigned", device=decision.device, depth=decision.depth, device_class=cls,
                        compute_flops=decision.measurement.compute_flops, uplink_bps=decision.measurement.uplink_bps,
                        reason=decision.reason[:500])

    def reassign(self, clients: list[int]) -> None:
        """A new manifest with the experiment's new depths, assigned to every device (those whose
        depth did not change rebuild the same plan); the next round's sessions use it."""
        for i in clients:
            state.event(self.r, "depth_reassigned", device=self.device_ids[i], depth=self.experiment.depths[i])
        self._assign()
        self.r.hset(state.run_key(), "manifest", self.manifest_sha)  # the same run, now with this manifest

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
        wait_all([self._send_assign(i, dev) for i, dev in enumerate(self.device_ids)])

    def _send_assign(self, i: int, dev: str) -> PendingPublish:
        self._assigned_at[dev] = self.registry.started_at(dev)
        return self.mqtt.send(self.topics.cmd(dev), Assign(split_depth=self.experiment.depths[i],
                                                           config_digest=self.manifest_sha), wait=False)

    def _reassign_restarted(self, clients: list[int]) -> list[int]:
        """Send ``assign`` again to devices whose agent restarted since their last one (a new
        ``hello.started_at``): a restarted agent has forgotten its assignment, and its clean MQTT
        session dropped what was queued for it. The ``cmd`` topic is ordered, so the device has it
        before any later command. Returns the clients re-assigned; one whose new agent has not said
        ``hello`` yet is not (``Registry.ready``): its assign goes once it has."""
        again = []
        for i in clients:
            dev = self.device_ids[i]
            if self.registry.ready(dev) and self.registry.started_at(dev) != self._assigned_at.get(dev):
                again.append(i)
                log.info("device %s restarted (agent started at %s); sending its assign again", dev,
                         self.registry.started_at(dev))
                state.event(self.r, "device_reassigned", device=dev)
                self._send_assign(i, dev).wait(10)
        return again

    def unreachable(self) -> set[int]:
        """Clients whose devices are not :meth:`~orchestrator.registry.Registry.ready` now: offline
        (their last will), or back online without the ``hello`` of their new agent yet."""
        self.registry.poll(0)
        return {i for i, dev in enumerate(self.device_ids) if not self.registry.ready(dev)}

    def wait_back(self, clients: list[int], timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the devices of ``clients`` that are not ready to be back
        (a restarting agent connects and says ``hello`` within seconds)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.registry.poll(0)
            away = [self.device_ids[i] for i in clients if not self.registry.ready(self.device_ids[i])]
            if not away:
                return
            if time.monotonic() >= deadline:
                log.info("retrying without %s: not back within %g s", away, timeout_s)
                return
            self.registry.poll(min(0.5, max(0.0, deadline - time.monotonic())))

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
        state.clean_run_keys(self.r, keep_configs={self.manifest_sha})  # weights of runs before this one
        self.r.delete(state.run_key())
        run_id = uuid.uuid4().hex
        self.r.hset(state.run_key(), mapping={"id": run_id, "manifest": self.manifest_sha, "last_round": 0})
        state.event(self.r, "run_started", id=run_id, rounds=self.cfg.train.rounds, devices=self.device_ids,
                    classes=self.experiment.profiles)

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

    def _after_reconnect(self, models: Iterable[str] = ()) -> bool:
        """If this driver's connection to the broker was lost and made again since the last look,
        publish the run's blobs again (and the weights ``models``, from Redis): a broker restarted
        without persistence (or from an older autosave) has lost the retained manifest and shares
        that a restarted agent must fetch. True when it was lost."""
        if not self.mqtt.wait_connected(30):
            raise RoundFailedError(f"lost the broker {self.mqtt.host}:{self.mqtt.port} for 30 s (is mosquitto "
                                   "running?)")
        if self.mqtt.connect_count == self._connects:
            return False
        self._connects = self.mqtt.connect_count
        log.warning("reconnected to the broker; publishing the run manifest, shares and round weights again")
        state.event(self.r, "broker_reconnected")
        self._stale = set(self.published)  # the broker may have lost any of them: publish each again when used
        blobs = [self.r.get(state.config_key(self.manifest_sha)), *(self.r.get(state.model_key(m)) for m in models)]
        for data in blobs:
            if data is not None:
                self._publish(data)
        for i in range(len(self.device_ids)):
            self._publish(self.experiment.shares[i].to_bytes())
        return True

    def _publish(self, data: bytes, pending: list[PendingPublish] | None = None) -> str:
        """Publish blob ``data`` unless it is on the broker already (and not stale after a reconnect);
        with ``pending``, its publications are appended there for the caller to await (``wait_all``)."""
        sha = sha256_hex(data)
        if sha not in self.published or sha in self._stale:
            self.mqtt.publish_blob(data, pending=pending)
            self.published[sha] = len(split_blob(data))
            self._stale.discard(sha)
        return sha

    def _unpublish(self, keep: set[str], pending: list[PendingPublish] | None = None) -> None:
        for sha, count in list(self.published.items()):
            if sha not in keep and sha not in self._keep:
                self.mqtt.clear_blob(sha, count, pending=pending)
                del self.published[sha]

    def _clean_finished_run(self) -> None:
        """The run's end: delete what only its rounds needed (docs/design.md §15) — session buffers,
        the rounds' ready/done/eval/notify/alive keys, every model but the last round's two, other
        manifests — and forget its Celery task results, so Redis does not grow from run to run. Kept:
        ``hsfl:run``, the ``hsfl:round:{r}`` hashes (records), the devices and the events."""
        last = int(self.r.hget(state.run_key(), "last_round") or 0)
        final = self.r.hgetall(state.round_key(last)) if last else {}
        keep = {final[k].decode() for k in (b"client_sha", b"server_sha") if k in final}
        removed = state.clean_run_keys(self.r, keep_models=keep, keep_configs={self.manifest_sha}, rounds=True)
        for result in self._sent:
            result.forget()
        log.info("run finished: removed %d round key(s) from Redis and %d task result(s)", removed, len(self._sent))
        self._sent.clear()

    def close(self) -> None:
        if self._finished:
            try:
                self._clean_finished_run()
            except Exception as err:  # noqa: BLE001 — the results are written; a later run cleans up again
                log.warning("could not clean the finished run's keys from Redis: %s", err)
        self._keep = set()
        pending: list[PendingPublish] = []
        self._unpublish(set(), pending)
        try:
            wait_all(pending)
            self.mqtt.close()
        finally:
            self.lease.release()

    def describe(self) -> dict[str, Any]:
        # the training ran on the workers and devices, not in this process: no machine record; what each
        # device said of itself in its hello (its class and measured rates), in client order
        keep = ("device_class", "rates", "uplink_bps", "rtt_ms", "cpus", "memory_bytes", "gflops")
        hellos = [{k: self.registry.profiles.get(dev, {}).get(k) for k in keep} for dev in self.device_ids]
        return {"devices": self.device_ids, "device_hellos": hellos}

    # ------------------------------------------------------------------------------ rounds
    def train(self, rnd: int, starts: dict[int, State], server_start: State, plan: RoundPlan
              ) -> Iterator[SessionResult]:
        """Sessions the plan drops are not started; a participant whose status is ``offline`` (its
        last will) at the start or mid-session is dropped at once, its session stopped; at
        ``plan.deadline_s`` the sessions still running are stragglers, stopped and left out."""
        clock = PhaseClock("publish", "sessions", "aggregate", "load")  # the round_done event's split
        self._ensure_run()
        self._after_reconnect()
        self.registry.poll(0)
        gone = [i for i in starts if i in plan.drops or not self.registry.ready(self.device_ids[i])]
        for i in gone:
            yield SessionResult.missing(i, "dropped")
        chosen = [i for i in starts if i not in gone]
        devs = [self.device_ids[i] for i in chosen]
        self._reassign_restarted(chosen)
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
            jobs = {dev: {"rnd": rnd, "dev": dev, "index": i, "manifest_sha": self.manifest_sha,
                          "server_sha": server_sha, "steps": self.experiment.steps(i),
                          "timeout_s": self.round_timeout_s, "attempt": attempt}
                    for i, dev in zip(chosen, devs, strict=True)}
            tasks = {dev: self._send_task("hsfl.session", kwargs=job) for dev, job in jobs.items()}
            self.r.hset(state.round_key(rnd), "state", "running")
            state.event(self.r, "round_running", round=rnd, sessions=len(devs))
        self._round = {"rnd": rnd, "clock": clock, "server": (server_start, server_sha)}
        with clock("sessions"):
            waiting = set(devs)  # the sessions still running (_await_sessions keeps it)
            try:
                yield from self._await_sessions(rnd, chosen, devs, client_shas, plan, jobs, tasks, attempt, waiting)
            except GeneratorExit:  # the engine ended the try: its quorum is out of reach
                for dev in sorted(waiting, key=devs.index):
                    self._stop_session(rnd, dev, "abandoned", "the try can no longer reach its quorum")
                raise

    def _await_sessions(self, rnd: int, chosen: list[int], devs: list[str], client_shas: dict[int, str],
                        plan: RoundPlan, jobs: dict[str, dict[str, Any]], tasks: dict[str, AsyncResult],
                        attempt: str, waiting: set[str]) -> Iterator[SessionResult]:
        """Command each device once its session is subscribed; yield each session's result once
        done; drop a device at once when its status says ``offline``, when its agent restarted
        (a new ``hello.started_at``: the session it ran is gone) or when its session task failed
        (Celery state ``FAILURE``, e.g. on features the server model cannot run); send a session
        again when its worker died (its ``alive`` key expired, ``server.state.Heartbeat``); replay
        every unfinished session once its device is back after this driver lost the broker (the
        broker restarted: messages in flight are gone); and yield each straggler at the deadline
        (``plan.deadline_s``; without one, :func:`harmony.rounds.derived_deadline_s` once the quorum is
        in, and ``round_timeout_s`` at the latest). Every device left out is told to abandon its
        session (``cancel``), also those still running when the engine ends the try (it closes
        this generator: the quorum is out of reach)."""
        commanded: dict[str, bytes] = {}
        started: dict[str, float] = {}  # device → when it was last told to start (its session had a thread)
        resent: set[bytes] = set()  # session tokens whose lost session was sent again
        replay: set[str] = set()  # devices whose sessions to replay once they are back on the broker
        lost_at = 0.0
        t0 = time.monotonic()
        deadline_s = plan.deadline_s
        limit = self.round_timeout_s if deadline_s is None else min(deadline_s, self.round_timeout_s)
        completed = 0
        window = 0.0  # a derived deadline's length: a session sent again gets that long from then on
        index = dict(zip(devs, chosen, strict=True))
        started_at = {dev: self.registry.started_at(dev) for dev in devs}
        while True:
            if not self.mqtt.is_connected or self.mqtt.connect_count != self._connects:
                lost_at = self.mqtt.disconnected_at or time.time()
                self._after_reconnect(client_shas.values())
                replay |= waiting
            sent = []
            for dev_b, token in self.r.hgetall(state.ready_key(rnd)).items():
                dev = dev_b.decode()
                if dev in waiting and commanded.get(dev) != token and not token.startswith(b"stopped:"):
                    commanded[dev] = token
                    started[dev] = time.monotonic()
                    sent.append(self.mqtt.send(self.topics.cmd(dev), RoundStart(
                        round=rnd, steps=self.experiment.steps(index[dev]),
                        client_model_sha256=client_shas[index[dev]]), round=rnd, wait=False))
            wait_all(sent, 10.0)  # the commands of every session that became ready, in one round trip
            finished = {d.decode() for d in self.r.smembers(state.done_key(rnd))} & waiting
            for dev in sorted(finished, key=devs.index):
                waiting.discard(dev)
                result = self._session_result(rnd, dev, index[dev])
                result.seconds = time.monotonic() - t0
                result.queued_s = started[dev] - t0 if dev in started else None
                completed += 1
                derived = derived_deadline_s(plan, result.seconds) if completed == plan.quorum else None
                if derived is not None and derived < limit:  # the quorum is in: the others get a deadline
                    limit, window = derived, derived
                    log.info("round %d: quorum in after %.1f s; the sessions still running have until %.1f s",
                             rnd, result.seconds, limit)
                yield result
            self.registry.poll(0)
            for dev in sorted(replay & waiting, key=devs.index):
                if self.registry.status_ts.get(dev, 0.0) > lost_at:  # it announced itself since the loss
                    replay.discard(dev)
                    self.r.hset(state.ready_key(rnd), dev, "stopped:replay")  # the old session stops
                    state.drop_alive(self.r, rnd, attempt, dev)
                    commanded.pop(dev, None)
                    state.event(self.r, "session_replayed", round=rnd, device=dev)
                    tasks[dev] = self._send_task("hsfl.session", kwargs=jobs[dev])
                    if window:  # a derived deadline counts again from the recovery
                        limit = max(limit, min(time.monotonic() - t0 + window, self.round_timeout_s))
            for dev in sorted(waiting, key=devs.index):
                if self.registry.online.get(dev) is False:
                    outcome, why = "dropped", "its status is offline"
                elif self.registry.started_at(dev) != started_at[dev]:
                    outcome, why = "dropped", "its agent restarted"
                elif dev not in replay and tasks[dev].state == "FAILURE":  # (one cut off by the broker replays)
                    outcome, why = "failed", f"its session task failed: {_error_text(tasks[dev].result)}"
                    log.warning("round %d: device %s dropped, %s", rnd, dev, why)
                else:
                    continue
                waiting.discard(dev)
                self._stop_session(rnd, dev, outcome, why)
                yield _missing(index[dev], "dropped", t0, started.get(dev))
            for dev in sorted(waiting, key=devs.index):
                token = commanded.get(dev)
                if (token is not None and token not in resent and dev not in replay
                        and not self.r.exists(state.alive_key(rnd, attempt, dev))):
                    resent.add(token)  # its worker died mid-session: send it again (the device replays)
                    log.warning("round %d: the session of device %s stopped renewing its heartbeat (worker lost?); "
                                "sending it again", rnd, dev)
                    state.event(self.r, "session_resent", round=rnd, device=dev)
                    tasks[dev] = self._send_task("hsfl.session", kwargs=jobs[dev])
                    if window:  # a derived deadline counts again from the recovery
                        limit = max(limit, min(time.monotonic() - t0 + window, self.round_timeout_s))
            if not waiting:
                return
            if time.monotonic() - t0 > limit:  # the ones still running are stragglers (none fails the run)
                for dev in sorted(waiting, key=devs.index):
                    waiting.discard(dev)
                    self._stop_session(rnd, dev, "late", f"past the deadline of {limit:g} s")
                    yield _missing(index[dev], "late", t0, started.get(dev))
                return
            state.wait_notify(self.r, rnd, WAKE_S)

    def _stop_session(self, rnd: int, dev: str, outcome: str, why: str) -> None:
        """Supersede device ``dev``'s session of round ``rnd`` (its task stops within a second and
        frees its worker thread; ``server.state.TaskGuard``), tell the device to abandon it
        (``cancel``; a device that is gone gets it, if ever, when it reconnects, and ignores it
        then) and record the ``outcome`` (``dropped``, ``failed``, ``late``, ``abandoned``) and why."""
        self.r.hset(state.ready_key(rnd), dev, f"stopped:{outcome}")
        state.event(self.r, f"session_{outcome}", round=rnd, device=dev, reason=why[:500])
        try:
            self.mqtt.send(self.topics.cmd(dev), Cancel(round=rnd, reason=f"session {outcome}: {why}"[:1024]),
                           round=rnd, wait=False)
        except BrokerError as err:  # the round goes on without the device either way
            log.warning("could not send cancel to device %s: %s", dev, err)

    def _session_result(self, rnd: int, dev: str, client: int) -> SessionResult:
        meta = state.session_meta(self.r, rnd, dev)
        extra = {"upload": meta["client_sha"]}
        if meta.get("device_compute_s") is not None:
            extra["compute_s"] = float(meta["device_compute_s"])
        return SessionResult(client, state.get_model(self.r, meta["client_sha"]), int(meta["weight"]),
                             StepStats.from_vector(meta["stats"]), extra=extra)

    def aggregate(self, rnd: int, results: list[SessionResult], client_prev: State, server_prev: State
                  ) -> tuple[State, State]:
        clock = self._round["clock"] if self._round.get("rnd") == rnd else PhaseClock("aggregate", "load")
        self.r.hset(state.round_key(rnd), "state", "aggregating")
        with clock("aggregate"):
            start, sha = self._round.get("server", (None, None))
            server_prev_sha = sha if start is server_prev else state.put_model(self.r, server_prev)[0]
            client_prev_sha, _ = state.put_model(self.r, client_prev)
            devs = [self.device_ids[res.client] for res in results]
            result = self._send_task("hsfl.aggregate", kwargs={
                "rnd": rnd, "devices": devs, "client_prev_sha": client_prev_sha, "server_prev_sha": server_prev_sha,
            }).get(timeout=self.round_timeout_s)
        with clock("load"):
            client_global = state.get_model(self.r, result["client_sha"])
            server_global = state.get_model(self.r, result["server_sha"])
        self._round.update(shas=(result["client_sha"], result["server_sha"]))
        return client_global, server_global

    def round_done(self, rnd: int, record: dict[str, Any], results: list[SessionResult]) -> None:
        self.lease.check()  # never record a round of a stack another run took over
        client_sha, server_sha = self._round["shas"]
        self.r.hset(state.round_key(rnd), mapping={
            "state": "done", "client_sha": client_sha, "server_sha": server_sha,
            "uploads": json.dumps([res.extra["upload"] for res in results]), "record": json.dumps(record)})
        self.r.hset(state.run_key(), "last_round", rnd)
        for i in record.get("rejoined", []):
            state.event(self.r, "device_rejoined", round=rnd, device=self.device_ids[i])
        state.event(self.r, "round_done", round=rnd, split=self._round["clock"].seconds())

    def round_failed(self, rnd: int, reason: str) -> None:
        self.r.hset(state.round_key(rnd), "state", "failed")
        state.event(self.r, "round_failed", round=rnd, reason=reason[:500])

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, rnd: int, models: dict[int, State], server: State, personalise: bool
                 ) -> dict[int, ClientEvaluation]:
        """Every device evaluates its own model against ``server`` (module docstring); ``rnd`` is the
        envelope round and the Redis keys (the evaluation round for the final evaluation). A device
        whose status is ``offline`` (its last will) before or during the evaluation is left out at
        once (``evaluation_skipped`` event), its inference task stopped."""
        cfg, r = self.cfg, self.r
        clients = sorted(models)
        self._after_reconnect()
        self.registry.poll(0)
        clients = [i for i in clients if not self._gone(rnd, i)]
        self._reassign_restarted(clients)
        server_sha, _ = state.put_model(r, server)
        if personalise and self.experiment.algorithm.personalises:
            blobs = self._personalise_on_devices(rnd, {i: models[i] for i in clients})
            clients = sorted(blobs)
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
        jobs = {dev: {"dev": dev, "manifest_sha": self.manifest_sha, "server_sha": server_sha,
                      "idle_s": self.round_timeout_s, "rnd": rnd, "attempt": attempt} for dev in devs}
        for dev in devs:
            self._send_task("hsfl.infer", kwargs=jobs[dev])
        command = {i: Evaluate(model_sha256=shas[i], rhos=list(cfg.data.rhos), entropy_thresholds=list(cfg.eval.taus),
                               fixed_tau=cfg.eval.fixed_tau) for i in clients}
        reports = self._await_reports(rnd, attempt, dict(zip(devs, clients, strict=True)), command, jobs)
        evaluations: dict[int, ClientEvaluation] = {}
        for i in clients:
            report = reports.get(self.device_ids[i])
            if report is None:
                continue  # gone during the evaluation
            if report.rhos != list(cfg.data.rhos):
                raise ValueError(f"device {self.device_ids[i]}: eval_report.rhos {report.rhos} differ from data.rhos "
                                 f"{list(cfg.data.rhos)} (is the agent running another config?)")
            evaluations[i] = report.to_evaluation()
        self.lease.check()  # results of a stack another run took over are not reported
        if rnd > self.cfg.train.rounds:  # the final evaluation: the run is done
            self._finished = True
        return evaluations

    def _gone(self, rnd: int, client: int) -> bool:
        """Whether client ``client``'s device is ``offline``; if so, record that it is left out of
        evaluation ``rnd`` and stop its inference task."""
        dev = self.device_ids[client]
        if self.registry.online.get(dev) is not False:
            return False
        self.r.hset(state.ready_key(rnd), f"infer:{dev}", "stopped:gone")
        state.event(self.r, "evaluation_skipped", round=rnd, device=dev)
        return True

    def _personalise_on_devices(self, rnd: int, models: dict[int, State]) -> dict[int, bytes]:
        """Send ``personalise`` to every device at once; their personalised models as state-dict bytes."""
        subs = {i: self.mqtt.subscribe(self.topics.up(self.device_ids[i])) for i in models}
        out: dict[int, bytes] = {}
        try:
            shas = {i: self._publish(state_dict_to_bytes(model)) for i, model in models.items()}
            for i, sha in shas.items():
                self.mqtt.send(self.topics.cmd(self.device_ids[i]), Personalise(model_sha256=sha), round=rnd)
            deadline = time.monotonic() + self.round_timeout_s
            for i in models:
                def gone(i: int = i) -> None:
                    self.registry.poll(0)
                    if self._gone(rnd, i):
                        raise _DeviceGone
                    if self._reassign_restarted([i]):  # its new agent said hello: it personalises after all
                        self.mqtt.send(self.topics.cmd(self.device_ids[i]), Personalise(model_sha256=shas[i]),
                                       round=rnd)
                try:
                    out[i] = self.mqtt.receive_blob(subs[i], timeout=max(0.0, deadline - time.monotonic()),
                                                    accept=lambda e: e.round == rnd, check=gone, check_every_s=0.5)
                except _DeviceGone:
                    continue
                except TimeoutError:  # too slow: left out of the evaluation, as a vanished device is
                    log.warning("device %s did not upload its personalised model within %s s; it is left out of "
                                "the evaluation (see the agent log)", self.device_ids[i], self.round_timeout_s)
                    state.event(self.r, "evaluation_late", round=rnd, device=self.device_ids[i])
        finally:
            for sub in subs.values():
                self.mqtt.unsubscribe(sub)
        return out

    def _await_reports(self, rnd: int, attempt: str, index: dict[str, int], command: dict[int, Evaluate],
                       jobs: dict[str, dict[str, Any]]) -> dict[str, EvalReport]:
        """Command each device once its ``hsfl.infer`` task is subscribed (again, if that task was
        redelivered); return when every device's report is in Redis. A device whose agent restarted
        meanwhile gets its ``assign`` once its new agent said ``hello``, and a fresh ``hsfl.infer``
        task (``jobs[dev]``: the new agent numbers its messages from 1 again), then the command."""
        commanded: dict[str, bytes] = {}
        reports: dict[str, EvalReport] = {}
        deadline = time.monotonic() + self.round_timeout_s
        while True:
            for field, token in self.r.hgetall(state.ready_key(rnd)).items():
                dev = field.decode().removeprefix("infer:")
                if (field.startswith(b"infer:") and dev in index and dev not in reports
                        and commanded.get(dev) != token and not token.startswith(b"stopped:")):
                    commanded[dev] = token
                    self.mqtt.send(self.topics.cmd(dev), command[index[dev]], round=rnd)
            for dev_b, raw in self.r.hgetall(state.eval_key(rnd)).items():
                doc = json.loads(raw)
                dev = dev_b.decode()
                if doc["attempt"] == attempt and dev in index and dev not in reports:
                    reports[dev] = EvalReport(**doc["report"])
                    self.progress("evaluation_done", device=index[dev])
            self.registry.poll(0)
            for dev in [d for d in index if d not in reports and self._gone(rnd, index[d])]:
                del index[dev]
            for i in self._reassign_restarted([index[d] for d in index if d not in reports]):
                dev = self.device_ids[i]  # its new agent said hello: a fresh infer task, then the command
                self.r.hset(state.ready_key(rnd), f"infer:{dev}", "stopped:restarted")
                state.drop_alive(self.r, rnd, attempt, f"infer:{dev}")
                commanded.pop(dev, None)
                self._send_task("hsfl.infer", kwargs=jobs[dev])
            if len(reports) == len(index):
                return reports
            if time.monotonic() > deadline:  # the late ones are left out, as vanished devices are
                late = sorted(set(index) - set(reports))
                log.warning("evaluation %s: devices %s did not report within %s s; left out (see the worker and "
                            "agent logs)", rnd, late, self.round_timeout_s)
                for dev in late:
                    self.r.hset(state.ready_key(rnd), f"infer:{dev}", "stopped:late")
                    state.event(self.r, "evaluation_late", round=rnd, device=dev)
                return reports
            state.wait_notify(self.r, rnd, WAKE_S)


def _error_text(error: object) -> str:
    """A failed task's exception as one line (``RuntimeError: …``), for events and logs."""
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"[:1000]
    return str(error)[:1000]
