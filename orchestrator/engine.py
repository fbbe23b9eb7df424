"""The distributed runtime's engine: the one round loop of :mod:`harmony.engine` over a
:class:`~orchestrator.fleet.MqttCeleryFleet` (agents over MQTT, Celery session tasks, Redis
buffers). The runtimes differ only in their fleets; this module only builds one.

The planner runs here (the ``harmony run`` process): it reads the dataset's label files to cut
it into clients and hands each device only its own index lists; the workers get a manifest
without any (``harmony.experiment``).
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path

from broker.client import TlsSettings
from broker.topics import Topics
from harmony.config import ExperimentConfig
from harmony.engine import Engine
from harmony.experiment import Experiment
from harmony.fleet import ProgressFn
from harmony.rounds import RoundFailedError
from orchestrator.fleet import ROUND_TIMEOUT_S, MqttCeleryFleet

__all__ = ["DistributedEngine", "RoundFailedError"]


class DistributedEngine(Engine):
    """Runs an experiment over a running stack (Mosquitto, Redis, Celery workers, agents).
    ``data_dir``: where the dataset's label files are on this host (over ``data.data_dir``);
    ``known_devices``: the only devices the registry admits (a stack's own; None: any)."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None = None, progress: ProgressFn | None = None,
                 *, mqtt: tuple[str, int], redis_url: str, topics: Topics | None = None,
                 username: str | None = None, password: str | None = None, tls: TlsSettings | None = None,
                 devices_timeout_s: float = 120.0,
                 round_timeout_s: float = ROUND_TIMEOUT_S, data_dir: str | None = None,
                 known_devices: Container[str] | None = None) -> None:
        experiment = Experiment.plan(cfg, data_dir)
        fleet = MqttCeleryFleet(experiment, mqtt=mqtt, redis_url=redis_url, topics=topics, username=username,
                                password=password, tls=tls, devices_timeout_s=devices_timeout_s,
                                round_timeout_s=round_timeout_s, known_devices=known_devices,
                                run_label={"out": str(Path(out_dir).resolve()) if out_dir is not None else None})
        super().__init__(experiment, fleet, out_dir, progress)
        self.device_ids = fleet.device_ids
