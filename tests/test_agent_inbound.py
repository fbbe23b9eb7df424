"""The agent screens its commands and replies (broker.inbound) wherever they arrive: a malformed or
foreign command that comes while a session waits more than 0.5 s for the server is dropped and
answered, and the session goes on with the server's reply (it used to abort the round); a reply
naming another device is not taken. A real Mosquitto on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from broker.blobs import BlobCache
from broker.client import BrokerClient
from broker.codec import decode, encode, make_envelope
from broker.mosquitto import MosquittoConfig, MosquittoProcess
from broker.schemas import Stop
from broker.topics import Topics
from edge_agent.agent import Device, SharedRuntime
from harmony.algorithms.messages import LogitsDown


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    process = MosquittoProcess(tmp_path_factory.mktemp("mosquitto"), MosquittoConfig(port=0)).start()
    yield process
    process.stop()


@pytest.mark.slow
@pytest.mark.parametrize("forged_reply", [False, True], ids=["commands", "commands-and-forged-reply"])
def test_malformed_command_while_waiting_for_the_server_is_dropped(broker, forged_reply):
    topics = Topics()
    device = Device("emu-0", broker.host, broker.port, SharedRuntime(BlobCache(), ["emu-0"]), topics=topics)
    server = BrokerClient("test-server", broker.host, broker.port, clean_start=True, session_expiry_s=0)
    device.client.connect(timeout=5)
    server.connect(timeout=5)
    try:
        device.cmd = device.client.subscribe(topics.cmd("emu-0"))
        device.down = device.client.subscribe(topics.down("emu-0"))
        device.err = device.client.subscribe(topics.err("emu-0"))
        answers = server.subscribe(topics.up("emu-0"))
        logits = torch.zeros(2, 10)

        def serve() -> None:
            server.publish_raw(topics.cmd("emu-0"), b"\x93not a command")  # garbage
            server.publish_message(topics.cmd("emu-0"), make_envelope(Stop(reason="forged"), dev="emu-1", seq=1))
            if forged_reply:  # a reply for another device on this device's down topic
                forged = make_envelope(LogitsDown(step=0, logits=logits + 1), dev="emu-1", seq=2, round=1)
                server.publish_raw(topics.down("emu-0"), encode(forged))
            time.sleep(1.2)  # the real reply after more than 0.5 s
            server.send(topics.down("emu-0"), LogitsDown(step=0, logits=logits), round=1)

        thread = threading.Thread(target=serve)
        thread.start()
        got = device._await_down("logits", 1, 0, time.monotonic() + 20)
        thread.join()
        assert got.dev == "emu-0" and torch.equal(got.body.logits, logits)
        codes = sorted(decode(answers.get(timeout=5).payload).body.code for _ in range(2))
        assert codes == ["bad_schema", "foreign_dev"]
        assert not device.stop_event.is_set()
    finally:
        server.close()
        device.client.close(timeout=2)
