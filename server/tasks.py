"""Celery tasks of the server side: thin wrappers that call ``harmony``'s own server sessions.

- ``hsfl.session``   one (device, round) session: load the round-start back end, serve the device's
  step exchange directly over MQTT (``dev/{id}/up`` → ``dev/{id}/down``), receive the client's
  uploaded weights, fold both into the round's per-session partial-sum buffer in Redis.
- ``hsfl.aggregate`` merge the sessions' buffers of a round (numpy over raw bytes, widened to float64,
  in the participant order the engine gives) and store the aggregated client and server models.
- ``hsfl.infer``     fallback inference: serve one device's offloaded test features (``infer`` →
  ``infer_reply``) until it reports its evaluation (``eval_report``, stored in Redis) or is idle.

Per-step tensors never travel as Celery arguments; only ids and hashes do. The server side of the
plan (architecture, split depths, ``n_i``, random streams, the algorithm object) is rebuilt in the
worker from the run manifest (``harmony.experiment.Experiment.from_manifest(...).server()``): it
holds no sample and no label, so a worker needs no dataset, and its replica sees exactly what the
in-process fleet's would. Departure (docs/design.md §11): each session subscribes to its own
device's ``up`` topic instead of a shared ingress subscription — the session task *is* the ingress
for that device's round, which keeps the step exchange in one thread with no hand-off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

import torch
from celery import Task

from broker.blobs import read_session_upload
from broker.client import BrokerClient, InboundMessage, Subscription, TlsSettings
from broker.codec import Envelope, error_report
from broker.dedup import SeqDeduplicator
from broker.errors import ConnectRefused, WireError
from broker.inbound import MAX_CLOCK_SKEW_S, Rejected, answer, screen
from broker.schemas import InferReply
from broker.topics import Topics
from harmony.experiment import Experiment, ServerPlan
from harmony.fleet import flush_denormal
from harmony.timing import PhaseClock
from server import state
from server.app import app, redis_url

log = logging.getLogger(__name__)

_plans: dict[str, ServerPlan] = {}
_plans_lock = threading.Lock()
_weights: dict[str, dict[str, torch.Tensor]] = {}
_weights_lock = threading.Lock()
def server_weights(r: Any, sha: str) -> dict[str, torch.Tensor]:
    """The server back end ``sha`` (content-addressed, so never stale), loaded from Redis once per
    worker process and round rather than once per session; callers copy it into their replica
    with ``load_state_dict`` and never modify it."""
    with _weights_lock:
        if sha not in _weights:
            _weights.clear()  # one round's weights at a time
            _weights[sha] = state.get_model(r, sha)
        return _weights[sha]


def mqtt_settings() -> tuple[str, int, str | None, str | None, Topics]:
    host, _, port = os.environ.get("HSFL_MQTT", "127.0.0.1:1883").rpartition(":")
    return (host or "127.0.0.1", int(port), os.environ.get("HSFL_MQTT_USER"), os.environ.get("HSFL_MQTT_PASSWORD"),
            Topics(os.environ.get("HSFL_TOPIC_PREFIX", "hsfl/v1")))


def mqtt_tls() -> TlsSettings | None:
    """TLS of the workers' broker connections: ``HSFL_MQTT_CAFILE`` (the CA of the broker's certificate;
    TLS is on when it is set), ``HSFL_MQTT_CERTFILE``/``HSFL_MQTT_KEYFILE`` (the ``server`` client
    certificate the broker's service listener asks for, docs/security.md)."""
    cafile = os.environ.get("HSFL_MQTT_CAFILE")
    certfile, keyfile = os.environ.get("HSFL_MQTT_CERTFILE"), os.environ.get("HSFL_MQTT_KEYFILE")
    if not cafile:
        if certfile or keyfile:
            raise ValueError("HSFL_MQTT_CERTFILE/HSFL_MQTT_KEYFILE need HSFL_MQTT_CAFILE (the CA of the broker)")
        return None
    return TlsSettings(cafile, certfile or None, keyfile or None)


CONNECT_TRY_S = 10.0
"""How long one connection attempt of a task waits for its CONNACK before it tries again."""


def connect_task_client(client_id: str, deadline: float) -> BrokerClient:
    """A connected broker client for a server task. A CONNACK that does not come within
    ``CONNECT_TRY_S`` is tried again with a fresh client (id ``{client_id}-r{k}``) until
    ``deadline`` (monotonic): with 200 sessions starting at once on 2 cores some waited longer
    than that, and the session task failed, stalling its round until the round timeout. A broker
    that refuses (credentials, ACL) raises at once."""
    host, port, user, password, topics = mqtt_settings()
    attempt = 0
    while True:
        name = client_id if attempt == 0 else f"{client_id}-r{attempt}"
        client = BrokerClient(name, host, port, username=user, password=password, tls=mqtt_tls(), topics=topics,
                              clean_start=True, session_expiry_s=0)
        try:
            client.connect(timeout=CONNECT_TRY_S)
            return client
        except ConnectRefused as err:
            if err.reason_code is not None or time.monotonic() + CONNECT_TRY_S > deadline:
                raise
            attempt += 1
            log.warning("%s: %s; trying again (%d)", client_id, err, attempt)


def plan_for(r: Any, manifest_sha: str) -> ServerPlan:
    """The server side of the run's plan, rebuilt from the manifest in Redis (cached per manifest)."""
    with _plans_lock:
        if manifest_sha not in _plans:
            raw = r.get(state.config_key(manifest_sha))
            if raw is None:
                raise KeyError(f"no run manifest under {state.config_key(manifest_sha)}")
            _plans.clear()  # one experiment at a time per worker
            _plans[manifest_sha] = Experiment.from_manifest(json.loads(raw)).server()
        return _plans[manifest_sha]


def restore_layout(msg: Any, channels_last: bool) -> Any:
    """The wire sends row-major tensors; give 4-d float tensors back the channels-last layout the
    in-process transport would have passed, so kernels (and their rounding) match the local engine."""
    if not channels_last:
        return msg
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
            setattr(msg, f.name, value.contiguous(memory_format=torch.channels_last))
    return msg


class SessionAborted(RuntimeError):
    """The device stopped answering within the session's deadline."""


GUARD_POLL_S = 1.0
"""How often a waiting task checks that it has not been superseded (``state.TaskGuard``)."""


def known_devices(r: Any, manifest_sha: str) -> frozenset[str]:
    """The device ids of the run (the manifest's device → client map), cached with its plan."""
    with _plans_lock:
        if manifest_sha not in _known:
            raw = r.get(state.config_key(manifest_sha))
            if raw is None:
                raise KeyError(f"no run manifest under {state.config_key(manifest_sha)}")
            _known.clear()
            _known[manifest_sha] = frozenset(json.loads(raw)["clients"])
        return _known[manifest_sha]


_known: dict[str, frozenset[str]] = {}
SILENT_KINDS = ("link_probe", "error")
"""Kinds a device may put on its ``up`` topic that no server task consumes: skipped, not refused."""


class Inbox:
    """A server task's view of its device's ``up`` topic: every message screened
    (``broker.inbound.screen``: schema, known device, ``dev`` = the topic's device, kind, round,
    ``seq`` new, step), every refusal answered on ``dev/{id}/err`` and recorded as a
    ``message_rejected`` event; what is refused changes nothing."""

    def __init__(self, client: BrokerClient, sub: Subscription, r: Any, rnd: int, known: frozenset[str],
                 receiver: str) -> None:
        self.client, self.sub, self.r, self.rnd, self.known, self.receiver = client, sub, r, rnd, known, receiver
        self.topics = client.topics
        self.dedup = SeqDeduplicator()
        self.rejected = 0

    def screen(self, message: InboundMessage, kinds: tuple[str, ...], step: int | None = None) -> Envelope | None:
        """The message's envelope if it passes (None: refused and answered, or a silent kind)."""
        if not message.payload:
            return None  # a cleared retained message
        try:
            env = screen(message.topic, message.payload, self.topics, max_bytes=self.client.max_bytes,
                         known=self.known, kinds=(*kinds, *SILENT_KINDS), rnd=self.rnd, step=step, dedup=self.dedup,
                         max_skew_s=MAX_CLOCK_SKEW_S, retained=message.retain, now=message.received_at)
        except Rejected as rejection:
            self.rejected += 1
            answer(self.client, self.topics, rejection, self.r, rnd=self.rnd, receiver=self.receiver)
            return None
        return None if env.kind in SILENT_KINDS else env

    def next(self, kind: str, deadline: float, guard: state.TaskGuard, step: int | None = None) -> Envelope:
        """The next accepted ``kind`` message (of ``step``). Checks ``guard`` on every message and
        at least every ``GUARD_POLL_S`` while waiting, so a superseded session never answers a
        device that now talks to its successor."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionAborted(f"no {kind!r} (round {self.rnd}, step {step}) before the session deadline")
            try:
                message = self.sub.get(timeout=min(GUARD_POLL_S, remaining))
            except TimeoutError:
                guard.check()
                continue
            guard.check()
            env = self.screen(message, (kind,), step)  # features/logit_grad of another point: wrong_step
            if env is not None:
                return env


class WakesTheDriver(Task):
    """A task that wakes the round driver (``state.notify``) when it fails, after Celery stored the
    failure, so the driver sees the ``FAILURE`` state at once instead of at its next look."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        rnd = kwargs.get("rnd")
        if isinstance(rnd, int):
            try:
                state.notify(state.connect(redis_url()), rnd)
            except Exception as err:  # the failure itself is stored; the driver finds it at its next look
                log.warning("could not wake the round driver after a failed task: %s", err)


@app.task(name="hsfl.session", base=WakesTheDriver, bind=True, acks_late=True, reject_on_worker_lost=True)
def session(self: Any, rnd: int, dev: str, index: int, manifest_sha: str, server_sha: str, steps: int,
            timeout_s: float = 600.0, attempt: str | None = None) -> dict[str, Any]:
    """Serve device ``dev`` (client ``index``) for round ``rnd``; idempotent under redelivery.

    ``attempt``: the orchestrator's try of this round (``round:{r}`` field ``attempt``); a session
    of an attempt that is no longer current skips or stops (``state.TaskGuard``). A copy that starts
    while another session of this attempt and device is alive (``state.Heartbeat``) stands down.
    Any exception (e.g. features the server model cannot run) fails the task, and the round
    driver drops the device from the round at once."""
    flush_denormal()  # per-thread, before this thread's first torch operation (its intra-op workers inherit it)
    r = state.connect(redis_url())
    if r.sismember(state.done_key(rnd), dev):
        return {"device": dev, "round": rnd, "skipped": "already done"}
    if attempt is not None and r.hget(state.round_key(rnd), "attempt") != attempt.encode():
        return {"device": dev, "round": rnd, "skipped": "superseded"}
    token = uuid.uuid4().hex[:12]
    heartbeat = state.Heartbeat(r, rnd, attempt, dev, token)
    if not heartbeat.start():
        return {"device": dev, "round": rnd, "skipped": "another session of this attempt is alive"}
    try:
        return _serve_session(r, rnd, dev, index, manifest_sha, server_sha, steps, timeout_s, attempt, token)
    finally:
        heartbeat.stop()


def _serve_session(r: Any, rnd: int, dev: str, index: int, manifest_sha: str, server_sha: str, steps: int,
                   timeout_s: float, attempt: str | None, token: str) -> dict[str, Any]:
    """The body of :func:`session`: its own server back end, round-start weights loaded."""
    plan = plan_for(r, manifest_sha)
    cfg = plan.cfg
    model = plan.new_model()
    model.load_state_dict(server_weights(r, server_sha))
    server = plan.session(rnd, index, model)
    topics = mqtt_settings()[4]
    t0 = time.perf_counter()
    client = connect_task_client(f"session-{dev}-{rnd}-{token}", time.monotonic() + timeout_s)
    sent = [0]  # payload bytes to the device (the monitor's bytes down)
    client.before_publish = lambda nbytes: sent.__setitem__(0, sent[0] + nbytes)
    try:
        sub = client.subscribe(topics.up(dev))
        inbox = Inbox(client, sub, r, rnd, known_devices(r, manifest_sha), f"session {dev} round {rnd}")
        # the orchestrator now sends round_start to the device (a redelivered session replaces the token)
        if not state.claim_ready(r, rnd, dev, token, "attempt", attempt):
            return {"device": dev, "round": rnd, "skipped": "superseded"}
        guard = state.TaskGuard(r, rnd, dev, token, "attempt", attempt)
        deadline = time.monotonic() + timeout_s
        clock = PhaseClock()
        for step in range(steps):
            with clock("wait"):
                up = inbox.next("features", deadline, guard, step)
            with clock("compute"):
                down = server.on_features(restore_layout(up.body, cfg.model.channels_last))
            with clock("send"):
                client.send(topics.down(dev), down, round=rnd)
            with clock("wait"):
                grad_up = inbox.next("logit_grad", deadline, guard, step)
            with clock("compute"):
                reply = server.on_logit_grad(grad_up.body)
            with clock("send"):
                client.send(topics.down(dev), reply, round=rnd)
        steps_done = time.perf_counter()
        data = client.receive_blob(sub, timeout=max(0.0, deadline - time.monotonic()), check=guard.check,
                                   check_every_s=GUARD_POLL_S,
                                   screen=lambda message: inbox.screen(message, ("blob_chunk",)))
        uploaded, stats, device_compute_s = read_session_upload(data)
        client_sha, _ = state.put_model(r, uploaded)
        n_i = plan.samples[index]
        guard.check()
        state.store_session_result(r, rnd, dev, uploaded, server.state(), n_i,
                                   {"stats": stats, "client_sha": client_sha, "index": index, "token": token,
                                    "device_compute_s": device_compute_s})
        seconds = time.perf_counter() - t0
        split = {**clock.seconds(), "upload_store": time.perf_counter() - steps_done}
        state.event(r, "session_done", round=rnd, device=dev, seconds=seconds, split=split,
                    compute_cpu_s=clock.cpu_seconds()["compute"], steps=steps, bytes_up=sub.received_bytes,
                    bytes_down=sent[0])
        log.info("session done: device %s round %d, %d steps in %.2f s (server compute %.2f, waiting for the "
                 "device %.2f, sending %.2f, upload and store %.2f)", dev, rnd, steps, seconds, split["compute"],
                 split["wait"], split["send"], split["upload_store"])
        return {"device": dev, "round": rnd, "seconds": seconds, "split": split}
    except state.Superseded as err:
        log.info("session of device %s round %d stops: %s", dev, rnd, err)
        return {"device": dev, "round": rnd, "skipped": "superseded"}
    except WireError as err:  # e.g. an upload that does not reassemble
        client.send(topics.err(dev), error_report(err), round=rnd, wait=False)
        raise
    finally:
        client.close(timeout=2)


@app.task(name="hsfl.aggregate", acks_late=True)
def aggregate(rnd: int, devices: list[str], client_prev_sha: str, server_prev_sha: str) -> dict[str, Any]:
    """FedAvg of the replicas and depth-aware averaging of the client sides, merged in ``devices`` order."""
    flush_denormal()  # per-thread: a thread whose first task is this one would otherwise keep denormal means
    r = state.connect(redis_url())
    client_sum, server_sum, metas = state.merge_partial_sums(r, rnd, devices)
    client_global = client_sum.average(state.get_model(r, client_prev_sha))
    server_global = server_sum.average(state.get_model(r, server_prev_sha))
    client_sha, _ = state.put_model(r, client_global)
    server_sha, _ = state.put_model(r, server_global)
    return {"client_sha": client_sha, "server_sha": server_sha,
            "stats": [m["stats"] for m in metas], "uploads": [m["client_sha"] for m in metas]}


@app.task(name="hsfl.infer", acks_late=True)
def infer(dev: str, manifest_sha: str, server_sha: str, idle_s: float = 30.0, rnd: int = 0,
          attempt: str | None = None) -> dict[str, Any]:
    """Fallback inference for device ``dev``: answer its ``infer`` messages of round ``rnd`` with the
    server model's predictions (and logits when asked) on ``dev/{id}/down``.

    Ends when the device sends its ``eval_report`` for round ``rnd`` (stored in
    ``round:{rnd}:eval``, where the orchestrator collects it), when ``idle_s`` pass without a
    request, or when a newer task (or evaluation ``attempt``, field ``eval_attempt``) takes over.
    A request that fails its schema, or that the server model cannot run (wrong depth or
    feature shape), is answered with an ``error`` on ``dev/{id}/err`` naming its seq.
    """
    flush_denormal()  # per-thread, before this thread's first torch operation (its intra-op workers inherit it)
    r = state.connect(redis_url())
    plan = plan_for(r, manifest_sha)
    model = plan.new_model()
    model.load_state_dict(server_weights(r, server_sha))
    model.eval()
    topics = mqtt_settings()[4]
    token = uuid.uuid4().hex[:12]
    field = f"infer:{dev}"
    heartbeat = state.Heartbeat(r, rnd, attempt, field, token)
    if not heartbeat.start():
        return {"device": dev, "round": rnd, "served": 0, "skipped": "another infer task of this attempt is alive"}
    try:
        client = connect_task_client(f"infer-{dev}-{token}", time.monotonic() + idle_s)
    except BaseException:
        heartbeat.stop()
        raise
    served, reported = 0, False
    try:
        sub = client.subscribe(topics.up(dev))
        inbox = Inbox(client, sub, r, rnd, known_devices(r, manifest_sha), f"infer {dev} round {rnd}")
        if not state.claim_ready(r, rnd, field, token, "eval_attempt", attempt):
            return {"device": dev, "round": rnd, "served": 0, "skipped": "superseded"}
        guard = state.TaskGuard(r, rnd, field, token, "eval_attempt", attempt)
        last = time.monotonic()
        while True:
            try:
                message = sub.get(timeout=GUARD_POLL_S)
            except TimeoutError:
                guard.check()
                if time.monotonic() - last > idle_s:
                    break
                continue
            guard.check()
            env = inbox.screen(message, ("infer", "eval_report"))  # a replayed infer is refused, not answered
            if env is None:
                continue
            last = time.monotonic()
            if env.kind == "eval_report":
                with r.pipeline(transaction=True) as pipe:
                    pipe.hset(state.eval_key(rnd), dev, json.dumps({"attempt": attempt, "token": token,
                                                                    "report": dataclasses.asdict(env.body)}))
                    state.notify(pipe, rnd)
                    pipe.execute()
                reported = True
                break
            req = restore_layout(env.body, plan.cfg.model.channels_last)
            try:
                with torch.no_grad():
                    logits = model(req.features.to(torch.float32), int(req.depth))
            except (RuntimeError, ValueError, KeyError, IndexError) as err:
                log.warning("infer %s: request seq %d failed: %s", dev, env.seq, err)
                wire_err = WireError("body.features", f"the server model cannot run these features at depth "
                                     f"{req.depth}: {err}"[:1500], dev=dev, kind=env.kind, seq=env.seq)
                answer(client, topics, Rejected.wrap(wire_err, "bad_request", message.topic), r, rnd=rnd,
                       receiver=f"infer {dev} round {rnd}")
                continue
            reply = InferReply(ref_seq=env.seq, predictions=logits.argmax(1).to(torch.int64),
                               logits=logits.float() if req.want_logits else None)
            client.send(topics.down(dev), reply, round=rnd)
            served += 1
    except state.Superseded as err:
        log.info("infer task of device %s round %d stops: %s", dev, rnd, err)
    finally:
        heartbeat.stop()
        client.close(timeout=2)
    return {"device": dev, "round": rnd, "served": served, "reported": reported}
