"""The paho wrapper against a real mosquitto: QoS 1 round trip, TCP_NODELAY, last will, reconnect, sharing."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from broker_samples import sample_messages

from broker.blobs import BlobCache
from broker.client import BrokerClient
from broker.codec import make_envelope
from broker.mosquitto import MosquittoConfig, MosquittoProcess
from broker.schemas import STATUS_OFFLINE, STATUS_ONLINE
from broker.topics import DEFAULT_TOPICS as T
from harmony.algorithms.messages import FeaturesUp, LogitsDown

MakeClient = Callable[..., BrokerClient]


pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # live broker: fail fast rather than hang the suite

def features(step: int) -> FeaturesUp:
    return FeaturesUp(step=step, depth=2, features=torch.full((2, 3), float(step), dtype=torch.float16))


def test_features_round_trip_is_bit_exact(mosquitto: MosquittoProcess, make_client: MakeClient) -> None:
    server = make_client(mosquitto.port, "server")
    inbox = server.subscribe(T.all_devices("up"))
    device = make_client(mosquitto.port, "pi", device_id="pi")
    sent = sample_messages(torch.float16)["features"]
    result = device.send(T.up("pi"), sent, round=3)
    assert result.done() and result.reason_code is not None and result.reason_code < 0x80
    message = inbox.get(timeout=5)
    assert message.topic == T.up("pi") and message.qos == 1
    env = message.decode()
    assert (env.kind, env.dev, env.round, env.step) == ("features", "pi", 3, sent.step)
    for name in ("features", "view_features", "same_label", "negative_pairs"):
        a, b = getattr(sent, name), getattr(env.body, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes(), name
    assert env.body.view_depth == sent.view_depth


def test_tcp_nodelay_is_set_on_the_paho_socket(mosquitto: MosquittoProcess, make_client: MakeClient) -> None:
    client = make_client(mosquitto.port, "nodelay")
    sock = client.mqtt.socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_last_will_publishes_retained_offline(mosquitto: MosquittoProcess, make_client: MakeClient) -> None:
    device = make_client(mosquitto.port, "will", device_id="will-dev")
    watcher = make_client(mosquitto.port, "watcher")
    status = watcher.subscribe(T.status("will-dev"))
    assert status.wait_for("status", timeout=5).body.state == STATUS_ONLINE  # retained announcement
    paho = device.mqtt
    paho.loop_stop()  # the network thread stops without a DISCONNECT …
    sock = paho.socket()
    assert sock is not None
    sock.close()  # … and the TCP connection drops: the broker publishes the will
    offline = status.wait_for("status", timeout=5)
    assert offline.body.state == STATUS_OFFLINE and offline.dev == "will-dev"
    late = make_client(mosquitto.port, "late").subscribe(T.status("will-dev"))  # retained for late joiners
    assert late.wait_for("status", timeout=5).body.state == STATUS_OFFLINE
    device.close(timeout=0.2)


def test_close_announces_offline(mosquitto: MosquittoProcess, make_client: MakeClient) -> None:
    device = make_client(mosquitto.port, "bye", device_id="bye-dev")
    device.close()
    status = make_client(mosquitto.port, "w").subscribe(T.status("bye-dev"))
    env = status.wait_for("status", timeout=5)
    assert env.body.state == STATUS_OFFLINE and env.body.detail == "closed"


def test_shared_subscription_splits_the_load(mosquitto: MosquittoProcess, make_client: MakeClient) -> None:
    ingress = [make_client(mosquitto.port, f"ingress{i}").subscribe(T.shared_up("g")) for i in range(2)]
    device = make_client(mosquitto.port, "dev", device_id="d1")
    pending = [device.send(T.up("d1"), features(step), wait=False) for step in range(12)]
    for p in pending:
        p.wait(5)
    steps: list[list[int]] = [[], []]
    deadline = time.monotonic() + 5
    while sum(map(len, steps)) < 12 and time.monotonic() < deadline:
        for i, sub in enumerate(ingress):
            message = sub.get_nowait()
            if message is not None:
                steps[i].append(message.decode().body.step)
        time.sleep(0.005)
    assert sorted(steps[0] + steps[1]) == list(range(12))  # each message exactly once
    assert steps[0] and steps[1]  # and both ingress processes got some


def test_wait_for_keeps_non_matching_messages(mosquitto: MosquittoProcess, make_client: MakeClient) -> None:
    device = make_client(mosquitto.port, "agent", device_id="w1")
    down = device.subscribe(T.down("w1"))
    server = make_client(mosquitto.port, "server")
    server.publish_raw(T.down("w1"), b"\x93garbage")  # undecodable: logged and dropped by wait_for
    for step in range(3):
        server.send(T.down("w1"), LogitsDown(step=step, logits=torch.randn(2, 4)))
    assert device.wait_for("logits", lambda e: e.step == 2, timeout=5).body.step == 2
    assert [down.wait_for("logits", timeout=5).step for _ in range(2)] == [0, 1]
    with pytest.raises(TimeoutError):
        device.wait_for("logits", timeout=0.05)


def test_persistent_session_keeps_messages_while_away(mosquitto: MosquittoProcess, make_client: MakeClient) -> None:
    first = make_client(mosquitto.port, client_id="persist-agent", device_id="p1")
    first.subscribe(T.cmd("p1"))
    first.close()  # session kept (expiry 1 h)
    server = make_client(mosquitto.port, "orchestrator")
    server.send(T.cmd("p1"), sample_messages()["stop"])
    again = make_client(mosquitto.port, client_id="persist-agent", device_id="p1")
    cmd = again.subscribe(T.cmd("p1"))
    assert cmd.wait_for("stop", timeout=5).body.reason == "done"


def test_messages_queued_while_away_wait_for_the_resubscription(mosquitto: MosquittoProcess,
                                                                make_client: MakeClient) -> None:
    """The broker hands a persistent session's queued messages over right after CONNACK, before the
    returning client has subscribed again: they must wait for that subscription, not be dropped."""
    first = make_client(mosquitto.port, client_id="persist-late", device_id="p2")
    first.subscribe(T.cmd("p2"))
    first.close()
    server = make_client(mosquitto.port, "orchestrator")
    server.send(T.cmd("p2"), sample_messages()["stop"])
    again = make_client(mosquitto.port, client_id="persist-late", device_id="p2")
    time.sleep(0.5)  # the queued message has arrived by now, with no subscription to take it
    other = again.subscribe(T.down("p2"))  # a subscription that does not match leaves it waiting
    cmd = again.subscribe(T.cmd("p2"))
    assert cmd.wait_for("stop", timeout=5).body.reason == "done"
    assert len(other) == 0


def test_reconnects_after_broker_restart(tmp_path: Path, make_client: MakeClient) -> None:
    process = MosquittoProcess(tmp_path, MosquittoConfig(port=0, persistence=True, persistence_dir=tmp_path / "db"))
    process.start()
    try:
        server = make_client(process.port, "server")
        inbox = server.subscribe(T.all_devices("up"))
        device = make_client(process.port, "agent", device_id="r1")
        device.send(T.up("r1"), features(0))
        assert inbox.wait_for("features", timeout=5).step == 0
        process.restart()
        device.send(T.up("r1"), features(1), timeout=10)  # queued until the automatic reconnect, then acked
        assert inbox.wait_for("features", timeout=10).step == 1
        assert device.connect_count >= 2 and server.connect_count >= 2
    finally:
        process.stop()


def test_blob_transfer_through_the_broker(mosquitto: MosquittoProcess, make_client: MakeClient,
                                          tmp_path: Path) -> None:
    data = os.urandom(9 * 1024 * 1024)  # two chunks
    server = make_client(mosquitto.port, "server")
    sha = server.publish_blob(data)
    agent = make_client(mosquitto.port, "agent")
    cache = BlobCache(tmp_path / "cache")
    assert cache.needs_fetch(sha)
    assert agent.fetch_blob(sha, timeout=10, cache=cache) == data
    assert not cache.needs_fetch(sha) and agent.fetch_blob(sha, cache=cache) == data
    server.clear_blob(sha, 2)


def test_publish_message_validates_before_sending(mosquitto: MosquittoProcess, make_client: MakeClient) -> None:
    from broker.errors import WireError

    client = make_client(mosquitto.port, "strict")
    bad = make_envelope(FeaturesUp(step=0, depth=2, features=torch.tensor([[1, 2]])), dev="x", seq=1)
    with pytest.raises(WireError, match="^body.features"):
        client.publish_message(T.up("x"), bad)
