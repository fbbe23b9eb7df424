"""MQTT topic names of the distributed runtime (docs/design.md §5), built and parsed in one place.

Layout under a configurable prefix (default ``hsfl/v1``)::

    {prefix}/dev/{id}/hello         agent → orchestrator: registration and resource profile
    {prefix}/dev/{id}/status        retained; the last will publishes ``offline`` here
    {prefix}/dev/{id}/cmd           orchestrator → agent: assign, round_start, personalise, evaluate, stop
    {prefix}/dev/{id}/up            agent → server: features, logit gradients, inference requests, uploads
    {prefix}/dev/{id}/down          server → agent: logits, cut-layer gradients, replies
    {prefix}/dev/{id}/err           server/orchestrator → agent: why a message was dropped
    {prefix}/blob/{sha256}/{index}  one chunk of a blob (model weights), see below
    {prefix}/events                 round and device events for monitors

Blobs: a blob is addressed by the sha256 (lowercase hex) of its *whole* content and split into
chunks of at most ``broker.blobs.BLOB_CHUNK_BYTES``; chunk ``i`` (0-based decimal, no padding) is a
``blob_chunk`` message published *retained* on ``{prefix}/blob/{sha256}/{i}``. A fetcher subscribes
to ``{prefix}/blob/{sha256}/+`` (``Topics.blob_filter``), receives every retained chunk, and verifies
the hash after reassembly. ``Topics.blob`` is the chunks' common parent. Device-originated uploads
(e.g. client weights) travel as ``blob_chunk`` messages on the device's own ``up`` topic, so the ACL
never lets a device write under ``blob/``.

Device ids are ``[A-Za-z0-9_-]{1,64}``; with the generated ACL they are also the MQTT user names.
The server ingress reads every device's ``up`` topic through an MQTT v5 shared subscription
(``$share/{group}/{prefix}/dev/+/up``), so several ingress processes share the load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from broker.errors import WireError

DEFAULT_PREFIX = "hsfl/v1"
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
SHARE_GROUP_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEVICE_CHANNELS = ("hello", "status", "cmd", "up", "down", "err")
"""Per-device topic channels, in the order of docs/design.md §5."""
CHANNELS = (*DEVICE_CHANNELS, "blob", "events")
"""Every channel a topic can parse to (``TopicRef.kind``)."""


def validate_device_id(device_id: object, field: str = "dev") -> str:
    """Return ``device_id`` if it is a valid device id, else raise ``WireError`` naming ``field``."""
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise WireError(field, f"expected a device id matching [A-Za-z0-9_-]{{1,64}}, got {device_id!r}")
    return device_id


def validate_sha256(value: object, field: str = "sha256") -> str:
    """Return ``value`` if it is a lowercase hex sha256 digest (64 characters), else raise ``WireError``."""
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise WireError(field, f"expected a sha256 digest as 64 lowercase hex characters, got {value!r}")
    return value


class TopicRef(NamedTuple):
    """What a topic names: its channel (``kind``) and the device (or blob chunk) it belongs to."""

    kind: str  # one of CHANNELS
    device_id: str | None  # for the per-device channels, else None
    sha256: str | None = None  # for "blob"
    chunk_index: int | None = None  # for "blob"


def _validate_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise WireError("prefix", f"expected a non-empty topic prefix, got {prefix!r}")
    levels = prefix.split("/")
    if prefix.startswith("$") or any(not level for level in levels) or any(c in prefix for c in "+#\0"):
        raise WireError(
            "prefix",
            f"expected topic levels without wildcards, '$', empty levels or a leading/trailing '/', got {prefix!r}",
        )
    return prefix


@dataclass(frozen=True)
class Topics:
    """Topic builders and parser for one prefix. ``Topics()`` uses ``hsfl/v1``."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        _validate_prefix(self.prefix)

    # -- per-device topics ---------------------------------------------------------------
    def device(self, device_id: str, channel: str) -> str:
        """``{prefix}/dev/{device_id}/{channel}`` for one of ``DEVICE_CHANNELS``."""
        if channel not in DEVICE_CHANNELS:
            raise WireError("channel", f"expected one of {', '.join(DEVICE_CHANNELS)}, got {channel!r}")
        return f"{self.prefix}/dev/{validate_device_id(device_id, 'device_id')}/{channel}"

    def hello(self, device_id: str) -> str:
        return self.device(device_id, "hello")

    def status(self, device_id: str) -> str:
        return self.device(device_id, "status")

    def cmd(self, device_id: str) -> str:
        return self.device(device_id, "cmd")

    def up(self, device_id: str) -> str:
        return self.device(device_id, "up")

    def down(self, device_id: str) -> str:
        return self.device(device_id, "down")

    def err(self, device_id: str) -> str:
        return self.device(device_id, "err")

    def all_devices(self, channel: str) -> str:
        """Filter for one channel of every device: ``{prefix}/dev/+/{channel}``."""
        if channel not in DEVICE_CHANNELS:
            raise WireError("channel", f"expected one of {', '.join(DEVICE_CHANNELS)}, got {channel!r}")
        return f"{self.prefix}/dev/+/{channel}"

    def shared_up(self, group: str) -> str:
        """MQTT v5 shared subscription of the server ingress: ``$share/{group}/{prefix}/dev/+/up``."""
        if not isinstance(group, str) or not SHARE_GROUP_PATTERN.fullmatch(group):
            raise WireError("group", f"expected a share group name matching [A-Za-z0-9_-]{{1,64}}, got {group!r}")
        return f"$share/{group}/{self.all_devices('up')}"

    # -- blobs and events ------------------------------------------------------------------
    def blob(self, sha256: str) -> str:
        """Parent of a blob's chunk topics: ``{prefix}/blob/{sha256}``."""
        return f"{self.prefix}/blob/{validate_sha256(sha256)}"

    def blob_chunk(self, sha256: str, index: int) -> str:
        """Topic of chunk ``index`` (0-based) of a blob: ``{prefix}/blob/{sha256}/{index}``."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise WireError("index", f"expected a chunk index >= 0, got {index!r}")
        return f"{self.blob(sha256)}/{index}"

    def blob_filter(self, sha256: str) -> str:
        """Filter receiving every chunk of one blob: ``{prefix}/blob/{sha256}/+``."""
        return f"{self.blob(sha256)}/+"

    def events(self) -> str:
        return f"{self.prefix}/events"

    # -- parsing ---------------------------------------------------------------------------
    def parse(self, topic: str) -> TopicRef:
        """Split a concrete topic into (kind, device id[, sha256, chunk index]); ``WireError`` if foreign."""
        if not isinstance(topic, str):
            raise WireError("topic", f"expected a topic string, got {type(topic).__name__}")
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise WireError("topic", f"expected a topic under {self.prefix!r}, got {topic!r}")
        rest = topic[len(head):].split("/")
        if rest == ["events"]:
            return TopicRef("events", None)
        if len(rest) == 3 and rest[0] == "dev":
            device_id = validate_device_id(rest[1], "topic")
            if rest[2] not in DEVICE_CHANNELS:
                raise WireError("topic", f"unknown device channel {rest[2]!r} in {topic!r}")
            return TopicRef(rest[2], device_id)
        if len(rest) == 3 and rest[0] == "blob":
            sha = validate_sha256(rest[1], "topic")
            if not rest[2].isdigit() or not rest[2].isascii() or (len(rest[2]) > 1 and rest[2][0] == "0"):
                raise WireError("topic", f"expected a decimal chunk index in {topic!r}")
            return TopicRef("blob", None, sha, int(rest[2]))
        raise WireError("topic", f"unrecognised topic {topic!r}")


DEFAULT_TOPICS = Topics()


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> TopicRef:
    """Parse ``topic`` under ``prefix``; see ``Topics.parse``."""
    return Topics(prefix).parse(topic)
