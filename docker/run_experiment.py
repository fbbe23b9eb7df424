"""Run one experiment over an already running fleet, e.g. the compose stack of docker/compose.yaml.

``harmony run CONFIG --runtime distributed`` can only drive a stack that ``harmony up`` started on
this host (it finds it through ``--stack DIR/stack.json`` and its process ids); it has no option to
point at a broker and Redis elsewhere. This script does exactly what that command does with such a
stack (``orchestrator.engine.DistributedEngine`` over the given MQTT broker and Redis) and writes
the same ``OUT/results.json``, ``rounds.csv`` and ``evaluation.csv``::

    python run_experiment.py CONFIG [--set KEY=VALUE ...] [--out DIR] [--resume]
        [--broker HOST:PORT] [--redis URL] [--topic-prefix P] [--devices-timeout S] [--round-timeout S]

``--broker``/``--redis`` default to ``HSFL_MQTT``/``HSFL_REDIS_URL``, the variables the Celery
workers read (server/app.py, server/tasks.py), so inside the compose network no option is needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="run_experiment", description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="experiment config (YAML)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("/runs/latest"), help="output directory")
    ap.add_argument("--resume", action="store_true", help="resume the run recorded in Redis")
    ap.add_argument("--broker", default=os.environ.get("HSFL_MQTT", "mosquitto:1883"), help="MQTT HOST:PORT")
    ap.add_argument("--redis", default=os.environ.get("HSFL_REDIS_URL", "redis://redis:6379/0"), help="Redis URL")
    ap.add_argument("--topic-prefix", default=os.environ.get("HSFL_TOPIC_PREFIX", "hsfl/v1"))
    ap.add_argument("--devices-timeout", type=float, default=300.0,
                    help="seconds to wait for fleet.num_clients devices to be online")
    ap.add_argument("--round-timeout", type=float, default=900.0, help="deadline of one round, seconds")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host, sep, port = args.broker.rpartition(":")
    if not sep or not port.isdigit():
        print(f"error: --broker: expected HOST:PORT, got {args.broker!r}", file=sys.stderr)
        return 2

    from broker.topics import Topics
    from harmony.config import ConfigError, load_config
    from orchestrator.engine import DistributedEngine
    from testbed.cli import RoundProgress

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with RoundProgress() as progress:
            engine = DistributedEngine(cfg, args.out, progress, mqtt=(host or "127.0.0.1", int(port)),
                                       redis_url=args.redis, topics=Topics(args.topic_prefix),
                                       devices_timeout_s=args.devices_timeout, round_timeout_s=args.round_timeout)
            try:
                results = engine.run(resume=args.resume)
            finally:
                engine.close()
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:  # what `harmony run` reports too
        print(f"error: {err}", file=sys.stderr)
        return 2
    ev = results["evaluation"]
    print(f"{results['algorithm']} on {cfg.data.dataset} (seed {cfg.seed}) over devices {results['devices']}")
    for rho, acc, ms in zip(ev["rho"], ev["accuracy"], ev["latency_ms"], strict=True):
        print(f"  rho={rho:g}  accuracy {acc:.2f} %  modelled latency {ms:.2f} ms")
    print(f"results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
