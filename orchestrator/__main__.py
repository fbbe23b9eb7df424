"""``python -m orchestrator --broker HOST:PORT --redis URL``: keep the device registry in Redis."""

from __future__ import annotations

import argparse
import logging
import time
import uuid

from broker.client import BrokerClient
from broker.topics import Topics
from orchestrator.registry import Registry
from server import state


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="orchestrator")
    ap.add_argument("--broker", required=True)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--topic-prefix", default="hsfl/v1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.broker.rpartition(":")
    client = BrokerClient(f"orchestrator-registry-{uuid.uuid4().hex[:6]}", host or "127.0.0.1", int(port),
                          topics=Topics(args.topic_prefix), clean_start=True, session_expiry_s=0)
    client.connect()
    registry = Registry(client, state.connect(args.redis))
    try:
        while True:
            registry.poll(timeout=1.0)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


if __name__ == "__main__":
    main()
