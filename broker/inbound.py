"""What every receiver checks before an inbound message may touch its state (docs/design.md §15).

A message is *screened* against what the receiver knows — the topic it came on, the devices of the
run, the round, the kinds and the step it expects, the ``seq`` values it already took — and is
either returned as a decoded ``Envelope`` or refused with a :class:`Rejected` naming a code and the
field. A refused message changes nothing; the receiver answers it (:func:`answer`) on the ``err``
topic of the device whose topic it came on, and records a ``message_rejected`` event in Redis
(fields ``device``, ``code``, ``field``, ``kind``, ``topic``), which the monitor counts.

Codes (``REJECTION_CODES``), in the order the checks run:

- ``bad_schema``      undecodable bytes, or a body that fails its schema (``WireError.field``)
- ``unknown_device``  the envelope's ``dev`` is no device of this run
- ``foreign_dev``     the envelope's ``dev`` is another device than the topic's
- ``wrong_channel``   the kind may not travel on that channel (e.g. a command on ``up``)
- ``clock_skew``      (receivers that bound it) a ``ts`` more than ``max_skew_s`` from the
                      receiver's clock — ahead, or behind for a message sent now; a retained
                      message (or a last will, written when its agent connected) may be older,
                      up to ``MAX_RETAINED_AGE_S``. A device's clock decides
                      nothing (liveness and replay use the receiver's clock); the bound only keeps
                      absurd times (year 2099, 1970, 1e300) out of the records.
- ``unexpected_kind`` a valid kind that this receiver does not take now
- ``stale_round``     another round than the current one
- ``replay``          a ``seq`` already taken (or older than the replay window)
- ``wrong_step``      a step-exchange message of another step than the one expected
- ``bad_request``     (``hsfl.infer``) features the server model cannot run

``seq`` is checked before the step, so a captured message sent again is called a replay; it is
*recorded* only once every check passed, so a refused message cannot burn the ``seq`` of a message
still to come.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Container
from typing import Any

from broker.codec import Envelope, check_origin, decode
from broker.dedup import ACCEPTED, SeqDeduplicator
from broker.errors import WireError
from broker.limits import MAX_MESSAGE_BYTES
from broker.schemas import ErrorReport
from broker.topics import Topics

log = logging.getLogger(__name__)

REJECTION_CODES = ("bad_schema", "unknown_device", "foreign_dev", "wrong_channel", "clock_skew", "unexpected_kind",
                   "stale_round", "replay", "wrong_step", "bad_request")
REJECTED_EVENT = "message_rejected"

MAX_CLOCK_SKEW_S = 7 * 86400.0
"""How far a device's ``ts`` may be from the receiving service's clock: a board without a
real-time clock or NTP yet may be hours or days off, which is accepted (nothing is decided on
it); further off, the message is refused (``clock_skew``) and answered, naming the fix."""
MAX_RETAINED_AGE_S = 10 * 365 * 86400.0
"""How old a retained message may be (an agent's ``hello`` stays retained while it runs)."""


class Rejected(WireError):
    """A refused inbound message: ``code`` (one of ``REJECTION_CODES``), ``field``, ``detail``, the
    ``topic`` it came on and, when its header was readable, its ``dev``/``kind``/``seq``."""

    def __init__(self, code: str, field: str, detail: str, *, topic: str, dev: str | None = None,
                 kind: str | None = None, seq: int | None = None) -> None:
        super().__init__(field, detail, dev=dev, kind=kind, seq=seq)
        self.code = code
        self.topic = topic

    @classmethod
    def wrap(cls, err: WireError, code: str, topic: str) -> Rejected:
        return cls(code, err.field, err.detail, topic=topic, dev=err.dev, kind=err.kind, seq=err.seq)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.code, self.field, self.detail, self.topic, self.dev, self.kind, self.seq))

    def report(self) -> ErrorReport:
        """The ``error`` body answering it."""
        return ErrorReport(code=self.code, field=self.field[:128], message=str(self)[:2048], ref_seq=self.seq)


def _rebuild(code: str, field: str, detail: str, topic: str, dev: str | None, kind: str | None,
             seq: int | None) -> Rejected:
    return Rejected(code, field, detail, topic=topic, dev=dev, kind=kind, seq=seq)


def screen(topic: str, payload: bytes, topics: Topics, *, max_bytes: int = MAX_MESSAGE_BYTES,
           known: Container[str] | None = None, kinds: Collection[str] | None = None, rnd: int | None = None,
           step: int | None = None, step_kinds: Collection[str] = ("features", "logit_grad"),
           dedup: SeqDeduplicator | None = None, max_skew_s: float | None = None, retained: bool = False,
           now: float | None = None) -> Envelope:
    """The decoded envelope of a message received on ``topic``, or :class:`Rejected`.

    ``known``: the device ids of the run (None: any); ``kinds``: the kinds taken now (None: any the
    channel allows); ``rnd``: the current round (None: any); ``step``: the step a message of
    ``step_kinds`` must carry (None: any; a message of ``step_kinds`` that is not the kind awaited
    is a ``wrong_step`` too: it belongs to another point of the exchange); ``dedup``: refuse a
    (device, kind, round, seq) taken before, and record it once accepted; ``max_skew_s``: refuse a
    ``ts`` that far from ``now`` (default: this host's clock; a ``retained`` message may be older,
    up to ``MAX_RETAINED_AGE_S``; None: no bound, as on a device, whose own clock may be wrong)."""
    try:
        ref = topics.parse(topic)
        env = decode(payload, max_bytes)
    except WireError as err:
        raise Rejected.wrap(err, "bad_schema", topic) from None
    header = {"topic": topic, "dev": env.dev, "kind": env.kind, "seq": env.seq}
    if known is not None and env.dev and env.dev not in known:
        raise Rejected("unknown_device", "dev", f"device {env.dev!r} is no device of this run", **header)
    try:
        check_origin(env, ref)
    except WireError as err:
        raise Rejected.wrap(err, "foreign_dev" if err.field == "dev" else "wrong_channel", topic) from None
    if max_skew_s is not None:
        _check_clock(env.ts, time.time() if now is None else now, max_skew_s, retained, header)
    in_exchange = step is not None and env.kind in step_kinds  # checked below, once the seq is known new
    if kinds is not None and env.kind not in kinds and not in_exchange:
        raise Rejected("unexpected_kind", "kind", f"{env.kind!r} is not taken here now (expected "
                       f"{', '.join(sorted(kinds))})", **header)
    if rnd is not None and env.round != rnd:
        raise Rejected("stale_round", "round", f"round {env.round}, but round {rnd} is current", **header)
    if dedup is not None:
        verdict = dedup.check(env.dev, env.kind, env.round, env.seq, record=False)
        if verdict.code != ACCEPTED:
            raise Rejected("replay" if verdict.code != "stale_round" else "stale_round", "seq", verdict.reason,
                           **header)
    if in_exchange and (env.step != step or (kinds is not None and env.kind not in kinds)):
        wanted = "" if kinds is None else f"{'/'.join(sorted(set(kinds) & set(step_kinds)))} of "
        raise Rejected("wrong_step", "step", f"{env.kind} of step {env.step}, but {wanted}step {step} is expected",
                       **header)
    if dedup is not None:
        dedup.check(env.dev, env.kind, env.round, env.seq)
    return env


def _check_clock(ts: float, now: float, max_skew_s: float, retained: bool, header: dict[str, Any]) -> None:
    behind, ahead = now - (MAX_RETAINED_AGE_S if retained else max_skew_s), now + max_skew_s
    if behind <= ts <= ahead:
        return
    off = f"{ts - now:+.0f} s" if abs(ts - now) < 1e12 else f"at ts {ts:.3g}"
    raise Rejected("clock_skew", "ts", f"the sender's clock is {off} off this receiver's (at most {max_skew_s:.0f} s "
                   "accepted): set the device's clock (NTP, or `date -s`) and restart its agent", **header)


def answer(client: Any, topics: Topics, rejection: Rejected, r: Any = None, *, rnd: int = 0,
           receiver: str = "") -> None:
    """Answer ``rejection`` on the ``err`` topic of the device whose topic the message came on (no
    answer for a topic of no device), log it, and record a ``message_rejected`` event in Redis ``r``
    (when given). Never raises: a receiver goes on with its work whatever the broker or Redis say."""
    try:
        device = topics.parse(rejection.topic).device_id
    except WireError:
        device = None
    log.warning("%s: rejected a message on %s (%s): %s", receiver or "receiver", rejection.topic, rejection.code,
                rejection)
    if device is not None:
        try:
            client.send(topics.err(device), rejection.report(), round=rnd, wait=False)
        except Exception as err:  # noqa: BLE001 — e.g. the broker is away; the event below still records it
            log.warning("could not answer the rejected message on %s: %s", rejection.topic, err)
    if r is not None:
        record(r, rejection, device)


def record(r: Any, rejection: Rejected, device: str | None) -> None:
    """The ``message_rejected`` event of ``rejection`` in the ``hsfl:events`` stream."""
    from server import state  # noqa: PLC0415 (broker/ does not need Redis unless a receiver records)

    try:
        state.event(r, REJECTED_EVENT, device=device, code=rejection.code, field=rejection.field,
                    kind=rejection.kind, topic=rejection.topic)
    except Exception as err:  # noqa: BLE001 — Redis away: the answer was sent, the log line written
        log.warning("could not record the rejection of a message on %s: %s", rejection.topic, err)
