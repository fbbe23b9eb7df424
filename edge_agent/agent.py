"""The edge agent: registers with its resource profile, then runs the client side of the assigned
algorithm for each ``round_start`` over MQTT, and answers ``personalise`` and ``evaluate`` commands.

One :class:`Agent` process hosts one or many emulated devices (a thread and an MQTT connection per
device, one shared torch and dataset). Per device:

- ``hello`` (retained) with the psutil profile, bounded by the container's cgroup limits (``probe``);
  status ``online``/``idle``/``training``.
- ``assign`` names the run manifest by hash (``config_digest``): a blob holding the experiment
  config, the data shape, the split depths, ``n_i`` and the device → client map, plus per device
  the hash of a small *share* blob with that client's index lists. The agent rebuilds the plan
  from it (``harmony.experiment.Experiment.from_manifest``) with only the shares of the devices it
  hosts, and reads only their rows of the dataset files (``--data-dir`` says where they are on this
  host), so it never holds another client's samples; its batches, random streams and model are
  those the in-process fleet uses for that client.
- ``round_start``: fetch the client model blob (only when its hash is not cached), run ``steps``
  U-shaped steps through ``algorithm.client_side`` — features/logit gradients up, logits/feature
  gradients down — then upload the trained client state (plus its training statistics) as blob
  chunks on ``dev/{id}/up``. A new ``round_start`` for the same round mid-session (the server's
  session was redelivered) restarts the session from the round-start weights: the steps replay
  identically because every random stream is derived from (seed, round, device, purpose).
- ``personalise``: the algorithm's post-training personalisation from the given model; the result
  goes up as a blob (and stays in the blob cache, so a following ``evaluate`` of it downloads nothing).
- ``evaluate``: the device's side of the evaluation (``harmony.experiment.DevicePlan.evaluate``,
  the code the in-process fleet runs) on its own test pools — early exits computed here, and
  the features of every sample the server may have to classify sent as ``infer`` messages (fp16
  at the split depth, in requests of at most ``harmony.evaluate.MAX_OFFLOAD_BYTES``) to the ``hsfl.infer`` task, whose
  ``infer_reply`` predictions feed the τ sweep here; labels never leave the device. The result
  goes up as an ``eval_report``.
- ``cancel``: abandon the session of that round (its server side failed, or the round went on
  without this device) and wait for the next command.
- ``stop``: leave.

The MQTT connection reconnects by itself (persistent session, QoS 1), so a broker blip resumes;
``hello`` and the status are announced again on every reconnect, so a broker restarted without its
retained messages still sees the device. A restarted agent process starts a clean MQTT session
(commands queued for its previous life are stale) and says so through ``hello.started_at``: the
round driver then sends it its ``assign`` again (docs/design.md §9).
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import torch

from broker.blobs import (
    BlobCache,
    bytes_to_state_dict,
    session_upload_bytes,
    sha256_hex,
    split_blob,
    state_dict_to_bytes,
)
from broker.client import BrokerClient, InboundMessage, Subscription, TlsSettings
from broker.codec import Envelope, make_envelope
from broker.errors import BrokerError, ConnectRefused, WireError
from broker.inbound import Rejected, screen
from broker.schemas import (
    LINK_PROBE_MAX_BYTES,
    Assign,
    EvalReport,
    Evaluate,
    Hello,
    InferRequest,
    LinkProbe,
    Personalise,
    RoundStart,
)
from broker.topics import Topics
from edge_agent.emulation import DeviceLimits, StepPacer
from edge_agent.probe import cpu_quota_cpus, kernel_rates, probe_hello, probe_link
from harmony.assignment import step_needs
from harmony.data.device_rows import board_data_share
from harmony.evaluate import ServerPredict
from harmony.experiment import ClientShare, DevicePlan, Experiment
from harmony.fleet import flush_denormal
from harmony.timing import PhaseClock

log = logging.getLogger(__name__)
STOP_DUMP_S = 15.0
"""After SIGINT, the agent process dumps every thread's stack to stderr if it has not exited by then."""

COMMAND_KINDS = ("assign", "round_start", "personalise", "evaluate", "cancel", "stop")
REQUEST_REFUSALS = ("bad_request", "bad_schema")
"""Error codes that refuse a device's own request; the others answer a copy or a forgery."""


class Restart(Exception):
    """A newer command arrived mid-session; handle it next."""

    def __init__(self, envelope: Envelope) -> None:
        super().__init__(envelope.kind)
        self.envelope = envelope


class SharedRuntime:
    """What the emulated devices of one process share: the blob cache and the rebuilt plan, with the
    data of exactly the devices this process hosts (``hosted``), read from the files once."""

    def __init__(self, cache: BlobCache, hosted: list[str], data_dir: str | None = None) -> None:
        self.cache = cache
        self.hosted = list(hosted)
        self.data_dir = data_dir
        self.data_share = board_data_share(data_dir) if len(self.hosted) == 1 else None
        """A flashed board's one device: the share digest of its data file (``hello.data_share``)."""
        self._lock = threading.Lock()
        self._manifest_sha: str | None = None
        self.devices: dict[str, DevicePlan] = {}
        """Device id → its plan and data, for the current manifest (what this process holds)."""
        self._measure_lock = threading.Lock()
        self._rates: dict[tuple[float, float | None, float], dict[str, float]] = {}
        self._link: tuple[float, float] | None = None
        self._self_check: dict[str, Any] | None = None

    def self_check(self) -> dict[str, Any]:
        """The agent's self-check at start (``edge_agent.selfcheck.in_process_check``; run once per process),
        as ``hello.self_check``. A failure is logged and reported, the agent goes on."""
        with self._measure_lock:
            if self._self_check is None:
                from edge_agent.selfcheck import in_process_check

                report = in_process_check(batch=1)
                (log.info if report.ok else log.warning)("%s", report.message())
                self._self_check = report.hello_summary()
            return self._self_check

    def measure(self, slowdown: float, publish: Callable[[bytes], None], pace_flops: float | None = None,
                sustained_s: float = 0.0, probe_bytes: int | None = None) -> tuple[dict[str, float], float, float]:
        """``(rates, rtt_ms, uplink_bps)`` for a device's ``hello``: the layer rates of a device
        ``slowdown`` times slower than the host (paced to ``pace_flops``, timed over ``sustained_s``
        under a CPU quota: ``kernel_rates``), and the link, each measured once per process (the
        devices of one process share the host, its class and its link)."""
        with self._measure_lock:
            key = (slowdown, pace_flops, sustained_s)
            if key not in self._rates:
                self._rates[key] = kernel_rates(slowdown, pace_flops=pace_flops, sustained_s=sustained_s)
            if self._link is None:
                self._link = probe_link(publish) if probe_bytes is None else probe_link(publish, probe_bytes, 3)
            return self._rates[key], *self._link

    def device(self, client: BrokerClient, manifest_sha: str, device_id: str) -> DevicePlan:
        with self._lock:
            if manifest_sha != self._manifest_sha:
                manifest = json.loads(client.fetch_blob(manifest_sha, cache=self.cache))
                index = manifest["clients"]
                mine = [d for d in self.hosted if d in index]
                shares = {int(index[d]): ClientShare.from_bytes(client.fetch_blob(manifest["shares"][d],
                                                                                  cache=self.cache)) for d in mine}
                self.devices = {}
                self._manifest_sha = None
                experiment = Experiment.from_manifest(manifest, shares, data_dir=self.data_dir)
                plans = experiment.devices(sorted(shares))
                self.devices = {d: plans[int(index[d])] for d in mine}
                self._manifest_sha = manifest_sha
            if device_id not in self.devices:
                raise KeyError(f"the run manifest {manifest_sha[:12]} assigns no client to device {device_id!r}")
            return self.devices[device_id]


def restore_layout(msg: Any, channels_last: bool) -> Any:
    """Give 4-d float tensors from the wire the channels-last layout the in-process transport passes."""
    if channels_last:
        for name in ("grad_features",):
            value = getattr(msg, name, None)
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                setattr(msg, name, value.contiguous(memory_format=torch.channels_last))
    return msg


def device_path(path: str | Path, device_id: str) -> Path:
    """``path`` with ``{device}`` replaced by ``device_id`` (per-device client certificates)."""
    return Path(str(path).replace("{device}", device_id))


def device_tls(tls: TlsSettings | None, device_id: str) -> TlsSettings | None:
    """``tls`` with ``{device}`` in its client certificate and key paths replaced by ``device_id``."""
    if tls is None:
        return None
    return dataclasses.replace(
        tls, certfile=None if tls.certfile is None else device_path(tls.certfile, device_id),
        keyfile=None if tls.keyfile is None else device_path(tls.keyfile, device_id))


@dataclass
class Credentials:
    username: str | None = None
    password: str | None = None


class Device:
    """One (possibly emulated) device: its MQTT connection and command loop."""

    def __init__(self, device_id: str, host: str, port: int, shared: SharedRuntime, *, topics: Topics,
                 credentials: Credentials | None = None, tls: TlsSettings | None = None,
                 session_timeout_s: float = 600.0,
                 slowdown: float = 1.0, corrupt_features: bool = False, started_at: float | None = None,
                 device_class: str | None = None, limits: DeviceLimits | None = None) -> None:
        self.id, self.host, self.port, self.shared, self.topics = device_id, host, port, shared, topics
        self.device_class = device_class
        self.limits = limits
        creds = credentials or Credentials()
        # a clean session on this process's first connect (what the broker queued for an earlier
        # process of this device is stale), the persistent one on every reconnect
        self.client = BrokerClient(f"agent-{device_id}", host, port, username=creds.username,
                                   password=creds.password, tls=tls, topics=topics, device_id=device_id,
                                   clean_start=paho.MQTT_CLEAN_START_FIRST_ONLY,
                                   reconnect_min_delay_s=0.2, reconnect_max_delay_s=5.0)
        if limits is not None:
            self._shape_link(limits)
        self.started_at = time.time() if started_at is None else started_at
        self.session_timeout_s = session_timeout_s
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown {slowdown}: a device can only be emulated slower than its host (>= 1)")
        self.slowdown = slowdown
        self.corrupt_features = corrupt_features
        self.assignment: Assign | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._main, name=f"device-{device_id}", daemon=True)
        self.cmd: Subscription | None = None
        self.down: Subscription | None = None
        self.err: Subscription | None = None

    def start(self) -> None:
        self.thread.start()

    @contextlib.contextmanager
    def _paced(self) -> Iterator[None]:
        """A device ``slowdown`` times slower than this host: each compute phase is followed by a
        sleep of (slowdown − 1) × its duration (the simplest emulation of a slower board)."""
        t0 = time.perf_counter()
        yield
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * (time.perf_counter() - t0))

    def _shape_link(self, limits: DeviceLimits) -> None:
        """The emulated link (``--emulate``): every publish waits for the uplink bucket and the
        round-trip delay, every received message for the downlink bucket."""
        uplink, downlink, delay = limits.uplink_bucket(), limits.downlink_bucket(), limits.round_trip_s

        def before_publish(nbytes: int) -> None:
            if delay > 0:
                time.sleep(delay)
            if uplink is not None:
                uplink.consume(nbytes)

        if uplink is not None or delay > 0:
            self.client.before_publish = before_publish
        if downlink is not None:
            self.client.before_deliver = downlink.consume

    def _hello(self) -> Hello:
        """This device's ``hello``: the host's probe, the layer rates at this device's slow-down (or
        its class's pacing) and the uplink timed through the broker (``link_probe`` on its ``up``
        topic) — under an emulated class, what its enforced limits let through."""
        up = self.topics.up(self.id)
        pace = self.limits.compute_flops if self.limits is not None else None
        sustained = 0.5 if cpu_quota_cpus() is not None else 0.0  # a CPU quota: burst speed says nothing
        # an emulated link is probed with 1 MiB (the schema's limit), best of 3: its rate is what the
        # measured assignment sees, and a 256 KiB probe lasts only ~20 ms at 100 Mbit/s
        probe = LINK_PROBE_MAX_BYTES if self.limits is not None else None
        rates, rtt_ms, uplink_bps = self.shared.measure(
            self.slowdown, lambda payload: self.client.send(up, LinkProbe(payload=payload)).wait(30), pace, sustained,
            probe)
        return probe_hello(rtt_ms=rtt_ms, uplink_bps=uplink_bps, rates=rates, device_class=self.device_class)

    # ------------------------------------------------------------------------------- loop
    def _connect(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.client.connect(timeout=5)
                return
            except ConnectRefused as err:
                log.warning("device %s: %s; retrying", self.id, err)
                time.sleep(1.0)

    def _main(self) -> None:
        flush_denormal()  # per-thread CPU state: set in the thread that runs this device's torch work
        try:
            self._connect()
            self.cmd = self.client.subscribe(self.topics.cmd(self.id))
            self.down = self.client.subscribe(self.topics.down(self.id))
            self.err = self.client.subscribe(self.topics.err(self.id))
            hello = dataclasses.replace(self._hello(), started_at=self.started_at, data_share=self.shared.data_share,
                                        self_check=self.shared.self_check())
            self.client.announce(self.topics.hello(self.id), hello)  # again after every reconnect
            log.info("device %s: registered with %d core(s), %.2f CPUs, %d MiB, %.1f GFLOP/s", self.id, hello.cores,
                     hello.cpus, hello.memory_bytes >> 20, hello.gflops)
            self.client.publish_status("idle")
            pending: Envelope | None = None
            while not self.stop_event.is_set():
                if pending is None:
                    try:
                        pending = self._next_command(timeout=0.5)
                    except TimeoutError:
                        continue
                env, pending = pending, None
                try:
                    if not self._handle(env):
                        break
                except Restart as restart:
                    pending = restart.envelope
                except (BrokerError, TimeoutError, KeyError, ValueError, RuntimeError) as err:
                    log.error("device %s: %s failed: %s", self.id, env.kind, err)
                    try:
                        self.client.publish_status("error", str(err)[:1000])
                    except (BrokerError, TimeoutError) as status_err:  # e.g. the broker is still away
                        log.warning("device %s: could not report the error: %s", self.id, status_err)
        except Exception:
            log.exception("device %s stopped on an unexpected error", self.id)
        finally:
            self.client.close(timeout=2)

    def _next_command(self, timeout: float) -> Envelope:
        assert self.cmd is not None
        while True:
            command = self._screen_command(self.cmd.get(timeout))
            if command is not None:
                return command

    def _screen_command(self, message: InboundMessage) -> Envelope | None:
        """A command from this device's ``cmd`` topic, or None when it is refused (``broker.inbound``:
        undecodable, another device's, a kind that is no command): dropped and answered with an
        ``error`` on this device's ``up`` — whenever it arrives, also while a session waits for
        the server. (Only the orchestrator account may write ``cmd`` when the broker runs with its
        ACL, ``harmony up``'s default.)"""
        if not message.payload:
            return None
        try:
            return screen(message.topic, message.payload, self.topics, max_bytes=self.client.max_bytes,
                          kinds=COMMAND_KINDS)
        except Rejected as rejection:
            log.warning("device %s: dropped a command (%s): %s", self.id, rejection.code, rejection)
            try:
                self.client.send(self.topics.up(self.id), rejection.report(), wait=False)
            except (BrokerError, WireError) as err:
                log.warning("device %s: could not answer the dropped command: %s", self.id, err)
            return None

    def _handle(self, env: Envelope) -> bool:
        body = env.body
        if env.kind == "assign":
            self.assignment = body
            plan = self.shared.device(self.client, body.config_digest, self.id)
            if plan.depth != body.split_depth:
                raise ValueError(f"assigned depth {body.split_depth} but the plan says {plan.depth}")
            self.client.publish_status("idle", f"client {plan.client} at depth {body.split_depth}")
        elif env.kind == "round_start":
            self._train(body)
        elif env.kind == "personalise":
            self._personalise(env.round, body)
        elif env.kind == "evaluate":
            self._evaluate(env.round, body)
        elif env.kind == "cancel":
            log.info("device %s: round %d cancelled (%s)", self.id, body.round, body.reason)
            self.client.publish_status("idle", f"round {body.round} cancelled: {body.reason}"[:1000])
        elif env.kind == "stop":
            self.stop_event.set()
            return False
        else:
            log.warning("device %s: ignoring command %r", self.id, env.kind)
        return True

    # ------------------------------------------------------------------------------- work
    def _plan(self) -> DevicePlan:
        if self.assignment is None:
            raise RuntimeError("a command arrived before the assignment")
        return self.shared.device(self.client, self.assignment.config_digest, self.id)

    def _model(self, plan: DevicePlan, sha: str) -> Any:
        model = plan.new_model()
        model.load_state_dict(bytes_to_state_dict(self.client.fetch_blob(sha, cache=self.shared.cache)))
        return model

    def _await_down(self, kind: str, rnd: int, step: int | None, deadline: float, ref_seq: int | None = None
                    ) -> Envelope:
        """The server's reply (of ``step``, or answering ``ref_seq``), watching the command topic for a
        restart and the error topic for a refusal of ``ref_seq`` meanwhile."""
        assert self.cmd is not None and self.down is not None and self.err is not None

        def wanted(e: Envelope) -> bool:  # a reply for another device (forged: dev is not ours) is left alone
            return e.dev == self.id and e.round == rnd and (step is None or e.step == step) and (
                ref_seq is None or getattr(e.body, "ref_seq", None) == ref_seq)

        def refuses(e: Envelope) -> bool:  # a refusal of this very request, not of a copy someone sent again
            return e.dev == self.id and e.body.ref_seq == ref_seq and e.body.code in REQUEST_REFUSALS

        while True:
            try:
                return self.client.wait_for(kind, wanted, timeout=0.5, subscription=self.down)
            except TimeoutError:
                pass
            nxt = self.cmd.get_nowait()
            command = None if nxt is None else self._screen_command(nxt)  # a malformed one is dropped here too
            if command is not None:
                if command.kind != "cancel" or command.body.round == rnd:
                    raise Restart(command)
                log.info("device %s: ignoring a cancel of round %d during round %d", self.id, command.body.round, rnd)
            if ref_seq is not None:
                try:
                    refusal = self.client.wait_for("error", refuses, timeout=0, subscription=self.err)
                except TimeoutError:
                    pass
                else:
                    raise RuntimeError(f"the server refused message seq {ref_seq}: {refusal.body.message}")
            if time.monotonic() > deadline:
                what = f"step {step}" if ref_seq is None else f"request seq {ref_seq}"
                raise TimeoutError(f"no {kind!r} for round {rnd} {what} from the server")

    def _train(self, rs: RoundStart) -> None:
        plan = self._plan()
        cfg = plan.cfg
        rnd = rs.round
        assert self.down is not None
        while self.down.get_nowait() is not None:  # replies of an abandoned attempt
            pass
        self.client.publish_status("training", f"round {rnd}")
        side = plan.session(rnd, self._model(plan, rs.client_model_sha256))
        deadline = time.monotonic() + self.session_timeout_s
        up = self.topics.up(self.id)
        clock, t0 = PhaseClock(), time.perf_counter()
        pacer = StepPacer(self._step_target_s(plan))
        for step in range(rs.steps):
            with clock("compute"), self._paced(), pacer.phase():
                features = side.begin_step(step)
            if self.corrupt_features:  # fault injection: a device that sends features of the wrong shape
                features = dataclasses.replace(features, features=features.features[:, :-1])
            with clock("send"):
                self.client.send(up, features, round=rnd)
            with clock("wait"):
                logits = self._await_down("logits", rnd, step, deadline)
            with clock("compute"), self._paced(), pacer.phase():
                logit_grad = side.on_logits(logits.body)
            with clock("send"):
                self.client.send(up, logit_grad, round=rnd)
            with clock("wait"):
                grad = self._await_down("feature_grad", rnd, step, deadline)
            with clock("compute"), self._paced():
                with pacer.phase():
                    side.on_feature_grad(restore_layout(grad.body, cfg.model.channels_last))
                pacer.finish()
        split = clock.seconds()
        log.info("device %s round %d: %d steps in %.2f s (device compute %.2f, waiting for the server %.2f, "
                 "sending %.2f); compute cpu %.4f s", self.id, rnd, rs.steps, time.perf_counter() - t0,
                 split["compute"], split["wait"], split["send"], clock.cpu_seconds()["compute"])
        self._upload(session_upload_bytes(side.state(), side.stats.vector(), split["compute"]), rnd)
        self.client.publish_status("idle", f"round {rnd} done")

    def _step_target_s(self, plan: DevicePlan) -> float:
        """The seconds one training step's compute must take on the emulated class (its FLOPs ÷ the
        class's rate, as ``harmony.assignment`` counts them); 0 when compute is not paced here."""
        if self.limits is None or self.limits.compute_flops is None:
            return 0.0
        cfg = plan.cfg
        return step_needs(plan.experiment.costs[plan.depth], batch_size=cfg.train.batch_size,
                          batches_per_step=plan.algorithm.batches_per_step, momentum=cfg.train.momentum,
                          bits_per_element=cfg.eval.bits_per_element, compute_flops=self.limits.compute_flops,
                          uplink_bps=1.0).compute_s

    def _upload(self, data: bytes, rnd: int) -> None:
        pending = [self.client.send(self.topics.up(self.id), chunk, round=rnd, wait=False)
                   for chunk in split_blob(data)]
        for p in pending:
            p.wait(60)

    def _personalise(self, rnd: int, cmd: Personalise) -> None:
        plan = self._plan()
        model = self._model(plan, cmd.model_sha256)
        plan.personalise(model)
        data = state_dict_to_bytes(model.state_dict())
        self.shared.cache.put(data, sha256_hex(data))  # the orchestrator evaluates exactly this model next
        self._upload(data, rnd)

    def _remote_server(self, rnd: int, deadline: float) -> ServerPredict:
        """The fallback as the evaluation calls it: ``infer`` up, the ``infer_reply`` predictions back."""
        up = self.topics.up(self.id)

        def predict(features: torch.Tensor, depth: int) -> torch.Tensor:
            seq = self.client.next_seq()
            request = make_envelope(InferRequest(depth=depth, features=features.detach().cpu()), dev=self.id,
                                    seq=seq, round=rnd)
            self.client.publish_message(up, request)
            reply = self._await_down("infer_reply", rnd, None, deadline, ref_seq=seq).body
            if reply.predictions.shape != (features.shape[0],):
                raise WireError("body.predictions", f"expected {features.shape[0]} predictions for request seq {seq}, "
                                f"got shape {list(reply.predictions.shape)}")
            return reply.predictions

        return predict

    def _evaluate(self, rnd: int, cmd: Evaluate) -> None:
        plan = self._plan()
        cfg = plan.cfg
        assert self.down is not None and self.err is not None
        for sub in (self.down, self.err):  # replies of an abandoned attempt
            while sub.get_nowait() is not None:
                pass
        self.client.publish_status("evaluating", f"round {rnd}")
        model = self._model(plan, cmd.model_sha256)
        deadline = time.monotonic() + self.session_timeout_s
        ev = plan.evaluate(model, self._remote_server(rnd, deadline), rhos=list(cmd.rhos),
                           taus=list(cmd.entropy_thresholds) or None, fixed_tau=cmd.fixed_tau, measure=True)
        report = EvalReport.from_evaluation(ev, cfg.eval.fixed_tau if cmd.fixed_tau is None else cmd.fixed_tau,
                                            plan.evaluated_samples(list(cmd.rhos)))
        self.client.send(self.topics.up(self.id), report, round=rnd)
        self.client.publish_status("idle", f"evaluation {rnd} done")


class Agent:
    """Hosts devices until they are told to stop (or ``stop()``)."""

    def __init__(self, host: str, port: int, device_ids: list[str], *, topics: Topics | None = None,
                 credentials: dict[str, Credentials] | None = None, tls: TlsSettings | None = None,
                 cache_dir: str | None = None, data_dir: str | None = None, slowdown: float = 1.0,
                 corrupt_features: bool = False, device_class: str | None = None,
                 limits: DeviceLimits | None = None) -> None:
        self.shared = SharedRuntime(BlobCache(cache_dir, max_entries=4 * len(device_ids) + 8), device_ids, data_dir)
        topics = topics or Topics()
        creds = credentials or {}
        started_at = time.time()
        if limits is not None:
            log.info("emulating class %s in the agent: %s", limits.profile.name, limits.describe())
        self.devices = [Device(d, host, port, self.shared, topics=topics, credentials=creds.get(d),
                               tls=device_tls(tls, d), slowdown=slowdown, corrupt_features=corrupt_features,
                               started_at=started_at, device_class=device_class, limits=limits)
                        for d in device_ids]

    def run(self, dump_after_stop_s: float | None = None) -> None:
        """Run the devices until they end or SIGINT stops them. ``dump_after_stop_s`` (the agent
        process passes :data:`STOP_DUMP_S`): a clean stop takes a second or two; if the process is
        still here that long after SIGINT, every thread's stack goes to stderr (the agent's log)."""
        for device in self.devices:
            device.start()
        try:
            while any(d.thread.is_alive() for d in self.devices):
                time.sleep(0.5)
        except KeyboardInterrupt:
            if dump_after_stop_s is not None:
                faulthandler.dump_traceback_later(dump_after_stop_s, exit=False)
            self.stop()

    def stop(self) -> None:
        for device in self.devices:
            device.stop_event.set()
        for device in self.devices:
            device.thread.join(timeout=5)
