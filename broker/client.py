"""A paho-mqtt 2.x (MQTT v5) client wrapper with the transport settings of docs/design.md §5.

``BrokerClient`` sets ``TCP_NODELAY`` on paho's socket (``on_socket_open``; with Nagle on, every
small exchange costs 44–88 ms instead of < 1 ms), publishes with QoS 1, keeps a persistent session
(``clean_start=False`` plus a session expiry interval) and subscribes again on every reconnect (a
broker restarted from an older persistence file may hold a session without the latest
subscriptions), reconnects by itself with exponential backoff, sets a retained last will
``offline`` on the device's ``status`` topic (and announces ``online`` on every connect), publishes
the messages given to ``announce`` (an agent's retained ``hello``) again after every reconnect,
supports user name/password and TLS,
and surfaces MQTT v5 reason codes: a refused CONNECT raises ``ConnectRefused``, a PUBACK/SUBACK
failure (e.g. 0x87 *Not authorized* from the ACL) raises ``PublishDenied``/``SubscribeDenied``
naming the topic and is logged.

paho's callbacks only enqueue: each ``Subscription`` owns a bounded queue that messages are routed
to by their MQTT v5 subscription identifier; decoding and all work happen in the caller's thread
(``Subscription.get``, ``BrokerClient.wait_for``).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.blobs import BlobAssembler, BlobCache, split_blob
from broker.codec import Envelope, check_origin, decode, encode, make_envelope
from broker.errors import BrokerError, ConnectRefused, PublishDenied, SubscribeDenied, WireError
from broker.limits import MAX_MESSAGE_BYTES
from broker.schemas import STATUS_OFFLINE, STATUS_ONLINE, Status
from broker.topics import DEFAULT_TOPICS, Topics, validate_device_id

log = logging.getLogger(__name__)

_MAX_SUBSCRIPTION_ID = 268_435_455


class _QuietAfterClose(logging.Filter):
    """Drops paho's ``Client is not connected`` error: paho 2.x's network thread runs its loop once
    more after the socket closed — after our DISCONNECT when ``close`` has not yet stopped the thread
    (``disconnect`` comes before ``loop_stop``), or between two tries of a reconnect — and logs that
    at ERROR, so every run printed it once. The disconnect and the reconnect are logged by this
    module (``disconnected``, ``lost the connection``) at their true level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_PAHO_LOG = logging.getLogger("broker.paho")
_PAHO_LOG.addFilter(_QuietAfterClose())


def read_login(path: str | Path) -> tuple[str, str]:
    """(user name, password) from a credentials file: its first ``user:password`` line (``#`` comments skipped)."""
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, _, password = line.partition(":")
            return user, password
    raise ValueError(f"{path}: expected a line 'user:password' (the broker login)")


@dataclass(frozen=True)
class TlsSettings:
    """Client-side TLS: the CA that signed the broker's certificate, and an optional client certificate."""

    ca_certs: str | Path
    certfile: str | Path | None = None
    keyfile: str | Path | None = None


def tls_settings(cafile: str | Path | None, certfile: str | Path | None = None,
                 keyfile: str | Path | None = None) -> TlsSettings | None:
    """``TlsSettings`` from ``--cafile/--certfile/--keyfile`` (None without a CA file); ``ValueError``
    names a missing file or a lone certificate or key."""
    if cafile is None:
        if certfile is not None or keyfile is not None:
            raise ValueError("--certfile/--keyfile need --cafile (the CA that signed the broker's certificate)")
        return None
    if (certfile is None) != (keyfile is None):
        raise ValueError("--certfile and --keyfile go together (the client certificate and its key)")
    for flag, path in (("--cafile", cafile), ("--certfile", certfile), ("--keyfile", keyfile)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file (`harmony certs` and `harmony fleet add ID` write them)")
    return TlsSettings(cafile, certfile, keyfile)


@dataclass(eq=False)
class InboundMessage:
    """One received PUBLISH, as paho handed it over (payload still encoded)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float = field(default_factory=time.time)
    _envelope: Envelope | None = field(default=None, repr=False)

    def decode(self, max_bytes: int = MAX_MESSAGE_BYTES, *, allow_nonfinite: bool = False) -> Envelope:
        """The decoded envelope (``WireError`` if malformed); cached after the first call."""
        if self._envelope is None:
            self._envelope = decode(self.payload, max_bytes, allow_nonfinite=allow_nonfinite)
        return self._envelope


class PendingPublish:
    """A QoS ≥ 1 publish awaiting its PUBACK; ``wait`` returns the reason code or raises ``PublishDenied``."""

    def __init__(self, topic: str, mid: int) -> None:
        self.topic = topic
        self.mid = mid
        self.reason_code: int | None = None
        self.reason: str | None = None
        self._done = threading.Event()

    def _resolve(self, code: int, reason: str) -> None:
        self.reason_code, self.reason = code, reason
        if code >= 0x80:
            log.warning("broker refused publish to %s: %s (reason code 0x%02x)", self.topic, reason, code)
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = 10.0) -> int:
        """Block until acknowledged; return the MQTT v5 reason code (< 0x80 means accepted)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no PUBACK for the publish to {self.topic!r} (mid {self.mid}) within {timeout} s")
        assert self.reason_code is not None and self.reason is not None
        if self.reason_code >= 0x80:
            raise PublishDenied(self.topic, self.reason_code, self.reason)
        return self.reason_code


class _PendingSubscribe:
    def __init__(self, topic_filter: str) -> None:
        self.topic_filter = topic_filter
        self.codes: list[tuple[int, str]] | None = None
        self.done = threading.Event()


class Subscription:
    """One topic filter and the bounded queue its messages land in (oldest dropped when full, logged)."""

    def __init__(self, client: BrokerClient, topic_filter: str, qos: int, sub_id: int, max_queue: int) -> None:
        self.client = client
        self.topic_filter = topic_filter
        self.qos = qos
        self.id = sub_id
        self.dropped = 0
        self._messages: deque[InboundMessage] = deque()
        self._max_queue = max_queue
        parts = topic_filter.split("/")
        # topic matching uses the filter without the "$share/{group}/" part
        self.match_filter = "/".join(parts[2:]) if topic_filter.startswith("$share/") else topic_filter
        self.received_bytes = 0
        """Payload bytes of every message that arrived on this subscription (monitoring)."""

    def _push(self, message: InboundMessage) -> None:  # called with the client's condition held
        self.received_bytes += len(message.payload)
        if len(self._messages) >= self._max_queue:
            self._messages.popleft()
            self.dropped += 1
            log.warning("subscription %s: queue full (%d), dropped the oldest message", self.topic_filter,
                        self._max_queue)
        self._messages.append(message)

    def __len__(self) -> int:
        return len(self._messages)

    def get_nowait(self) -> InboundMessage | None:
        with self.client._cond:
            return self._messages.popleft() if self._messages else None

    def get(self, timeout: float | None = 10.0) -> InboundMessage:
        """The next message (blocking up to ``timeout`` seconds; ``TimeoutError`` then)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.client._cond:
            while not self._messages:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no message on {self.topic_filter!r} within {timeout} s")
                self.client._cond.wait(remaining)
            return self._messages.popleft()

    def wait_for(self, kind: str, predicate: Callable[[Envelope], bool] | None = None,
                 timeout: float = 10.0) -> Envelope:
        """The first message of ``kind`` (satisfying ``predicate``) from this subscription; see ``BrokerClient``."""
        return self.client.wait_for(kind, predicate, timeout, subscription=self)

    def _take_match(self, kind: str, predicate: Callable[[Envelope], bool] | None) -> Envelope | None:
        for message in list(self._messages):
            try:
                envelope = message.decode(self.client.max_bytes)
            except WireError as err:
                log.warning("dropping undecodable message on %s: %s", message.topic, err)
                self._messages.remove(message)
                continue
            if envelope.kind == kind and (predicate is None or predicate(envelope)):
                self._messages.remove(message)
                return envelope
        return None


class BrokerClient:
    """One MQTT v5 connection with the project's transport settings (see the module docstring).

    ``device_id`` makes this an agent's connection: the last will (retained ``offline``) and the
    ``online``/``offline`` announcements go to that device's ``status`` topic.
    """

    def __init__(
        self,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsSettings | None = None,
        topics: Topics = DEFAULT_TOPICS,
        device_id: str | None = None,
        keepalive_s: int = 30,
        session_expiry_s: int = 3600,
        clean_start: paho.CleanStartOption = False,
        reconnect_min_delay_s: float = 1.0,
        reconnect_max_delay_s: float = 30.0,
        max_queue: int = 10_000,
        max_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if not client_id or len(client_id) > 128 or any(c in client_id for c in "/+#\0"):
            raise ValueError(f"client_id must be 1–128 characters without '/', '+', '#', got {client_id!r}")
        self.client_id = client_id
        self.host, self.port = host, port
        self.topics = topics
        self.device_id = validate_device_id(device_id, "device_id") if device_id is not None else None
        self.max_bytes = max_bytes
        self._tls = tls is not None
        self._keepalive_s = keepalive_s
        self._session_expiry_s = session_expiry_s
        self._clean_start = clean_start
        self._max_queue = max_queue
        self._seq = itertools.count(1)
        self._seq_lock = threading.Lock()

        self._cond = threading.Condition()  # guards subscription queues
        self._lock = threading.Lock()  # guards the pending-ack tables
        self._subscriptions: dict[int, Subscription] = {}
        self._sub_ids = itertools.count(1)
        self._retired_ids: set[int] = set()  # subscriptions this client ended (their late messages are dropped)
        # Messages for no current subscription, e.g. what a persistent session queued while the client
        # was away: the broker sends them right after CONNACK, before ``subscribe`` runs again. The
        # next subscription whose filter matches claims them, in arrival order.
        self._unclaimed: deque[InboundMessage] = deque(maxlen=max_queue)
        self._pending_pubs: dict[int, PendingPublish] = {}
        self._early_pub_acks: dict[int, tuple[int, str]] = {}
        self._pending_subs: dict[int, _PendingSubscribe] = {}
        self._early_sub_acks: dict[int, list[tuple[int, str]]] = {}
        self._unwaited_subs: dict[int, str] = {}
        self._unwaited_pubs: dict[int, str] = {}
        self._connack = threading.Event()
        self._announced: dict[str, object] = {}  # topic → body, published (retained) on every connect
        self._connected = threading.Event()
        self._connect_failure: tuple[int, str] | None = None
        self._closing = False
        self._started = False
        self.connect_count = 0
        """Successful CONNACKs so far (the first connect plus every automatic reconnect)."""
        self.disconnected_at: float | None = None
        """When (unix s) the connection was last lost other than by ``close``; None if never."""
        self.before_publish: Callable[[int], None] | None = None
        """Called with a payload's size before it is published (an emulated link's uplink and latency)."""
        self.before_deliver: Callable[[int], None] | None = None
        """Called with a received payload's size, in the network thread, before it is delivered (an
        emulated link's downlink: later messages wait behind it, as on a link)."""

        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
        )
        client.enable_logger(_PAHO_LOG)
        client.reconnect_delay_set(min_delay=reconnect_min_delay_s, max_delay=reconnect_max_delay_s)  # type: ignore[arg-type]
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set(
                ca_certs=str(tls.ca_certs),
                certfile=str(tls.certfile) if tls.certfile else None,
                keyfile=str(tls.keyfile) if tls.keyfile else None,
            )
        if self.device_id is not None:
            will = self._status_envelope(STATUS_OFFLINE, "connection lost", seq=0)
            client.will_set(self.topics.status(self.device_id), encode(will), qos=1, retain=True)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self._mqtt = client

    # -- properties --------------------------------------------------------------------------
    @property
    def mqtt(self) -> paho.Client:
        """The underlying paho client (for diagnostics and tests; prefer this wrapper's methods)."""
        return self._mqtt

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def next_seq(self) -> int:
        """A fresh per-connection-object sequence number (1, 2, …), thread-safe."""
        with self._seq_lock:
            return next(self._seq)

    # -- paho callbacks: they only record and enqueue ----------------------------------------
    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as exc:  # e.g. a websocket wrapper
            log.warning("could not set TCP_NODELAY on the MQTT socket: %s", exc)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._connect_failure = (reason_code.value, reason_code.getName())
            log.error("broker %s:%d refused the connection of %s: %s (reason code 0x%02x)", self.host, self.port,
                      self.client_id, reason_code.getName(), reason_code.value)
            self._connack.set()
            return
        self._connect_failure = None
        self.connect_count += 1
        log.info("connected to %s:%d as %s (session present: %s)", self.host, self.port, self.client_id,
                 flags.session_present)
        with self._cond:
            subscriptions = list(self._subscriptions.values())
            announced = list(self._announced.items())
        # Subscribe again even when the broker says it kept our session: one restarted from an older
        # persistence file (autosave, or kill -9) has the session without the latest subscriptions.
        # A repeated SUBSCRIBE only replaces the subscription (and sends the retained messages again).
        for sub in subscriptions:
            result, mid = client.subscribe(sub.topic_filter, qos=sub.qos, properties=self._sub_properties(sub.id))
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with self._lock:
                    self._unwaited_subs[mid] = sub.topic_filter
        for topic, body in announced:  # e.g. the retained hello that a restarted broker no longer holds
            envelope = make_envelope(body, dev=self.topics.parse(topic).device_id or "", seq=self.next_seq())
            info = client.publish(topic, encode(envelope, max_bytes=self.max_bytes), qos=1, retain=True)
            with self._lock:
                self._unwaited_pubs[info.mid] = topic
        if self.device_id is not None:
            payload = encode(self._status_envelope(STATUS_ONLINE, "", seq=self.next_seq()))
            info = client.publish(self.topics.status(self.device_id), payload, qos=1, retain=True)
            with self._lock:  # its PUBACK is handled by this same thread, after this callback returns
                self._unwaited_pubs[info.mid] = self.topics.status(self.device_id)
        self._connected.set()
        self._connack.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self._connected.clear()
        if not self._closing:
            self.disconnected_at = time.time()
        if self._closing:
            log.info("disconnected %s from %s:%d", self.client_id, self.host, self.port)
        else:
            log.warning("lost the connection of %s to %s:%d: %s (reason code 0x%02x); reconnecting", self.client_id,
                        self.host, self.port, reason_code.getName(), reason_code.value)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if self.before_deliver is not None:
            self.before_deliver(len(message.payload))
        inbound = InboundMessage(message.topic, bytes(message.payload), message.qos, bool(message.retain))
        ids = getattr(message.properties, "SubscriptionIdentifier", None) if message.properties else None
        with self._cond:
            if ids:
                targets = [self._subscriptions[i] for i in ids if i in self._subscriptions]
            else:
                targets = [s for s in self._subscriptions.values()
                           if paho.topic_matches_sub(s.match_filter, message.topic)]
            if not targets:
                if ids and all(i in self._retired_ids for i in ids):
                    log.debug("message on %s for an ended subscription; dropped", message.topic)
                else:
                    if len(self._unclaimed) == self._unclaimed.maxlen:
                        log.warning("more than %d messages for no subscription; dropping the oldest",
                                    self._unclaimed.maxlen)
                    self._unclaimed.append(inbound)
            for sub in targets:
                sub._push(inbound)
            self._cond.notify_all()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties) -> None:
        code, name = reason_code.value, reason_code.getName()
        with self._lock:
            pending = self._pending_pubs.pop(mid, None)
            unwaited = self._unwaited_pubs.pop(mid, None)
            if pending is None and unwaited is None:
                self._early_pub_acks[mid] = (code, name)  # publish_raw has not registered this mid yet
        if unwaited is not None and code >= 0x80:
            log.warning("broker refused publish to %s: %s (reason code 0x%02x)", unwaited, name, code)
        if pending is not None:
            pending._resolve(code, name)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        codes = [(rc.value, rc.getName()) for rc in reason_codes]
        with self._lock:
            pending = self._pending_subs.pop(mid, None)
            unwaited = self._unwaited_subs.pop(mid, None)
            if pending is None and unwaited is None:
                self._early_sub_acks[mid] = codes
        if unwaited is not None and any(code >= 0x80 for code, _ in codes):
            log.error("broker refused the resubscription to %s: %s", unwaited, codes)
        if pending is not None:
            pending.codes = codes
            pending.done.set()

    # -- connection --------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Connect and start paho's network thread; ``ConnectRefused`` if the broker says no or is unreachable."""
        if self._started:
            return
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self._session_expiry_s
        self._closing = False
        self._connack.clear()
        self._mqtt.connect_async(self.host, self.port, keepalive=self._keepalive_s, clean_start=self._clean_start,
                                 properties=properties)
        self._mqtt.loop_start()
        self._started = True
        if self._connack.wait(timeout) and self._connect_failure is None:
            return
        self._stop_loop()
        if self._connect_failure is not None:
            code, name = self._connect_failure
            raise ConnectRefused(f"broker {self.host}:{self.port} refused {self.client_id!r}: {name} "
                                 f"(MQTT v5 reason code 0x{code:02x})", reason_code=code, reason=name)
        hint = ("is the broker running, does it speak TLS there, and did the CA of --cafile sign its certificate "
                "for this host name? (a refused TLS handshake looks like no answer)" if self._tls
                else "is the broker running?")
        raise ConnectRefused(f"no CONNACK from {self.host}:{self.port} within {timeout} s ({hint})")

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Block until connected (e.g. after an automatic reconnect); False on timeout."""
        return self._connected.wait(timeout)

    def _stop_loop(self) -> None:
        self._closing = True
        self._mqtt.disconnect()
        self._mqtt.loop_stop()
        self._connected.clear()
        self._started = False

    def close(self, timeout: float = 5.0, *, end_session: bool = False) -> None:
        """Announce ``offline`` (agents), disconnect cleanly and stop the network thread. Idempotent.

        ``end_session=True`` also asks the broker to drop the persistent session (expiry 0).
        """
        if not self._started:
            return
        if self.device_id is not None and self.is_connected:
            try:
                self.publish_status(STATUS_OFFLINE, "closed", timeout=timeout)
            except (BrokerError, TimeoutError) as exc:
                log.warning("could not announce offline for %s: %s", self.device_id, exc)
        self._closing = True
        properties = None
        if end_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        self._mqtt.disconnect(properties=properties)
        self._mqtt.loop_stop()
        self._connected.clear()
        self._started = False

    def __enter__(self) -> BrokerClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- subscribing and receiving -----------------------------------------------------------
    @staticmethod
    def _sub_properties(sub_id: int) -> Properties:
        properties = Properties(PacketTypes.SUBSCRIBE)
        properties.SubscriptionIdentifier = sub_id
        return properties

    def subscribe(self, topic_filter: str, qos: int = 1, *, timeout: float = 10.0) -> Subscription:
        """Subscribe and wait for the SUBACK; ``SubscribeDenied`` names the filter if the broker refuses."""
        sub_id = next(self._sub_ids)
        if sub_id > _MAX_SUBSCRIPTION_ID:
            raise BrokerError("ran out of MQTT subscription identifiers")
        sub = Subscription(self, topic_filter, qos, sub_id, self._max_queue)
        with self._cond:
            self._subscriptions[sub_id] = sub  # before SUBSCRIBE, so retained messages find their queue
            kept: deque[InboundMessage] = deque(maxlen=self._unclaimed.maxlen)
            for message in self._unclaimed:
                (sub._push if paho.topic_matches_sub(sub.match_filter, message.topic) else kept.append)(message)
            self._unclaimed = kept
        result, mid = self._mqtt.subscribe(topic_filter, qos=qos, properties=self._sub_properties(sub_id))
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            with self._cond:
                self._subscriptions.pop(sub_id, None)
            raise BrokerError(f"could not send SUBSCRIBE for {topic_filter!r}: {paho.error_string(result)}")
        pending = _PendingSubscribe(topic_filter)
        with self._lock:
            early = self._early_sub_acks.pop(mid, None)
            if early is None:
                self._pending_subs[mid] = pending
        if early is not None:
            pending.codes = early
            pending.done.set()
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending_subs.pop(mid, None)
            raise TimeoutError(f"no SUBACK for {topic_filter!r} within {timeout} s")
        assert pending.codes is not None
        for code, name in pending.codes:
            if code >= 0x80:
                with self._cond:
                    self._subscriptions.pop(sub_id, None)
                    self._retired_ids.add(sub_id)
                log.error("broker refused the subscription to %s: %s (reason code 0x%02x)", topic_filter, name, code)
                raise SubscribeDenied(topic_filter, code, name)
        return sub

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop a subscription; messages already queued on it are discarded."""
        with self._cond:
            self._subscriptions.pop(subscription.id, None)
            self._retired_ids.add(subscription.id)
        self._mqtt.unsubscribe(subscription.topic_filter)

    def wait_for(self, kind: str, predicate: Callable[[Envelope], bool] | None = None, timeout: float = 10.0,
                 *, subscription: Subscription | None = None) -> Envelope:
        """The first queued or arriving message of ``kind`` for which ``predicate`` holds.

        Searches ``subscription`` (or every subscription of this client). Messages that do not
        match stay queued for later calls; undecodable ones are logged and dropped. ``predicate``
        runs under the queue lock and must be quick. ``TimeoutError`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                subs = [subscription] if subscription is not None else list(self._subscriptions.values())
                for sub in subs:
                    envelope = sub._take_match(kind, predicate)
                    if envelope is not None:
                        return envelope
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {kind!r} message within {timeout} s")
                self._cond.wait(remaining)

    # -- publishing --------------------------------------------------------------------------
    def publish_raw(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, wait: bool = True,
                    timeout: float = 10.0) -> PendingPublish:
        """Publish bytes as they are (e.g. ``b""`` retained, to clear a retained message)."""
        if self.before_publish is not None:
            self.before_publish(len(payload))
        info = self._mqtt.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerError(f"could not publish to {topic!r}: {paho.error_string(info.rc)}")
        pending = PendingPublish(topic, info.mid)
        with self._lock:
            early = self._early_pub_acks.pop(info.mid, None)
            if early is None:
                self._pending_pubs[info.mid] = pending
        if early is not None:
            pending._resolve(*early)
        if wait:
            pending.wait(timeout)
        return pending

    def publish_message(self, topic: str, envelope: Envelope, *, qos: int = 1, retain: bool = False,
                        wait: bool = True, timeout: float = 10.0) -> PendingPublish:
        """Encode and publish ``envelope`` (QoS 1 by default); with ``wait``, block for the PUBACK.

        Raises ``WireError`` if the envelope fails its schema, ``PublishDenied`` if the broker refuses
        (e.g. ACL), ``TimeoutError`` if no PUBACK came (the message stays queued for redelivery).
        """
        return self.publish_raw(topic, encode(envelope, max_bytes=self.max_bytes), qos=qos, retain=retain,
                                wait=wait, timeout=timeout)

    def send(self, topic: str, body: object, *, round: int = 0, step: int | None = None, dev: str | None = None,
             retain: bool = False, wait: bool = True, timeout: float = 10.0) -> PendingPublish:
        """Wrap ``body`` in an envelope with the next seq and publish it.

        ``dev`` defaults to the device of a per-device topic, else this client's ``device_id``, else "".
        """
        if dev is None:
            try:
                dev = self.topics.parse(topic).device_id
            except WireError:
                dev = None
            dev = dev if dev is not None else (self.device_id or "")
        envelope = make_envelope(body, dev=dev, seq=self.next_seq(), round=round, step=step)
        return self.publish_message(topic, envelope, retain=retain, wait=wait, timeout=timeout)

    def announce(self, topic: str, body: object, *, timeout: float = 10.0) -> PendingPublish:
        """Publish ``body`` retained on ``topic`` now and again after every reconnect (an agent's
        ``hello``: a broker restarted without persistence has lost its retained copy, and the
        registry of a later run would never see the device)."""
        with self._cond:
            self._announced[topic] = body
        return self.send(topic, body, retain=True, timeout=timeout)

    def publish_status(self, state: str, detail: str = "", *, timeout: float = 10.0) -> PendingPublish:
        """Publish this device's retained status."""
        if self.device_id is None:
            raise BrokerError("publish_status needs a client created with device_id")
        envelope = self._status_envelope(state, detail, seq=self.next_seq())
        return self.publish_message(self.topics.status(self.device_id), envelope, retain=True, timeout=timeout)

    def _status_envelope(self, state: str, detail: str, *, seq: int) -> Envelope:
        assert self.device_id is not None
        return make_envelope(Status(state=state, detail=detail), dev=self.device_id, seq=seq)

    # -- blobs -------------------------------------------------------------------------------
    def publish_blob(self, data: bytes, *, retain: bool = True, timeout: float = 60.0,
                     pending: list[PendingPublish] | None = None) -> str:
        """Publish ``data`` as retained chunks under ``blob/{sha256}/{index}``; return the sha256.

        With ``pending`` the chunks' publications are appended to it instead of awaited here, so a
        caller publishing many blobs waits for all their PUBACKs at once (:func:`wait_all`) rather
        than for one round trip through the broker per blob."""
        chunks = split_blob(data)
        sent = [self.send(self.topics.blob_chunk(c.sha256, c.index), c, dev="", retain=retain, wait=False)
                for c in chunks]
        if pending is not None:
            pending.extend(sent)
        else:
            wait_all(sent, timeout)
        return chunks[0].sha256

    def clear_blob(self, sha256: str, count: int, *, timeout: float = 10.0,
                   pending: list[PendingPublish] | None = None) -> None:
        """Remove a blob's retained chunks from the broker (``pending``: as in :meth:`publish_blob`)."""
        sent = [self.publish_raw(self.topics.blob_chunk(sha256, index), b"", retain=True, wait=False)
                for index in range(count)]
        if pending is not None:
            pending.extend(sent)
        else:
            wait_all(sent, timeout)

    def fetch_blob(self, sha256: str, *, timeout: float = 60.0, cache: BlobCache | None = None) -> bytes:
        """Fetch and verify a blob from its retained chunks (from ``cache`` when it already holds the hash)."""
        if cache is not None:
            cached = cache.get(sha256)
            if cached is not None:
                return cached
        subscription = self.subscribe(self.topics.blob_filter(sha256))
        try:
            data = self.receive_blob(subscription, timeout=timeout, sha256=sha256)
        finally:
            self.unsubscribe(subscription)
        if cache is not None:
            cache.put(data, sha256)
        return data

    def receive_blob(self, subscription: Subscription, *, timeout: float, sha256: str | None = None,
                     accept: Callable[[Envelope], bool] | None = None, check: Callable[[], None] | None = None,
                     check_every_s: float = 1.0,
                     screen: Callable[[InboundMessage], Envelope | None] | None = None) -> bytes:
        """Reassemble and verify the blob whose chunks arrive on ``subscription`` (the retained
        chunks of ``blob/{sha256}/+``, or a device's upload on its ``up`` topic): the blob
        ``sha256``, or the one the first accepted chunk names. Chunks ``accept`` refuses (e.g. of
        another round) and other kinds are skipped; a QoS 1 redelivery of a chunk already held is
        ignored; cleared retained chunks (empty payloads) are skipped. Each message must come
        from its topic's device (``check_origin``). ``check`` runs on every message and at least
        every ``check_every_s`` while waiting (it may raise to abandon the transfer). ``screen``
        replaces the decoding and the origin check: it returns a message's envelope, or None to skip
        it (a receiver that answers what it refuses, ``broker.inbound``).
        ``TimeoutError`` after ``timeout`` seconds; ``WireError`` for a malformed chunk."""
        assembler = None if sha256 is None else BlobAssembler(sha256)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = "all" if assembler is None else assembler.missing() or "all"
                raise TimeoutError(f"blob {sha256 or '(upload)'}: missing chunk(s) {missing} after {timeout} s")
            try:
                message = subscription.get(min(remaining, check_every_s) if check is not None else remaining)
            except TimeoutError:
                if check is not None:
                    check()
                continue
            if check is not None:
                check()
            if not message.payload:
                continue  # a cleared retained chunk
            if screen is not None:
                screened = screen(message)
                if screened is None:
                    continue
                envelope = screened
            else:
                envelope = message.decode(self.max_bytes)
                check_origin(envelope, self.topics.parse(message.topic))
            if envelope.kind != "blob_chunk" or (accept is not None and not accept(envelope)):
                continue
            chunk = envelope.body
            if assembler is None:
                assembler = BlobAssembler(chunk.sha256)
            if chunk.sha256 != assembler.sha256:
                continue  # a chunk of another blob (an abandoned upload)
            if assembler.count is not None and chunk.index not in assembler.missing():
                continue  # a QoS 1 redelivery of a chunk we already hold
            data = assembler.add(chunk)
            if data is not None:
                return data


def wait_all(pending: list[PendingPublish], timeout: float = 60.0) -> None:
    """Wait for the PUBACK of every publication in ``pending`` (one deadline for all of them);
    raises as :meth:`PendingPublish.wait` does for the first that failed or timed out."""
    deadline = time.monotonic() + timeout
    for p in pending:
        p.wait(max(0.0, deadline - time.monotonic()))
