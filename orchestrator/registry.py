"""Device registry: ``hello`` (retained) and ``status`` messages into Redis ``hsfl:dev:{id}``.

Admission: a device whose ``hello.agent_version`` is not this orchestrator's own installed version
(:func:`harmony.version.installed_version`) is refused — recorded under ``refused`` in its Redis
hash and as a ``device_refused`` event, logged, left out of :meth:`Registry.available` — with the
fix named: ``harmony flash USER@HOST --device-id ID --upgrade``."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Container
from pathlib import Path

from broker.client import BrokerClient, InboundMessage
from broker.errors import BrokerError
from broker.inbound import MAX_CLOCK_SKEW_S, Rejected, answer, screen
from broker.topics import DEVICE_ID_PATTERN
from harmony.version import installed_version
from server import state

log = logging.getLogger(__name__)


def version_refusal(device_id: str, agent_version: str, expected: str) -> str | None:
    """Why a device with ``agent_version`` is refused by an orchestrator of version ``expected``
    (None: admitted), naming the fix."""
    if agent_version == expected:
        return None
    return (f"device {device_id} runs agent {agent_version} but this orchestrator is {expected}: "
            f"upgrade the board with `harmony flash USER@HOST --device-id {device_id} --upgrade` "
            f"(or start an agent of {expected})")


def natural_key(device_id: str) -> list[object]:
    """``emu-2`` before ``emu-10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", device_id)]


class StoreDevices:
    """The devices of a credential store (``testbed.credentials``: ``devices/{id}/password``), looked
    up at each question, so a device added while the registry runs (``harmony fleet add``) is known."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __contains__(self, dev: object) -> bool:
        return (isinstance(dev, str) and DEVICE_ID_PATTERN.fullmatch(dev) is not None
                and (self.root / "devices" / dev / "password").is_file())


class Registry:
    """Collects hello/status from the broker and records them in Redis (``r``; None: only in memory)."""

    def __init__(self, client: BrokerClient, r: object | None, expected_version: str | None = None,
                 known: Container[str] | None = None) -> None:
        self.client, self.r = client, r
        self.known = known
        """The devices this registry may admit (a stack's credential store and agents); None: any."""
        self.expected_version = installed_version() if expected_version is None else expected_version
        self.refused: dict[str, str] = {}
        """Device → why it is refused (its agent version differs from ``expected_version``)."""
        self.hello = client.subscribe(client.topics.all_devices("hello"))
        self.status = client.subscribe(client.topics.all_devices("status"))
        self.online: dict[str, bool] = {}
        self.status_ts: dict[str, float] = {}
        """Device → when this registry received its latest new status, on this host's clock: one sent
        while it listened, or a retained one of a higher ``seq`` than it saw before (an agent announces
        one on every connect). A device's own clock (``ts``) decides nothing."""
        self.profiles: dict[str, dict] = {}
        self._hello_at: dict[str, float] = {}  # device → receipt of its latest hello (this host's clock)
        self._offline_at: dict[str, float] = {}  # device → receipt of its latest offline status
        self._status_seq: dict[str, int] = {}  # device → seq of its latest status

    def poll(self, timeout: float = 0.2) -> None:
        """Drain what arrived (waiting up to ``timeout`` for the first message), hellos and statuses
        in the order they were received."""
        deadline = time.monotonic() + timeout
        messages: list[tuple[InboundMessage, str]] = []
        while True:
            for sub, kind in ((self.hello, "hello"), (self.status, "status")):
                while (message := sub.get_nowait()) is not None:
                    messages.append((message, kind))
            if messages or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        messages.sort(key=lambda m: m[0].received_at)  # stable: a hello before the status of its connect
        for message, kind in messages:
            env = self._screen(message, kind)
            if env is None:
                continue
            dev = env.dev
            if env.kind == "hello":
                profile = dataclasses.asdict(env.body)
                self.profiles[dev] = profile
                self._hello_at[dev] = message.received_at
                if self.r is not None:
                    self.r.hset(state.dev_key(dev), mapping={"profile": json.dumps(profile)})  # type: ignore
                    self.r.sadd(state.devices_key(), dev)  # type: ignore[attr-defined]
                self._admit(dev, env.body.agent_version)
            elif env.kind == "status":
                was = self.online.get(dev)
                self.online[dev] = env.body.state != "offline"
                if not self.online[dev]:
                    self._offline_at[dev] = message.received_at
                # sent now, or a retained copy of a later one than seen before (the agent reconnected
                # while this registry was away from the broker): not an old copy the broker kept
                if not message.retain or env.seq > self._status_seq.get(dev, -1):
                    self.status_ts[dev] = message.received_at
                self._status_seq[dev] = env.seq
                if self.r is not None:
                    self.r.hset(state.dev_key(dev), mapping={"status": env.body.state,  # type: ignore
                                                             "status_ts": message.received_at})
                    if was is not self.online[dev]:  # for monitors: the device came or went (last will)
                        state.event(self.r, "device_online" if self.online[dev] else "device_offline",  # type: ignore
                                    device=dev, state=env.body.state, detail=env.body.detail[:200])

    def _screen(self, message: InboundMessage, kind: str) -> object | None:
        """A ``hello``/``status`` from the device it names (``broker.inbound``), else None: refused,
        answered and recorded; a refused *retained* message (e.g. the announcement of a device no
        longer in the credential store) is also cleared from the broker, so no later run sees it."""
        if not message.payload:
            return None
        try:
            return screen(message.topic, message.payload, self.client.topics, max_bytes=self.client.max_bytes,
                          known=self.known, kinds=(kind,), max_skew_s=MAX_CLOCK_SKEW_S,
                          # a status may be old: a last will is written when its agent connected
                          retained=message.retain or kind == "status", now=message.received_at)
        except Rejected as rejection:
            answer(self.client, self.client.topics, rejection, self.r, receiver="registry")
            if message.retain:
                try:
                    self.client.publish_raw(message.topic, b"", retain=True, wait=False)
                except BrokerError as err:
                    log.warning("registry: could not clear the retained message on %s: %s", message.topic, err)
            return None

    def _admit(self, dev: str, agent_version: str) -> None:
        refusal = version_refusal(dev, agent_version, self.expected_version)
        if refusal is None:
            if self.refused.pop(dev, None) is not None:
                log.info("registry: device %s now runs agent %s: admitted", dev, agent_version)
            if self.r is not None:
                self.r.hdel(state.dev_key(dev), "refused")  # type: ignore[attr-defined]
            return
        if self.refused.get(dev) != refusal:
            log.warning("registry: refused %s", refusal)
            if self.r is not None:
                self.r.hset(state.dev_key(dev), mapping={"refused": refusal})  # type: ignore[attr-defined]
                state.event(self.r, "device_refused", device=dev, agent_version=agent_version,  # type: ignore
                            expected_version=self.expected_version, reason=refusal)
        self.refused[dev] = refusal

    def started_at(self, dev: str) -> float | None:
        """When the agent process of ``dev`` started, as its latest ``hello`` says (None if unknown)."""
        value = self.profiles.get(dev, {}).get("started_at")
        return None if value is None else float(value)

    def ready(self, dev: str) -> bool:
        """Whether ``dev`` is online with a ``hello`` received since it last went offline: an agent
        that restarted announces ``online`` on connecting and its ``hello`` only after measuring
        itself, and until then the hello the broker kept is its previous process's."""
        return (self.online.get(dev, False) and dev in self._hello_at
                and self._hello_at[dev] >= self._offline_at.get(dev, 0.0))

    def available(self) -> list[str]:
        """Registered, admitted devices that are :meth:`ready`, in natural order."""
        return sorted((d for d in self.profiles if self.ready(d) and d not in self.refused), key=natural_key)

    def refused_online(self) -> dict[str, str]:
        """Online devices refused for their agent version → why."""
        return {d: why for d, why in sorted(self.refused.items(), key=lambda kv: natural_key(kv[0]))
                if self.online.get(d, False)}

    def wait_for(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            devices = self.available()
            if len(devices) >= count:
                return devices
            if time.monotonic() > deadline:
                refused = self.refused_online()
                why = "".join(f"; refused: {reason}" for reason in refused.values())
                fewer = f", or run on those online: --set fleet.num_clients={len(devices)}" if devices else ""
                raise TimeoutError(f"fleet.num_clients = {count} but {len(devices)} device(s) are online after "
                                   f"{timeout:g} s ({', '.join(devices) or 'none'}): start more (`harmony fleet "
                                   f"emulate`, `harmony agent`, a flashed board){fewer}{why}")


def devices_for_clients(online: list[str], profiles: dict[str, dict], share_digests: list[str]) -> list[str]:
    """The device of each client ``i`` (``len(share_digests)`` clients; ``share_digests[i]`` the
    sha256 of client ``i``'s ``ClientShare`` bytes): a device whose ``hello.data_share`` names a
    client's share holds that client's rows on its disk (a board flashed with ``--config/--client``)
    and gets that client; the other devices fill the remaining clients in the order given (natural
    order). A device holding rows of no client of this run (or of a client another device took) is
    left out. ``RuntimeError`` naming the fix when too few remain."""
    index = {sha: i for i, sha in enumerate(share_digests)}
    pinned: dict[int, str] = {}
    free: list[str] = []
    foreign: list[str] = []
    for dev in online:
        sha = profiles.get(dev, {}).get("data_share")
        if sha is None:
            free.append(dev)
        elif sha in index and index[sha] not in pinned:
            pinned[index[sha]] = dev
        else:
            foreign.append(dev)
    spare = iter(free)
    out = []
    for i in range(len(share_digests)):
        dev = pinned.get(i) or next(spare, None)
        if dev is None:
            why = (f"; left out: {', '.join(foreign)} hold(s) the rows of another client or partition (their board "
                   "data file): flash them with this run's --config and --client, or give them the whole dataset "
                   "(--board-data)") if foreign else ""
            raise RuntimeError(f"the run needs {len(share_digests)} devices but only {len(out) + len(pinned)} of the "
                               f"online ones can serve it{why}")
        out.append(dev)
    if foreign:
        log.warning("devices %s hold the rows of no client of this run (or of a client another device serves); "
                    "left out", foreign)
    return out


def online_fleet(client: BrokerClient, count: int, timeout: float) -> tuple[dict[str, dict], dict[str, str]]:
    """The ``hello`` of the first ``count`` online admitted devices (natural order, as a run picks
    them), read from the broker's retained messages (fewer if fewer are online after ``timeout``
    seconds), and the online devices refused for their agent version → why."""
    registry = Registry(client, None)
    try:
        devices = registry.wait_for(count, timeout)
    except TimeoutError:
        devices = registry.available()
    return {dev: registry.profiles[dev] for dev in devices[:count]}, registry.refused_online()


def online_profiles(client: BrokerClient, count: int, timeout: float) -> dict[str, dict]:
    """The ``hello`` of the first ``count`` online admitted devices (:func:`online_fleet`)."""
    return online_fleet(client, count, timeout)[0]
