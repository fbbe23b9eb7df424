"""Cost of the distributed runtime against the local engine, for the same config on one machine.

- ``wall_ratio``: wall time of one training round over the distributed runtime (mosquitto,
  redis-server, one Celery worker with 2 session threads, the devices in one agent process, all on
  this machine's loopback) divided by the same round in the local engine (after a warm-up round in
  each, so data loading and the agents' set-up are not counted).
- ``bytes_ratio``: MQTT payload bytes of the step messages (``features``, ``logits``, ``logit_grad``,
  ``feature_grad`` — msgpack envelopes included, MQTT/TCP headers not) divided by the analytic
  payload of the same messages: the raw bytes of their tensors (fp16 features and feature gradients,
  fp32 logits and logit gradients, HARMONY's uint8 indicators and int64 negative pairs).
  Also printed per step. Weights (blobs) are not step traffic and are not counted.

    python benchmarks/distributed_overhead.py            # 8 clients, full-width cnn8 (a few minutes)
    python benchmarks/distributed_overhead.py --smoke    # tiny; what the test suite runs

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
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
from testbed.stack import LocalStack  # noqa: E402

STEP_KINDS = ("features", "logits", "logit_grad", "feature_grad")


def config(smoke: bool, algorithm: str) -> dict:
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
        "fleet": {"num_clients": 8, "split_depths": [2, 3, 4]},
        "train": {"algorithm": algorithm, "rounds": 2, "batch_size": 64, "local_steps": 10},
        "eval": {"measure_latency_samples": 0},
    }


def tensor_bytes(body: object) -> int:
    return sum(v.numel() * v.element_size() for v in vars(body).values() if isinstance(v, torch.Tensor))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--algorithm", default="splitgp")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = validate_config(config(args.smoke, args.algorithm))

    local = LocalEngine(cfg)
    local.run_round(1)  # warm-up
    t0 = time.perf_counter()
    local.run_round(2)
    local_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="hsfl-bench-") as tmp:
        stack = LocalStack(tmp)
        info = stack.start(agents=1, devices_per_agent=cfg.fleet.num_clients, registry=False)
        try:
            engine = DistributedEngine(cfg, mqtt=info.mqtt, redis_url=info.redis_url)
            monitor = BrokerClient(f"bench-{uuid.uuid4().hex[:6]}", *info.mqtt, clean_start=True)
            monitor.connect()
            subs = [monitor.subscribe(monitor.topics.all_devices(c)) for c in ("up", "down")]
            try:
                engine.run_round(1)  # warm-up: agents and worker build the experiment
                for sub in subs:
                    while sub.get_nowait() is not None:
                        pass
                t0 = time.perf_counter()
                engine.run_round(2)
                dist_s = time.perf_counter() - t0
                time.sleep(0.2)
                wire = analytic = steps = 0
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
    result = {
        "bench": "distributed_overhead", "algorithm": args.algorithm, "clients": cfg.fleet.num_clients,
        "local_round_s": round(local_s, 4), "distributed_round_s": round(dist_s, 4),
        "wall_ratio": round(dist_s / local_s, 3),
        "steps": steps, "wire_bytes_per_step": round(wire / max(steps, 1), 1),
        "analytic_bytes_per_step": round(analytic / max(steps, 1), 1),
        "bytes_ratio": round(wire / max(analytic, 1), 4),
    }
    print(f"local round {local_s:.3f} s, distributed round {dist_s:.3f} s; "
          f"{result['wire_bytes_per_step']:.0f} B/step on the wire vs {result['analytic_bytes_per_step']:.0f} analytic")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
