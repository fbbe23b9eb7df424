"""The edge agent: registers with its resource profile, then runs the client side of the assigned
algorithm for each ``round_start`` over MQTT, and answers ``personalise`` commands.

One :class:`Agent` process hosts one or many emulated devices (a thread and an MQTT connection per
device, one shared torch and dataset). Per device:

- ``hello`` (retained) with the psutil profile; status ``online``/``idle``/``training``.
- ``assign`` names the run manifest by hash (``config_digest``): a blob holding the experiment
  config and the device → client index map. The agent rebuilds the experiment plan from it with the
  same ``harmony`` set-up the local engine uses (data, partition, split depths, models), so its
  batches, random streams and model are those of ``LocalEngine.run_client_session`` for that client.
  (Chosen over shipping each device its sample indices: the plan is a pure function of the config,
  and a board needs the dataset files anyway.)
- ``round_start``: fetch the client model blob (only when its hash is not cached), run ``steps``
  U-shaped steps through ``algorithm.client_side`` — features/logit gradients up, logits/feature
  gradients down — then upload the trained client state (plus its training statistics) as blob
  chunks on ``dev/{id}/up``. A new ``round_start`` for the same round mid-session (the server's
  session was redelivered) restarts the session from the round-start weights: the steps replay
  identically because every random stream is derived from (seed, round, device, purpose).
- ``personalise``: the algorithm's post-training personalisation from the given model; the result
  goes up as a blob.
- ``stop``: leave.

The MQTT connection reconnects by itself (persistent session, QoS 1), so a broker blip resumes.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from broker.blobs import BlobCache, bytes_to_state_dict, split_blob, state_dict_to_bytes
from broker.client import BrokerClient, Subscription
from broker.codec import Envelope
from broker.errors import BrokerError, ConnectRefused
from broker.schemas import Assign, Personalise, RoundStart
from broker.topics import Topics
from edge_agent.probe import probe_hello
from harmony.algorithms import SessionContext
from harmony.config import validate_config
from harmony.engine import LocalEngine

log = logging.getLogger(__name__)

STATS_KEY = "__stats__"


class Restart(Exception):
    """A newer command arrived mid-session; handle it next."""

    def __init__(self, envelope: Envelope) -> None:
        super().__init__(envelope.kind)
        self.envelope = envelope


class SharedRuntime:
    """What the emulated devices of one process share: the blob cache and the rebuilt experiment."""

    def __init__(self, cache: BlobCache) -> None:
        self.cache = cache
        self._lock = threading.Lock()
        self._engines: dict[str, tuple[LocalEngine, dict[str, Any]]] = {}

    def experiment(self, client: BrokerClient, manifest_sha: str) -> tuple[LocalEngine, dict[str, Any]]:
        with self._lock:
            if manifest_sha not in self._engines:
                manifest = json.loads(client.fetch_blob(manifest_sha, cache=self.cache))
                self._engines.clear()
                self._engines[manifest_sha] = (LocalEngine(validate_config(manifest["config"])), manifest)
            return self._engines[manifest_sha]


def restore_layout(msg: Any, channels_last: bool) -> Any:
    """Give 4-d float tensors from the wire the channels-last layout the in-process transport passes."""
    if channels_last:
        for name in ("grad_features",):
            value = getattr(msg, name, None)
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                setattr(msg, name, value.contiguous(memory_format=torch.channels_last))
    return msg


@dataclass
class Credentials:
    username: str | None = None
    password: str | None = None


class Device:
    """One (possibly emulated) device: its MQTT connection and command loop."""

    def __init__(self, device_id: str, host: str, port: int, shared: SharedRuntime, *, topics: Topics,
                 credentials: Credentials | None = None, session_timeout_s: float = 600.0) -> None:
        self.id, self.host, self.port, self.shared, self.topics = device_id, host, port, shared, topics
        creds = credentials or Credentials()
        self.client = BrokerClient(f"agent-{device_id}", host, port, username=creds.username,
                                   password=creds.password, topics=topics, device_id=device_id,
                                   reconnect_min_delay_s=0.2, reconnect_max_delay_s=5.0)
        self.session_timeout_s = session_timeout_s
        self.assignment: Assign | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._main, name=f"device-{device_id}", daemon=True)
        self.cmd: Subscription | None = None
        self.down: Subscription | None = None

    def start(self) -> None:
        self.thread.start()

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
        # flush-to-zero is per-thread CPU state: set it in the thread that runs this device's torch work
        torch.set_flush_denormal(True)
        try:
            self._connect()
            self.cmd = self.client.subscribe(self.topics.cmd(self.id))
            self.down = self.client.subscribe(self.topics.down(self.id))
            self.client.send(self.topics.hello(self.id), probe_hello(), retain=True)
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
                    self.client.publish_status("error", str(err)[:1000])
        except Exception:
            log.exception("device %s stopped on an unexpected error", self.id)
        finally:
            self.client.close(timeout=2)

    def _next_command(self, timeout: float) -> Envelope:
        assert self.cmd is not None
        while True:
            message = self.cmd.get(timeout)
            try:
                return message.decode(self.client.max_bytes)
            except Exception as err:  # WireError: log and drop, as the wire rules say
                log.warning("device %s: dropped a malformed command: %s", self.id, err)

    def _handle(self, env: Envelope) -> bool:
        body = env.body
        if env.kind == "assign":
            self.assignment = body
            engine, manifest = self.shared.experiment(self.client, body.config_digest)
            index = manifest["clients"][self.id]
            if engine.plan.depths[index] != body.split_depth:
                raise ValueError(f"assigned depth {body.split_depth} but the plan says {engine.plan.depths[index]}")
            self.client.publish_status("idle", f"client {index} at depth {body.split_depth}")
        elif env.kind == "round_start":
            self._train(body)
        elif env.kind == "personalise":
            self._personalise(env.round, body)
        elif env.kind == "stop":
            self.stop_event.set()
            return False
        else:
            log.warning("device %s: ignoring command %r", self.id, env.kind)
        return True

    # ------------------------------------------------------------------------------- work
    def _experiment(self) -> tuple[LocalEngine, int]:
        if self.assignment is None:
            raise RuntimeError("a command arrived before the assignment")
        engine, manifest = self.shared.experiment(self.client, self.assignment.config_digest)
        return engine, int(manifest["clients"][self.id])

    def _model(self, engine: LocalEngine, index: int, sha: str) -> Any:
        model = copy.deepcopy(engine.client_models[engine.plan.depths[index]])
        model.load_state_dict(bytes_to_state_dict(self.client.fetch_blob(sha, cache=self.shared.cache)))
        return model

    def _await_down(self, kind: str, rnd: int, step: int, deadline: float) -> Envelope:
        """The server's reply, watching the command topic for a restart meanwhile."""
        assert self.cmd is not None and self.down is not None
        while True:
            try:
                return self.client.wait_for(kind, lambda e: e.round == rnd and e.step == step, timeout=0.5,
                                            subscription=self.down)
            except TimeoutError:
                pass
            nxt = self.cmd.get_nowait()
            if nxt is not None:
                raise Restart(nxt.decode(self.client.max_bytes))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind!r} for round {rnd} step {step} from the server")

    def _train(self, rs: RoundStart) -> None:
        engine, index = self._experiment()
        cfg = engine.cfg
        rnd = rs.round
        assert self.down is not None
        while self.down.get_nowait() is not None:  # replies of an abandoned attempt
            pass
        self.client.publish_status("training", f"round {rnd}")
        model = self._model(engine, index, rs.client_model_sha256)
        ctx = SessionContext(cfg.seed, rnd, index, cfg.train, engine.device)
        batches = engine._batches(index, ctx, "batches")
        side = engine.algorithm.client_side(model, batches, ctx)
        deadline = time.monotonic() + self.session_timeout_s
        up = self.topics.up(self.id)
        for step in range(rs.steps):
            self.client.send(up, side.begin_step(step), round=rnd)
            logits = self._await_down("logits", rnd, step, deadline)
            self.client.send(up, side.on_logits(logits.body), round=rnd)
            grad = self._await_down("feature_grad", rnd, step, deadline)
            side.on_feature_grad(restore_layout(grad.body, cfg.model.channels_last))
        s = side.stats
        upload = dict(side.state())
        upload[STATS_KEY] = torch.tensor([s.samples, s.loss_exit, s.loss_server, s.correct_exit, s.correct_server],
                                         dtype=torch.float64)
        self._upload(state_dict_to_bytes(upload), rnd)
        self.client.publish_status("idle", f"round {rnd} done")

    def _upload(self, data: bytes, rnd: int) -> None:
        pending = [self.client.send(self.topics.up(self.id), chunk, round=rnd, wait=False)
                   for chunk in split_blob(data)]
        for p in pending:
            p.wait(60)

    def _personalise(self, rnd: int, cmd: Personalise) -> None:
        engine, index = self._experiment()
        cfg = engine.cfg
        model = self._model(engine, index, cmd.model_sha256)
        ctx = SessionContext(cfg.seed, cfg.train.rounds + 1, index, cfg.train, engine.device)
        engine.algorithm.personalise(model, engine._batches(index, ctx, "personalise"), ctx)
        self._upload(state_dict_to_bytes(model.state_dict()), rnd)


class Agent:
    """Hosts devices until they are told to stop (or ``stop()``)."""

    def __init__(self, host: str, port: int, device_ids: list[str], *, topics: Topics | None = None,
                 credentials: dict[str, Credentials] | None = None, cache_dir: str | None = None) -> None:
        self.shared = SharedRuntime(BlobCache(cache_dir, max_entries=4 * len(device_ids) + 8))
        topics = topics or Topics()
        creds = credentials or {}
        self.devices = [Device(d, host, port, self.shared, topics=topics, credentials=creds.get(d))
                        for d in device_ids]

    def run(self) -> None:
        for device in self.devices:
            device.start()
        try:
            while any(d.thread.is_alive() for d in self.devices):
                time.sleep(0.5)
        except KeyboardInterrupt:
            self.stop()

    def stop(self) -> None:
        for device in self.devices:
            device.stop_event.set()
        for device in self.devices:
            device.thread.join(timeout=5)
