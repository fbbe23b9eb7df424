"""Property tests (hypothesis) over the codec and the receivers' message handlers — the server
session's ``Inbox``, the agent's command screen, the registry's — fed arbitrary bytes, byte-flipped
valid messages and well-formed messages with arbitrary headers (foreign and unknown devices, other
rounds, steps and kinds, repeated seqs): nothing raises but a refusal, what is taken is exactly
what the receiver expects, every refusal is counted and answered, and a refusal records nothing
(the replay window is unchanged). A real Mosquitto receives the answers."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import pytest
from broker_samples import sample_messages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.blobs import BlobCache
from broker.client import BrokerClient, InboundMessage
from broker.codec import decode, encode, make_envelope
from broker.errors import WireError
from broker.inbound import REJECTION_CODES, Rejected, screen
from broker.schemas import FLEET_KINDS
from broker.topics import Topics
from edge_agent.agent import COMMAND_KINDS, Device, SharedRuntime
from orchestrator.registry import Registry
from server.tasks import SILENT_KINDS, Inbox

TOPICS = Topics()
SAMPLES = sample_messages()
KNOWN = frozenset({"emu-0", "emu-1"})
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _envelope_bytes(kind: str, dev: str, rnd: int, step: int, seq: int) -> bytes:
    body = SAMPLES[kind]
    if hasattr(body, "step"):
        body = dataclasses.replace(body, step=step)
    if kind == "round_start":
        body = dataclasses.replace(body, round=rnd)
    if dev == "" and kind not in FLEET_KINDS:
        dev = "emu-0"
    return encode(make_envelope(body, dev=dev, seq=seq, round=rnd, step=step))


well_formed = st.builds(_envelope_bytes, st.sampled_from(sorted(SAMPLES)),
                        st.sampled_from(["emu-0", "emu-1", "ghost-3", ""]), st.integers(0, 4), st.integers(0, 3),
                        st.integers(0, 12))
flipped = st.builds(lambda data, i, b: data[:i % len(data)] + bytes([b]) + data[i % len(data) + 1:],
                    well_formed, st.integers(0, 10_000), st.integers(0, 255))
payloads = st.one_of(st.binary(min_size=1, max_size=300), well_formed, flipped)


@given(payload=payloads)
@settings(max_examples=500, deadline=None)
def test_decode_and_screen_raise_nothing_but_a_refusal(payload: bytes) -> None:
    try:
        decode(payload)
    except WireError:
        pass
    try:
        screen(TOPICS.up("emu-0"), payload, TOPICS, known=KNOWN)
    except Rejected as rejection:
        assert rejection.code in REJECTION_CODES and rejection.field


def _window_state(inbox: Inbox) -> dict[Any, Any]:
    return {k: (w.round, w.highest, frozenset(w.seen)) for k, w in inbox.dedup._windows.items()}


@pytest.fixture
def client(mosquitto) -> Any:
    c = BrokerClient(f"fuzz-{uuid.uuid4().hex[:6]}", mosquitto.host, mosquitto.port, clean_start=True,
                     session_expiry_s=0)
    c.connect(timeout=5)
    yield c
    c.close(timeout=2)


@pytest.mark.slow  # a live broker
def test_session_inbox_takes_only_what_it_expects(client) -> None:
    sub = client.subscribe(TOPICS.up("emu-0"))
    answers = client.subscribe(TOPICS.err("emu-0"))
    inbox = Inbox(client, sub, None, 3, KNOWN, "fuzz session")

    @given(payload=payloads, step=st.integers(0, 3), kind=st.sampled_from(["features", "logit_grad", "blob_chunk"]))
    @FUZZ
    def check(payload: bytes, step: int, kind: str) -> None:
        before, rejected = _window_state(inbox), inbox.rejected
        env = inbox.screen(InboundMessage(TOPICS.up("emu-0"), payload, 1, False), (kind,), step)
        if env is not None:
            assert (env.dev, env.round, env.kind) == ("emu-0", 3, kind)
            assert kind == "blob_chunk" or env.step == step
            assert inbox.rejected == rejected
        elif inbox.rejected == rejected:  # not refused: a silent kind, nothing else
            assert decode(payload).kind in SILENT_KINDS
        else:
            assert inbox.rejected == rejected + 1 and _window_state(inbox) == before

    check()
    deadline = time.monotonic() + 10
    while len(answers) < inbox.rejected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inbox.rejected > 0 and len(answers) == inbox.rejected, "a refusal was not answered"


@pytest.mark.slow  # a live broker
def test_agent_takes_only_its_own_commands(mosquitto) -> None:
    device = Device("emu-0", mosquitto.host, mosquitto.port, SharedRuntime(BlobCache(), ["emu-0"]), topics=TOPICS)
    device.client.connect(timeout=5)
    try:
        @given(payload=payloads)
        @FUZZ
        def check(payload: bytes) -> None:
            env = device._screen_command(InboundMessage(TOPICS.cmd("emu-0"), payload, 1, False))
            if env is not None:
                assert env.dev == "emu-0" and env.kind in COMMAND_KINDS

        check()
    finally:
        device.client.close(timeout=2)


@pytest.mark.slow  # a live broker
def test_registry_takes_only_announcements_of_known_devices(client) -> None:
    registry = Registry(client, None, expected_version="0.1.0", known=KNOWN)

    @given(payload=payloads, dev=st.sampled_from(["emu-0", "emu-1", "ghost-3"]), kind=st.sampled_from(["hello",
                                                                                                         "status"]))
    @FUZZ
    def check(payload: bytes, dev: str, kind: str) -> None:
        env = registry._screen(InboundMessage(TOPICS.device(dev, kind), payload, 1, False), kind)
        if env is not None:
            assert env.dev == dev and dev in KNOWN and env.kind == kind

    check()
