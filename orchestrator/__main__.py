"""``python -m orchestrator --broker HOST:PORT [--redis URL] [--credentials FILE] [--cafile CA.crt
[--certfile C --keyfile K]] [--devices-from STORE]``: keep the device registry in Redis (with
``STORE``, a credential store, only of its devices). ``FILE`` holds the orchestrator's broker login
as one ``user:password`` line; ``--cafile`` turns TLS on (the broker's service listener
also asks for the ``orchestrator`` client certificate, docs/security.md). Without ``--redis`` the
URL comes from ``HSFL_REDIS_URL``, so that a Redis password need not show on the command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
import uuid
from pathlib import Path

from broker.client import BrokerClient, read_login, tls_settings
from broker.topics import Topics
from orchestrator.registry import Registry, StoreDevices
from server import state


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="orchestrator")
    ap.add_argument("--broker", required=True)
    ap.add_argument("--redis", default=os.environ.get("HSFL_REDIS_URL"),
                    help="Redis URL, redis://[USER:PASSWORD@]HOST:PORT/DB (default: $HSFL_REDIS_URL)")
    ap.add_argument("--topic-prefix", default="hsfl/v1")
    ap.add_argument("--credentials", type=Path, default=None, help="file with the broker login as user:password")
    ap.add_argument("--cafile", type=Path, default=None, help="CA certificate of the broker: turns TLS on")
    ap.add_argument("--certfile", type=Path, default=None, help="the orchestrator's client certificate")
    ap.add_argument("--keyfile", type=Path, default=None, help="its key")
    ap.add_argument("--devices-from", type=Path, default=None, help="a credential store (`harmony up`'s "
                    "RUN_DIR/credentials): admit only its devices, clear the retained messages of others")
    args = ap.parse_args(argv)
    # SIGINT stops it, also when its parent started it with SIGINT ignored (`harmony up` run in the
    # background of a script passes that on to the processes it starts): take the default handler back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not args.redis:
        ap.error("--redis URL (or HSFL_REDIS_URL) is required")
    try:
        tls = tls_settings(args.cafile, args.certfile, args.keyfile)
    except ValueError as err:
        ap.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.broker.rpartition(":")
    user = password = None
    if args.credentials is not None:
        user, password = read_login(args.credentials)
    client = BrokerClient(f"orchestrator-registry-{uuid.uuid4().hex[:6]}", host or "127.0.0.1", int(port),
                          username=user, password=password, tls=tls, topics=Topics(args.topic_prefix), clean_start=True,
                          session_expiry_s=0)
    client.connect()
    known = None if args.devices_from is None else StoreDevices(args.devices_from)
    registry = Registry(client, state.connect(args.redis), known=known)
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
