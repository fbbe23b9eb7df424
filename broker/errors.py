"""Exceptions of the wire layer: one for bad bytes (``WireError``), a few for broker refusals.

``WireError`` names the offending field (``.field``) so a receiver can log it and answer the
sender on ``dev/{id}/err`` with the same field; the broker exceptions carry the MQTT v5 reason code.
"""

from __future__ import annotations

from typing import Any


class WireError(ValueError):
    """A message, topic or blob failed validation.

    ``field`` is the dotted name of what failed (``"v"``, ``"kind"``, ``"body.features"``,
    ``"topic"`` …); ``detail`` says what was expected. ``dev``, ``kind`` and ``seq`` are filled
    in when the envelope header was readable, so an error reply can reference the message.
    """

    def __init__(
        self, field: str, detail: str, *, dev: str | None = None, kind: str | None = None, seq: int | None = None
    ) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail
        self.dev = dev
        self.kind = kind
        self.seq = seq

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for Celery results and multiprocessing
        return (_rebuild_wire_error, (self.field, self.detail, self.dev, self.kind, self.seq))


def _rebuild_wire_error(field: str, detail: str, dev: str | None, kind: str | None, seq: int | None) -> WireError:
    return WireError(field, detail, dev=dev, kind=kind, seq=seq)


class BrokerError(RuntimeError):
    """The MQTT broker refused or failed an operation (connect, publish, subscribe)."""

    def __init__(self, message: str, *, reason_code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.reason = reason


class ConnectRefused(BrokerError):
    """CONNACK carried a failure reason code (bad credentials, not authorised, …) or none came."""


class PublishDenied(BrokerError):
    """PUBACK carried a failure reason code, e.g. 0x87 *Not authorized* from an ACL."""

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        super().__init__(
            f"publish to {topic!r} refused by the broker: {reason} (MQTT v5 reason code 0x{reason_code:02x})",
            reason_code=reason_code,
            reason=reason,
        )
        self.topic = topic


class SubscribeDenied(BrokerError):
    """SUBACK carried a failure reason code for the filter, e.g. 0x87 *Not authorized*."""

    def __init__(self, topic_filter: str, reason_code: int, reason: str) -> None:
        super().__init__(
            f"subscription to {topic_filter!r} refused by the broker: {reason} "
            f"(MQTT v5 reason code 0x{reason_code:02x})",
            reason_code=reason_code,
            reason=reason,
        )
        self.topic_filter = topic_filter
