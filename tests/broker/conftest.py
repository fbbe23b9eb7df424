"""Fixtures for the wire-layer tests: real Mosquitto processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker_samples import PASSWORDS

from broker.client import BrokerClient
from broker.mosquitto import MosquittoConfig, MosquittoProcess, hash_password, write_acl_file, write_password_file


def start_broker(run_dir: Path, **config: object) -> MosquittoProcess:
    return MosquittoProcess(run_dir, MosquittoConfig(port=0, **config)).start()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """An anonymous broker (no persistence) shared by a test module."""
    process = start_broker(tmp_path_factory.mktemp("mosquitto"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """A broker with a password file and the generated ACL.

    Device ``a``'s hash comes from ``hash_password`` (our PBKDF2-SHA512 ``$7$`` implementation), the
    others from ``mosquitto_passwd`` when it is installed, so connecting as ``a`` checks our format
    against the real mosquitto.
    """
    run_dir = tmp_path_factory.mktemp("secured")
    others = {k: v for k, v in PASSWORDS.items() if k != "a"}
    password_file = write_password_file(run_dir / "passwd", others)
    with open(password_file, "a") as handle:
        handle.write(f"a:{hash_password(PASSWORDS['a'])}\n")
    acl_file = write_acl_file(run_dir / "acl")
    process = start_broker(run_dir, password_file=password_file, acl_file=acl_file)
    yield process
    process.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., BrokerClient]]:
    """Factory of connected ``BrokerClient``s (unique client ids), closed with their sessions at teardown."""
    clients: list[BrokerClient] = []

    def make(port: int, name: str = "c", *, connect: bool = True, **kwargs: object) -> BrokerClient:
        kwargs.setdefault("reconnect_min_delay_s", 0.1)
        kwargs.setdefault("reconnect_max_delay_s", 0.5)
        client_id = kwargs.pop("client_id", None) or f"{name}-{uuid.uuid4().hex[:8]}"
        client = BrokerClient(str(client_id), port=port, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        if connect:
            client.connect(timeout=5)
        return client

    yield make
    for client in clients:
        client.close(timeout=1, end_session=True)
