"""Topic builders and the topic parser."""

from __future__ import annotations

import pytest

from broker.errors import WireError
from broker.topics import DEFAULT_TOPICS, TopicRef, Topics, parse_topic, validate_device_id

SHA = "0f" * 32


def test_builders_use_the_default_prefix() -> None:
    t = DEFAULT_TOPICS
    assert t.hello("pi-01") == "hsfl/v1/dev/pi-01/hello"
    assert t.status("pi-01") == "hsfl/v1/dev/pi-01/status"
    assert t.cmd("pi-01") == "hsfl/v1/dev/pi-01/cmd"
    assert t.up("pi-01") == "hsfl/v1/dev/pi-01/up"
    assert t.down("pi-01") == "hsfl/v1/dev/pi-01/down"
    assert t.err("pi-01") == "hsfl/v1/dev/pi-01/err"
    assert t.events() == "hsfl/v1/events"
    assert t.blob(SHA) == f"hsfl/v1/blob/{SHA}"
    assert t.blob_chunk(SHA, 2) == f"hsfl/v1/blob/{SHA}/2"
    assert t.blob_filter(SHA) == f"hsfl/v1/blob/{SHA}/+"
    assert t.shared_up("ingress") == "$share/ingress/hsfl/v1/dev/+/up"
    assert t.all_devices("hello") == "hsfl/v1/dev/+/hello"


def test_custom_prefix_and_parse_round_trip() -> None:
    t = Topics("lab/run7")
    for channel in ("hello", "status", "cmd", "up", "down", "err"):
        topic = t.device("jetson_2", channel)
        assert topic == f"lab/run7/dev/jetson_2/{channel}"
        assert t.parse(topic) == TopicRef(channel, "jetson_2")
    assert t.parse(t.events()) == TopicRef("events", None)
    assert t.parse(t.blob_chunk(SHA, 11)) == TopicRef("blob", None, SHA, 11)
    assert parse_topic("hsfl/v1/dev/a/up") == ("up", "a", None, None)


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 65, "dev+", "#", "ünïcode", "a b", 7, None])
def test_device_ids_are_validated_naming_the_field(bad: object) -> None:
    with pytest.raises(WireError) as err:
        DEFAULT_TOPICS.up(bad)  # type: ignore[arg-type]
    assert err.value.field == "device_id"
    with pytest.raises(WireError, match="^dev: expected a device id"):
        validate_device_id(bad)


@pytest.mark.parametrize("topic", [
    "other/v1/dev/a/up", "hsfl/v1/dev/a/sideways", "hsfl/v1/dev/a b/up", "hsfl/v1/dev/a/up/extra",
    f"hsfl/v1/blob/{SHA}/x", f"hsfl/v1/blob/{SHA}/01", "hsfl/v1/blob/XYZ/0", "hsfl/v1/event", "hsfl/v1",
])
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(WireError) as err:
        DEFAULT_TOPICS.parse(topic)
    assert err.value.field == "topic"


@pytest.mark.parametrize("prefix", ["", "/hsfl", "hsfl/", "a//b", "hsfl/+", "hsfl/#", "$SYS"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(WireError, match="^prefix"):
        Topics(prefix)


def test_bad_share_group_and_chunk_index() -> None:
    with pytest.raises(WireError, match="^group"):
        DEFAULT_TOPICS.shared_up("a/b")
    with pytest.raises(WireError, match="^index"):
        DEFAULT_TOPICS.blob_chunk(SHA, -1)
    with pytest.raises(WireError, match="^sha256"):
        DEFAULT_TOPICS.blob("ABC")
