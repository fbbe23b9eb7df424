"""A device's clock decides nothing: the registry keeps when it *received* a status (its own
clock), and a ``ts`` outside a bounded skew of the receiver's clock is refused — answered on the
device's ``err`` topic, recorded as a ``message_rejected`` event, not stored. A real Mosquitto and
redis-server on free loopback ports."""

from __future__ import annotations

import time

import pytest

from broker.codec import decode, encode, make_envelope
from broker.inbound import MAX_CLOCK_SKEW_S, Rejected, screen
from broker.schemas import Hello, Status
from broker.topics import Topics
from orchestrator.registry import Registry
from server import state
from tests.test_server_state import redis_client  # noqa: F401 (a fixture: redis-server on a free port)

TOPICS = Topics()
HELLO = Hello(agent_version="0.1.0", cores=1, freq_mhz=1.0, memory_bytes=1 << 30, load=0.0, gflops=1.0, rtt_ms=1.0,
              uplink_bps=0.0, started_at=1.0)


def _status(dev: str, ts: float, state_: str = "idle", seq: int = 1) -> bytes:
    return encode(make_envelope(Status(state=state_), dev=dev, seq=seq, ts=ts))


@pytest.mark.parametrize("ts", [4.1e9, 1.0, 1e300])
def test_a_timestamp_far_off_the_receivers_clock_is_refused(ts):
    now = time.time()
    with pytest.raises(Rejected) as refused:
        screen(TOPICS.status("emu-0"), _status("emu-0", ts), TOPICS, max_skew_s=MAX_CLOCK_SKEW_S, now=now)
    assert refused.value.code == "clock_skew" and refused.value.field == "ts"
    assert "set the device's clock" in str(refused.value)
    # a device does not bound it (its own clock may be the wrong one)
    assert screen(TOPICS.status("emu-0"), _status("emu-0", ts), TOPICS).ts == ts


def test_an_hour_off_is_accepted_and_a_retained_hello_may_be_old():
    now = time.time()
    for ts in (now - 3600, now + 3600):
        assert screen(TOPICS.status("emu-0"), _status("emu-0", ts), TOPICS, max_skew_s=MAX_CLOCK_SKEW_S, now=now)
    old = encode(make_envelope(HELLO, dev="emu-0", seq=1, ts=now - 60 * 86400))  # an agent up for two months
    assert screen(TOPICS.hello("emu-0"), old, TOPICS, max_skew_s=MAX_CLOCK_SKEW_S, retained=True, now=now)
    with pytest.raises(Rejected, match="clock"):
        screen(TOPICS.hello("emu-0"), old, TOPICS, max_skew_s=MAX_CLOCK_SKEW_S, now=now)


@pytest.mark.slow
def test_the_registry_records_its_own_clock_and_refuses_absurd_timestamps(mosquitto, make_client,
                                                                           redis_client):  # noqa: F811
    """A board an hour behind is recorded as seen when its status arrived; statuses at 4.1e9, 1.0
    and 1e300 are answered on its ``err`` topic and change nothing in Redis."""
    r = redis_client
    r.flushdb()
    service = make_client(mosquitto.port, "registry")
    device = make_client(mosquitto.port, "device")
    answers = device.subscribe(TOPICS.err("emu-7"))
    registry = Registry(service, r, expected_version="0.1.0")
    for seq, ts in enumerate((4.1e9, 1.0, 1e300), start=1):
        device.publish_raw(TOPICS.status("emu-7"), _status("emu-7", ts, seq=seq))
    deadline = time.monotonic() + 10
    codes = []
    while len(codes) < 3 and time.monotonic() < deadline:
        registry.poll(0.2)
        message = answers.get_nowait()
        if message is not None:
            codes.append(decode(message.payload).body.code)
    assert codes == ["clock_skew"] * 3
    assert r.hgetall(state.dev_key("emu-7")) == {} and "emu-7" not in registry.online
    rejected = [f for _, f in r.xrange(state.events_key()) if f[b"name"] == b"message_rejected"]
    assert len(rejected) == 3

    behind = time.time() - 3600  # no NTP yet
    sent = time.time()
    device.publish_raw(TOPICS.status("emu-7"), _status("emu-7", behind, seq=4))
    deadline = time.monotonic() + 10
    while "emu-7" not in registry.status_ts and time.monotonic() < deadline:
        registry.poll(0.2)
    assert registry.online["emu-7"] is True
    assert registry.status_ts["emu-7"] >= sent  # when it arrived here, not the board's ts
    assert float(r.hget(state.dev_key("emu-7"), "status_ts")) >= sent
    # a last will is written when its agent connects: one of an agent up for a month still counts
    device.publish_raw(TOPICS.status("emu-7"), _status("emu-7", time.time() - 30 * 86400, "offline", seq=5))
    deadline = time.monotonic() + 10
    while registry.online["emu-7"] and time.monotonic() < deadline:
        registry.poll(0.2)
    assert registry.online["emu-7"] is False


@pytest.mark.slow
def test_a_restarted_agent_is_ready_only_once_its_new_hello_arrived(mosquitto, make_client):
    """An agent announces ``online`` on connecting and its ``hello`` only after measuring itself;
    until then the hello the broker kept is its previous process's, and the device is not ready
    (a run does not command it before it can be assigned)."""
    service = make_client(mosquitto.port, "registry")
    device = make_client(mosquitto.port, "device")
    registry = Registry(service, None, expected_version="0.1.0")
    now = time.time()
    device.publish_raw(TOPICS.hello("emu-8"), encode(make_envelope(HELLO, dev="emu-8", seq=1, ts=now)), retain=True)
    device.publish_raw(TOPICS.status("emu-8"), _status("emu-8", now, "idle", seq=2), retain=True)

    def settle(check) -> None:
        deadline = time.monotonic() + 10
        while not check() and time.monotonic() < deadline:
            registry.poll(0.1)

    settle(lambda: registry.online.get("emu-8") is True)
    assert registry.ready("emu-8") and registry.available() == ["emu-8"]
    # the agent is killed (its last will) and a new one connects: online, no hello yet
    device.publish_raw(TOPICS.status("emu-8"), _status("emu-8", now, "offline", seq=3), retain=True)
    settle(lambda: registry.online.get("emu-8") is False)
    device.publish_raw(TOPICS.status("emu-8"), _status("emu-8", now, "online", seq=1), retain=True)
    settle(lambda: registry.online.get("emu-8") is True)
    registry.poll(0.3)
    assert not registry.ready("emu-8") and registry.available() == []
    restarted = encode(make_envelope(HELLO.__class__(**{**HELLO.__dict__, "started_at": 2.0}), dev="emu-8", seq=2,
                                     ts=now))
    device.publish_raw(TOPICS.hello("emu-8"), restarted, retain=True)
    settle(lambda: registry.started_at("emu-8") == 2.0)
    assert registry.ready("emu-8") and registry.available() == ["emu-8"]
