"""Fuzz a running stack during a round: N generated payloads, 0 crashes, 0 state changes, 0 unanswered.

A real local stack (mosquitto, redis-server, one Celery worker, one agent process with 4 devices
slowed down ``--slowdown`` times so that the round's sessions last while the payloads go in) runs
one training round and the final evaluation of a tiny config. While the round's sessions run, an
anonymous client on the (open: ``harmony up --insecure``) broker sends payloads from a seeded
generator into the devices' topics:

- on ``dev/{id}/up`` (the session task): random bytes, truncated real messages, features of the
  right shape naming another device (``foreign_dev``) or none of the run (``unknown_device``), of
  another round (``stale_round``), of a step never expected (``wrong_step``), real messages sent
  again (``replay``), NaN features and other bodies that fail their schema (``bad_schema``),
  commands (``wrong_channel``) and forged ``eval_report``/``infer`` messages (``unexpected_kind``);
- on ``dev/{id}/cmd`` (the agent): random bytes, commands naming another device, kinds that are no
  command;
- on ``dev/{id}/hello`` (the round driver's registry): random bytes, hellos naming another device,
  hellos of devices the run does not know.

It stops sending to a device's ``up`` a few steps before that device's session ends (a message
that arrives after a session's last upload chunk has no reader) and keeps at most ``--window``
payloads of the sessions and the registry unanswered at a time (an agent answers the commands it
refuses when it next looks at its ``cmd`` topic: between two steps, or once idle).

Checked: ``crashes`` — stack processes that died, sessions that failed or were dropped, a run that
raised; ``state_changes`` — the run's weights and accuracy table against the local engine's clean
run of the same config (0 when bit for bit equal); ``unanswered`` — payloads without their
``error`` answer (matched by answer topic and the offender's ``seq``: every generated well-formed
payload carries a seq of its own).

    python benchmarks/fuzz.py                      # 10,000 payloads (RESULTS §11)
    python benchmarks/fuzz.py --smoke              # 100 payloads, 12 local steps: the suite's size

The last line printed is one JSON object:
``{"bench": "fuzz", "payloads": N, "crashes": 0, "state_changes": 0, "unanswered": 0, ...}``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.client import BrokerClient  # noqa: E402
from broker.codec import decode, encode, make_envelope  # noqa: E402
from broker.errors import WireError  # noqa: E402
from broker.schemas import EvalReport, InferRequest, RoundStart, Stop  # noqa: E402
from broker.topics import Topics  # noqa: E402
from harmony.config import validate_config  # noqa: E402
from harmony.engine import LocalEngine  # noqa: E402
from orchestrator.engine import DistributedEngine  # noqa: E402
from server import state  # noqa: E402
from testbed.stack import LocalStack  # noqa: E402

DEVICES = ["emu-0", "emu-1", "emu-2", "emu-3"]
SEQ_BASE = 1 << 40
"""Generated well-formed payloads carry seqs from here on: no real sender comes near them."""
MARGIN_STEPS = 4
"""Stop fuzzing a device's ``up`` once its session reached this many steps before its last."""
CONFIG = {
    "name": "fuzz", "seed": 7,
    "data": {"num_shards": 8, "train_fraction": 0.03, "test_per_client": 40, "rhos": [0.0, 0.5]},
    "model": {"family": "cnn8", "width": 0.25},
    "fleet": {"num_clients": 4, "split_depths": [2, 3, 4, 2]},
    "train": {"algorithm": "splitgp", "rounds": 1, "batch_size": 16, "lr": 0.01},
    "eval": {"measure_latency_samples": 0},
}
UP_CATEGORIES = ("bytes", "truncated", "foreign_dev", "unknown_device", "stale_round", "wrong_step", "replay",
                 "nan", "bad_header", "wrong_channel", "forged_report", "forged_infer")
CMD_CATEGORIES = ("bytes", "foreign_command", "not_a_command")
HELLO_CATEGORIES = ("bytes", "foreign_hello", "unknown_hello")


class Fuzzer:
    """Generates, sends and accounts for the payloads (see the module docstring)."""

    def __init__(self, mqtt: tuple[str, int], r: Any, payloads: int, seed: int, window: int, steps: int) -> None:
        self.topics = Topics()
        self.r, self.target, self.window, self.steps = r, payloads, window, steps
        self.rng = random.Random(seed)
        self.client = BrokerClient("fuzzer", *mqtt, clean_start=True, session_expiry_s=0)
        self.client.connect()
        self.captured: dict[tuple[str, str], tuple[bytes, Any]] = {}  # (device, kind) → (payload, envelope)
        self.progress: dict[str, int] = {d: -1 for d in DEVICES}  # the latest features step seen per device
        self.lock = threading.Lock()
        self.expected: collections.Counter[tuple[str, int | None]] = collections.Counter()
        self.got: collections.Counter[tuple[str, int | None]] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()
        self.categories: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self.sent_fast = 0  # payloads answered on an err topic (not the commands)
        self.seq = SEQ_BASE
        self.stop = threading.Event()
        self.ups = self.client.subscribe(self.topics.all_devices("up"))
        self.errs = self.client.subscribe(self.topics.all_devices("err"))
        self.readers = [threading.Thread(target=self._read_ups, daemon=True),
                        threading.Thread(target=self._read_errs, daemon=True)]
        for t in self.readers:
            t.start()

    # -- accounting ----------------------------------------------------------------------
    def _read_ups(self) -> None:
        while not self.stop.is_set():
            try:
                message = self.ups.get(timeout=0.2)
            except TimeoutError:
                continue
            try:
                env = decode(message.payload)
            except WireError:
                continue  # one of ours
            dev = self.topics.parse(message.topic).device_id
            if env.kind == "error" and env.dev == dev:  # an agent answering a refused command
                self._answered(message.topic, env.body)
            elif env.dev == dev and env.round == 1 and env.seq < SEQ_BASE and env.kind in ("features", "logit_grad"):
                with self.lock:
                    self.captured.setdefault((dev, env.kind), (message.payload, env))
                    if env.kind == "features":
                        self.progress[dev] = max(self.progress[dev], env.step)

    def _read_errs(self) -> None:
        while not self.stop.is_set():
            try:
                message = self.errs.get(timeout=0.2)
            except TimeoutError:
                continue
            self._answered(message.topic, decode(message.payload).body)

    def _answered(self, topic: str, report: Any) -> None:
        key = (topic, report.ref_seq)
        with self.lock:
            if self.got[key] < self.expected[key]:
                self.got[key] += 1
                self.codes[report.code] += 1

    def answered_fast(self) -> int:
        """Answers on ``err`` topics: sessions and the registry answer at once (an agent answers a
        command on its ``up`` only when it next looks at ``cmd``: between steps, or once idle)."""
        with self.lock:
            return sum(n for (topic, _), n in self.got.items() if topic.endswith("/err"))

    def unanswered(self) -> int:
        with self.lock:
            return sum(max(0, n - self.got[k]) for k, n in self.expected.items())

    # -- generation ----------------------------------------------------------------------
    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _send(self, topic: str, payload: bytes, answer_topic: str, ref_seq: int | None, category: str) -> None:
        with self.lock:
            self.expected[(answer_topic, ref_seq)] += 1
            self.categories[category] += 1
            self.sent += 1
            self.sent_fast += answer_topic.endswith("/err")
        self.client.publish_raw(topic, payload, wait=False)

    def _features(self, dev: str) -> tuple[bytes, Any]:
        return self.captured[(dev, "features")]

    def _up_payload(self, dev: str) -> tuple[bytes, int | None, str]:
        rng, category = self.rng, self.rng.choice(UP_CATEGORIES)
        raw, env = self._features(dev)
        other = rng.choice([d for d in DEVICES if d != dev])
        seq = self._next_seq()

        def forged(body: Any = None, **header: Any) -> bytes:
            fields = {"dev": dev, "seq": seq, "round": 1, **header}
            return encode(make_envelope(env.body if body is None else body, **fields), allow_nonfinite=True)

        if category == "bytes":
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400))), None, category
        if category == "truncated":
            return raw[:rng.randint(1, len(raw) - 1)], None, category
        if category == "foreign_dev":
            return forged(dataclasses.replace(env.body, step=rng.randrange(self.steps)), dev=other), seq, category
        if category == "unknown_device":
            return forged(dev=f"ghost-{rng.randrange(100)}"), seq, category
        if category == "stale_round":
            return forged(round=rng.choice([0, 2, 3, 1000])), seq, category
        if category == "wrong_step":
            return forged(dataclasses.replace(env.body, step=self.steps + rng.randrange(1000))), seq, category
        if category == "replay":
            kind = rng.choice(["features", "logit_grad"])
            payload, captured = self.captured.get((dev, kind), (raw, env))
            return payload, captured.seq, category
        if category == "nan":
            features = env.body.features.clone()
            features.view(-1)[rng.randrange(features.numel())] = float("nan")
            return forged(dataclasses.replace(env.body, features=features)), seq, category
        if category == "bad_header":
            doc = msgpack.unpackb(raw, raw=False, strict_map_key=True)
            key = rng.choice(["v", "kind", "extra", "round"])
            doc = {**doc, "seq": seq, **({"v": 2} if key == "v" else {"kind": "nope"} if key == "kind"
                                        else {"extra": 1} if key == "extra" else {"round": -1})}
            return msgpack.packb(doc, use_bin_type=True), None, category
        if category == "wrong_channel":
            return forged(Stop(reason="fuzz")), seq, category
        if category == "forged_report":
            return forged(EvalReport(rhos=[0.0], accuracy=[1.0], tau=[0.5], offload_probability=[0.0],
                                     accuracy_fixed_tau=[1.0], offload_probability_fixed_tau=[0.0], fixed_tau=0.5,
                                     samples=1)), seq, category
        return forged(InferRequest(depth=2, features=torch.zeros(2, 4, dtype=torch.float16))), seq, "forged_infer"

    def _cmd_payload(self, dev: str) -> tuple[bytes, int | None, str]:
        rng, category = self.rng, self.rng.choice(CMD_CATEGORIES)
        seq = self._next_seq()
        other = rng.choice([d for d in DEVICES if d != dev])
        if category == "bytes":
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))), None, category
        if category == "foreign_command":
            body = rng.choice([Stop(reason="fuzz"), RoundStart(round=1, steps=1, client_model_sha256="0" * 64)])
            return encode(make_envelope(body, dev=other, seq=seq, round=1)), seq, category
        return encode(make_envelope(self._features(dev)[1].body, dev=dev, seq=seq, round=1)), seq, category

    def _hello_payload(self, dev: str) -> tuple[str, bytes, int | None, str]:
        rng, category = self.rng, self.rng.choice(HELLO_CATEGORIES)
        seq = self._next_seq()
        from broker.schemas import Hello

        hello = Hello(agent_version="0.0.0", cores=1, freq_mhz=1.0, memory_bytes=1, load=0.0, gflops=1.0, rtt_ms=1.0,
                      uplink_bps=1.0)
        if category == "bytes":
            return dev, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))), None, category
        if category == "foreign_hello":
            other = rng.choice([d for d in DEVICES if d != dev])
            return dev, encode(make_envelope(hello, dev=other, seq=seq)), seq, category
        ghost = f"ghost-{rng.randrange(100)}"
        return ghost, encode(make_envelope(hello, dev=ghost, seq=seq)), seq, category

    def run(self) -> None:
        """Send the payloads while the round's sessions run (called in its own thread)."""
        r, rnd = self.r, 1
        while not self.stop.is_set():  # every session subscribed and every device's features seen
            with self.lock:
                seen = all((d, "features") in self.captured for d in DEVICES)
            if seen and len(r.hkeys(state.ready_key(rnd))) == len(DEVICES):
                break
            time.sleep(0.02)
        while not self.stop.is_set() and self.sent < self.target:
            if self.sent_fast - self.answered_fast() >= self.window:
                time.sleep(0.002)
                continue
            with self.lock:
                live = [d for d in DEVICES if self.progress[d] < self.steps - MARGIN_STEPS]
            if not live:
                print(f"every session near its end after {self.sent} payloads", file=sys.stderr)
                break
            dev = self.rng.choice(live)
            where = self.rng.random()
            if where < 0.8:
                payload, ref, category = self._up_payload(dev)
                self._send(self.topics.up(dev), payload, self.topics.err(dev), ref, f"up:{category}")
            elif where < 0.9:
                payload, ref, category = self._cmd_payload(dev)
                self._send(self.topics.cmd(dev), payload, self.topics.up(dev), ref, f"cmd:{category}")
            else:
                target, payload, ref, category = self._hello_payload(dev)
                self._send(self.topics.hello(target), payload, self.topics.err(target), ref, f"hello:{category}")

    def close(self) -> None:
        self.stop.set()
        for t in self.readers:
            t.join(2)
        self.client.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--payloads", type=int, default=10_000)
    ap.add_argument("--slowdown", type=float, default=250.0, help="agent --slowdown: how long the sessions last")
    ap.add_argument("--window", type=int, default=100, help="most payloads unanswered at a time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="100 payloads, 12 local steps, --slowdown 30 (the "
                    "suite's size)")
    args = ap.parse_args(argv)
    raw = CONFIG
    if args.smoke:
        args.payloads, args.slowdown = 100, 30.0
        raw = {**CONFIG, "train": {**CONFIG["train"], "local_steps": 12}}
    logging.basicConfig(level=logging.ERROR)
    cfg = validate_config(raw)
    t0 = time.perf_counter()
    local = LocalEngine(cfg)
    expected = local.run()
    run_dir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    stack = LocalStack(run_dir / "stack")
    info = stack.start(agents=0, registry=False, worker_concurrency=len(DEVICES), auth=False)
    crashes, got, failure = 0, None, None
    try:
        stack.add_agent(DEVICES, ["--slowdown", str(args.slowdown)])
        r = state.connect(info.redis_url)
        first_event = (r.xrevrange(state.events_key(), count=1) or [(b"0-0", {})])[0][0]
        engine = DistributedEngine(cfg, run_dir / "out", mqtt=info.mqtt, redis_url=info.redis_url,
                                   devices_timeout_s=120, round_timeout_s=900, known_devices=set(DEVICES))
        fuzzer = Fuzzer(info.mqtt, r, args.payloads, args.seed, args.window, engine.experiment.steps(0))
        sender = threading.Thread(target=fuzzer.run, daemon=True)
        sender.start()
        fuzz_t0 = time.perf_counter()
        try:
            got = engine.run()
        except Exception as err:  # noqa: BLE001 — counted as a crash, reported below
            failure = f"{type(err).__name__}: {err}"
            crashes += 1
        finally:
            engine.close()
        sender.join(30)
        deadline = time.monotonic() + 30
        while fuzzer.unanswered() and time.monotonic() < deadline:
            time.sleep(0.1)
        fuzz_s = time.perf_counter() - fuzz_t0
        fuzzer.close()
        crashes += sum(1 for name, pid in info.pids.items() if not _alive(pid))
        events = [f[b"name"].decode() for _, f in r.xrange(state.events_key(), min=f"({first_event.decode()}")]
        crashes += sum(1 for e in events if e in ("session_failed", "session_dropped", "round_failed"))
    finally:
        stack.stop()
    same = got is not None and all(torch.equal(local.model_state()[s][k], _model(got, s, k, engine))
                                   for s in ("client", "server") for k in local.model_state()[s])
    same = same and got["evaluation"]["accuracy"] == expected["evaluation"]["accuracy"] and \
        got["evaluation"]["accuracy_fixed_tau"] == expected["evaluation"]["accuracy_fixed_tau"]
    result = {"bench": "fuzz", "payloads": fuzzer.sent, "crashes": crashes, "state_changes": 0 if same else 1,
              "unanswered": fuzzer.unanswered(), "codes": dict(sorted(fuzzer.codes.items())),
              "categories": dict(sorted(fuzzer.categories.items())), "fuzz_seconds": round(fuzz_s, 1),
              "wall_seconds": round(time.perf_counter() - t0, 1), "slowdown": args.slowdown, "seed": args.seed}
    if failure is not None:
        result["failure"] = failure[:500]
    print(json.dumps(result))
    return result


def _model(got: dict[str, Any], side: str, key: str, engine: DistributedEngine) -> torch.Tensor:
    return engine.model_state()[side][key]


def _alive(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


if __name__ == "__main__":
    main()
