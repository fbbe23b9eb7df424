"""Cost of the distributed runtime against the local engine, for the same config on one machine.

- ``wall_ratio``: wall time of a training round over the distributed runtime (mosquitto,
  redis-server, one Celery worker with one session thread per client, the devices in one agent
  process, all on this machine's loopback) divided by the same round in the local engine; after a
  warm-up round in each (data loading and the agents' set-up are not counted), ``--repeats``
  rounds are timed, local and distributed in turn, and the median of the per-round ratios is
  reported. The local engine runs its steps one after another with torch's intra-op threads (one
  per core); the stack's processes run one torch thread each (``--stack-threads``) and fill the
  cores with sessions instead — every client's session at once, as ``harmony up`` sets the worker
  (``--concurrency``). With two session threads the round ran in waves whose set-up and
  ping-pong left cores idle (RESULTS §4 has both).
- ``bytes_ratio``: MQTT payload bytes of the step messages (``features``, ``logits``,
  ``logit_grad``, ``feature_grad`` — msgpack envelopes included, MQTT/TCP headers not) divided by
  the analytic payload of the same messages: the raw bytes of their tensors (fp16 features and
  feature gradients, fp32 logits and logit gradients, HARMONY's uint8 indicators and int64
  negative pairs). Also printed per step. Weights (blobs) are not step traffic and are not
  counted. Measured in one more round after the timed ones, with a monitoring client subscribed
  to every step message (a subscriber receiving ~2 MB per step would load the timed rounds).
- ``split_s``: where the timed rounds' session time went, summed over sessions: the server's
  compute / waiting / sending / upload-and-store (``session_done`` events) and the devices'
  compute / waiting / sending (the agent's per-round log lines), and the orchestrator's phases
  (publish / sessions / aggregate / load, the ``round_done`` events). With more sessions than cores
  a session's "compute" includes the time its thread waited for a core.

    python benchmarks/distributed_overhead.py            # 8 clients, full-width cnn8 (a few minutes)
    python benchmarks/distributed_overhead.py --clients 50   # 50 devices in every round
    python benchmarks/distributed_overhead.py --smoke    # tiny; what the test suite runs
    python benchmarks/distributed_overhead.py --tls      # the stack of `harmony up --tls` (docs/security.md)

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.client import BrokerClient  # noqa: E402
from harmony.config import validate_config  # noqa: E402
from harmony.engine import LocalEngine  # noqa: E402
from orchestrator.engine import DistributedEngine  # noqa: E402
from server import state  # noqa: E402
from testbed.stack import LocalStack  # noqa: E402

STEP_KINDS = ("features", "logits", "logit_grad", "feature_grad")


def config(smoke: bool, algorithm: str, clients: int = 8) -> dict:
    if smoke:
        return {
            "name": "overhead-smoke", "seed": 1,
            "data": {"num_shards": 8, "train_fraction": 0.02, "test_per_client": 20, "rhos": [0.0]},
            "model": {"family": "cnn8", "width": 0.25},
            "fleet": {"num_clients": 4, "split_depths": [2, 3, 4, 2]},
            "train": {"algorithm": algorithm, "rounds": 2, "batch_size": 16, "local_steps": 2},
            "eval": {"measure_latency_samples": 0},
        }
    return {
        "name": "overhead", "seed": 1,
        "data": {"train_fraction": 0.1, "test_per_client": 50, "rhos": [0.0]},
        "model": {"family": "cnn8", "width": 1.0},
        "fleet": {"num_clients": clients, "split_depths": [2, 3, 4]},
        "train": {"algorithm": algorithm, "rounds": 2, "batch_size": 64, "local_steps": 10},
        "eval": {"measure_latency_samples": 0},
    }


AGENT_SPLIT = re.compile(r"device (\S+) round (\d+): \d+ steps in ([\d.]+) s \(device compute ([\d.]+), "
                         r"waiting for the server ([\d.]+), sending ([\d.]+)\)")


def event_split(redis_url: str, event: str, rounds: set[int], keys: tuple[str, ...] = ()) -> dict[str, float]:
    """Seconds per phase summed over the ``event`` events of ``rounds`` in the ``hsfl:events``
    stream: ``session_done`` (server compute / waiting / sending / upload and store, per session)
    or ``round_done`` (the orchestrator's publish / sessions / aggregate / load, per round).
    ``keys`` are reported even when no event carries them."""
    total = dict.fromkeys(keys, 0.0)
    r = state.connect(redis_url)
    for _, fields in r.xrange(state.events_key()):
        if fields.get(b"name") == event.encode() and json.loads(fields[b"round"]) in rounds:
            for k, v in json.loads(fields[b"split"]).items():
                total[k] = total.get(k, 0.0) + v
    return {k: round(v, 2) for k, v in total.items()}


def device_split(log_path: Path, rounds: set[int]) -> dict[str, float]:
    """Seconds summed over the devices' sessions of ``rounds``: device compute / waiting / sending
    (the agent's per-round INFO lines)."""
    total = {"session": 0.0, "compute": 0.0, "wait": 0.0, "send": 0.0}
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    for m in AGENT_SPLIT.finditer(text):
        if int(m.group(2)) in rounds:
            for k, v in zip(total, m.groups()[2:], strict=True):
                total[k] += float(v)
    return {k: round(v, 2) for k, v in total.items()}


def tensor_bytes(body: object) -> int:
    return sum(v.numel() * v.element_size() for v in vars(body).values() if isinstance(v, torch.Tensor))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--algorithm", default="splitgp")
    ap.add_argument("--clients", type=int, default=8,
                    help="emulated devices, all in one agent process, all in every round (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per runtime, interleaved (default 3)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="session threads of the Celery worker (default: one per client, as `harmony up` sets it)")
    ap.add_argument("--tls", action="store_true",
                    help="the stack of `harmony up --tls`: TLS, passwords, client certificates, Redis ACL")
    ap.add_argument("--stack-threads", type=int, default=1,
                    help="torch threads of the worker and agent processes (default 1; 0: torch's, one per core)")
    args = ap.parse_args()
    if args.clients < 1:
        ap.error(f"--clients must be at least 1, got {args.clients}")
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.concurrency is not None and args.concurrency < 1:
        ap.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.stack_threads < 0:
        ap.error(f"--stack-threads must be 0 (torch's default) or more, got {args.stack_threads}")
    logging.basicConfig(level=logging.WARNING)
    raw = config(args.smoke, args.algorithm, args.clients)
    raw["train"]["rounds"] = 2 + args.repeats  # warm-up, timed rounds, the bytes round
    cfg = validate_config(raw)

    local = LocalEngine(cfg)
    local_s: list[float] = []
    dist_s: list[float] = []
    wire = analytic = steps = 0
    with tempfile.TemporaryDirectory(prefix="hsfl-bench-") as tmp:
        stack = LocalStack(tmp)
        info = stack.start(agents=1, devices_per_agent=cfg.fleet.num_clients, registry=False,
                           worker_concurrency=args.concurrency, torch_threads=args.stack_threads or None,
                           tls=args.tls)
        try:
            user, password = info.orchestrator_login()
            login = {"username": user, "password": password, "tls": info.service_tls("orchestrator")}
            engine = DistributedEngine(cfg, mqtt=info.service_mqtt, redis_url=info.redis_url, **login)
            monitor = BrokerClient(f"bench-{uuid.uuid4().hex[:6]}", *info.service_mqtt, clean_start=True, **login)
            monitor.connect()
            try:
                local.run_round(1)  # warm-up: the agents and the worker build the experiment
                engine.run_round(1)
                for rnd in range(2, 2 + args.repeats):  # interleaved, so background load hits both alike
                    t0 = time.perf_counter()
                    local.run_round(rnd)
                    local_s.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    engine.run_round(rnd)
                    dist_s.append(time.perf_counter() - t0)
                timed = set(range(2, 2 + args.repeats))
                split = {"round": event_split(info.redis_url, "round_done", timed),
                         "server": event_split(info.redis_url, "session_done", timed,
                                               ("compute", "wait", "send", "upload_store")),
                         "device": device_split(Path(tmp) / "agent-0.log", timed)}
                # bytes: one more (untimed) round with the monitor subscribed to every step message —
                # receiving ~2 MB per step in a Python client costs CPU the timed rounds must not share
                subs = [monitor.subscribe(monitor.topics.all_devices(c)) for c in ("up", "down")]
                engine.run_round(2 + args.repeats)
                time.sleep(0.2)
                for sub in subs:
                    while (message := sub.get_nowait()) is not None:
                        env = message.decode()
                        if env.kind in STEP_KINDS:
                            wire += len(message.payload)
                            analytic += tensor_bytes(env.body)
                            steps += env.kind == "features"
            finally:
                monitor.close()
                engine.close()
        finally:
            stack.stop()
    ratios = sorted(d / lo for d, lo in zip(dist_s, local_s, strict=True))
    result = {
        "bench": "distributed_overhead", "algorithm": args.algorithm, "clients": cfg.fleet.num_clients,
        "tls": args.tls,
        "local_threads": torch.get_num_threads(), "stack_threads": args.stack_threads or None,
        "concurrency": args.concurrency or max(2, cfg.fleet.num_clients),
        "repeats": args.repeats,
        "local_round_s": [round(t, 3) for t in local_s], "distributed_round_s": [round(t, 3) for t in dist_s],
        "wall_ratio": round(ratios[len(ratios) // 2], 3),  # the median of the per-round ratios
        "steps": steps, "wire_bytes_per_step": round(wire / max(steps, 1), 1),
        "analytic_bytes_per_step": round(analytic / max(steps, 1), 1),
        "bytes_ratio": round(wire / max(analytic, 1), 4),
        "split_s": split,  # summed over the timed rounds' sessions (see event_split / device_split)
    }
    print(f"per round, local {result['local_round_s']} s, distributed {result['distributed_round_s']} s "
          f"(ratios {[round(x, 3) for x in ratios]}); {result['wire_bytes_per_step']:.0f} B/step on the wire "
          f"vs {result['analytic_bytes_per_step']:.0f} analytic")
    srv, dev = split["server"], split["device"]
    print(f"timed rounds, summed over sessions: server compute {srv['compute']} s, waiting {srv['wait']} s, "
          f"sending {srv['send']} s, upload+store {srv['upload_store']} s; device compute {dev['compute']} s, "
          f"waiting {dev['wait']} s, sending {dev['send']} s; local rounds {round(sum(local_s), 2)} s")
    print(f"orchestrator phases, summed over the timed rounds: {split['round']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
