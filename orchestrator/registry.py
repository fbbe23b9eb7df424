"""Device registry: ``hello`` (retained) and ``status`` messages into Redis ``hsfl:dev:{id}``."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time

from broker.client import BrokerClient
from broker.codec import check_origin
from broker.errors import WireError
from server import state

log = logging.getLogger(__name__)


def natural_key(device_id: str) -> list[object]:
    """``emu-2`` before ``emu-10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", device_id)]


class Registry:
    """Collects hello/status from the broker and records them in Redis (``r``; None: only in memory)."""

    def __init__(self, client: BrokerClient, r: object | None) -> None:
        self.client, self.r = client, r
        self.hello = client.subscribe(client.topics.all_devices("hello"))
        self.status = client.subscribe(client.topics.all_devices("status"))
        self.online: dict[str, bool] = {}
        self.status_ts: dict[str, float] = {}
        """Device → the send time of its latest status (an agent announces one on every connect)."""
        self.profiles: dict[str, dict] = {}

    def poll(self, timeout: float = 0.2) -> None:
        """Drain what arrived (waiting up to ``timeout`` for the first message)."""
        deadline = time.monotonic() + timeout
        for sub in (self.hello, self.status):
            while True:
                message = sub.get_nowait()
                if message is None:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.02)
                    continue
                if not message.payload:
                    continue
                try:
                    env = message.decode()
                    check_origin(env, self.client.topics.parse(message.topic))
                except WireError as err:
                    log.warning("registry: dropped %s: %s", message.topic, err)
                    continue
                dev = env.dev
                if env.kind == "hello":
                    profile = dataclasses.asdict(env.body)
                    self.profiles[dev] = profile
                    if self.r is not None:
                        self.r.hset(state.dev_key(dev), mapping={"profile": json.dumps(profile)})  # type: ignore
                        self.r.sadd(state.devices_key(), dev)  # type: ignore[attr-defined]
                elif env.kind == "status":
                    self.online[dev] = env.body.state != "offline"
                    self.status_ts[dev] = max(env.ts, self.status_ts.get(dev, 0.0))
                    if self.r is not None:
                        self.r.hset(state.dev_key(dev), mapping={"status": env.body.state})  # type: ignore

    def started_at(self, dev: str) -> float | None:
        """When the agent process of ``dev`` started, as its latest ``hello`` says (None if unknown)."""
        value = self.profiles.get(dev, {}).get("started_at")
        return None if value is None else float(value)

    def available(self) -> list[str]:
        """Registered devices whose last status is not ``offline``, in natural order."""
        return sorted((d for d in self.profiles if self.online.get(d, False)), key=natural_key)

    def wait_for(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            devices = self.available()
            if len(devices) >= count:
                return devices
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(devices)} device(s) online ({devices}) but the config needs {count}; "
                                   "start more agents (harmony up --agents N)")


def online_profiles(client: BrokerClient, count: int, timeout: float) -> dict[str, dict]:
    """The ``hello`` of the first ``count`` online devices (natural order, as a run picks them),
    read from the broker's retained messages; fewer if fewer are online after ``timeout`` seconds."""
    registry = Registry(client, None)
    try:
        devices = registry.wait_for(count, timeout)
    except TimeoutError:
        devices = registry.available()
    return {dev: registry.profiles[dev] for dev in devices[:count]}
