"""What TLS costs a connection: the time from ``BrokerClient.connect`` to its CONNACK, plaintext against
mutual TLS (the services' listener of ``harmony up --auth/--tls``: EC P-256 certificates from
``testbed.credentials``, the client's certificate checked against the services CA).

Every session task of a Celery worker opens one connection per device and round
(``server.tasks.connect_task_client``), so this is the per-session price of TLS; a device keeps
one connection for its life. One real mosquitto on loopback; connections are opened one after
another, ``--n`` of each kind, in ``--repeats`` interleaved batches; the medians and 90th
percentiles over all of them are reported.

    python benchmarks/tls_connect.py             # 40 connections per kind, 3 batches
    python benchmarks/tls_connect.py --smoke     # what the test suite runs

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.client import BrokerClient, TlsSettings  # noqa: E402
from broker.mosquitto import BrokerTls, MosquittoConfig, MosquittoProcess, ServiceListener, free_port  # noqa: E402
from testbed.credentials import CredentialStore  # noqa: E402


def connect_ms(port: int, store: CredentialStore, tls: TlsSettings | None, n: int, tag: str) -> list[float]:
    """Milliseconds from ``connect`` to CONNACK for ``n`` fresh clients, one after another."""
    out = []
    for k in range(n):
        client = BrokerClient(f"bench-{tag}-{k}", "127.0.0.1", port, username="server",
                              password=store.service_password("server"), tls=tls, clean_start=True, session_expiry_s=0)
        t0 = time.perf_counter()
        client.connect()
        out.append((time.perf_counter() - t0) * 1e3)
        client.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--n", type=int, default=40, help="connections per kind and batch (default 40)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved batches (default 3)")
    args = ap.parse_args()
    n, repeats = (3, 1) if args.smoke else (args.n, args.repeats)
    if n < 1 or repeats < 1:
        ap.error("--n and --repeats must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="hsfl-tls-") as tmp:
        store = CredentialStore(Path(tmp) / "credentials")
        cert, key = store.broker_certificate([])
        server_cert, server_key = store.service_certificate("server")
        passwd, acl = store.write_broker_files()
        service_port = free_port()
        # the plaintext listener without use_username_as_clientid: every connection is user `server`
        config = MosquittoConfig(port=0, password_file=passwd, acl_file=acl, service_listener=ServiceListener(
            service_port, BrokerTls(store.service_ca_file, cert, key, require_certificate=True)))
        broker = MosquittoProcess(Path(tmp) / "broker", config).start()
        tls = TlsSettings(store.ca_file, server_cert, server_key)
        plain: list[float] = []
        mutual: list[float] = []
        try:
            for r in range(repeats):
                plain += connect_ms(broker.port, store, None, n, f"plain{r}")
                mutual += connect_ms(service_port, store, tls, n, f"tls{r}")
        finally:
            broker.stop()

    def p90(values: list[float]) -> float:
        return sorted(values)[min(len(values) - 1, int(0.9 * len(values)))]

    plain_ms = {"median": round(statistics.median(plain), 2), "p90": round(p90(plain), 2)}
    mtls_ms = {"median": round(statistics.median(mutual), 2), "p90": round(p90(mutual), 2)}
    result = {"bench": "tls_connect", "connections": len(plain), "plain_ms": plain_ms, "mtls_ms": mtls_ms,
              "tls_extra_ms": round(mtls_ms["median"] - plain_ms["median"], 2)}
    print(f"connect to CONNACK over {len(plain)} connections each: plaintext median {plain_ms['median']} ms "
          f"(p90 {plain_ms['p90']}), mutual TLS median {mtls_ms['median']} ms (p90 {mtls_ms['p90']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
