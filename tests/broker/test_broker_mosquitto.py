"""Mosquitto config, password and ACL generation, checked against a real mosquitto where it matters."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from broker_samples import PASSWORDS

from broker.client import BrokerClient, TlsSettings
from broker.errors import ConnectRefused, PublishDenied
from broker.mosquitto import (
    BrokerTls,
    MosquittoConfig,
    MosquittoProcess,
    hash_password,
    render_acl,
    verify_password,
    write_password_file,
)
from broker.topics import DEFAULT_TOPICS as T
from harmony.algorithms.messages import FeaturesUp

pytestmark = pytest.mark.timeout(120)  # live broker: fail fast rather than hang the suite

def features(step: int) -> FeaturesUp:
    return FeaturesUp(step=step, depth=2, features=torch.full((2, 3), float(step), dtype=torch.float16))


def test_config_lines(tmp_path: Path) -> None:
    text = MosquittoConfig(
        host="0.0.0.0", port=8883, persistence=True, persistence_dir=tmp_path / "db", password_file=tmp_path / "pw",
        acl_file=tmp_path / "acl", tls=BrokerTls("ca.crt", "server.crt", "server.key", require_certificate=True),
        max_packet_size=9_000_000,
    ).render().splitlines()
    for line in ["listener 8883 0.0.0.0", "set_tcp_nodelay true", "allow_anonymous false",
                 f"password_file {tmp_path / 'pw'}", f"acl_file {tmp_path / 'acl'}", "persistence true",
                 f"persistence_location {tmp_path / 'db'}/", "cafile ca.crt", "certfile server.crt",
                 "keyfile server.key", "require_certificate true", "max_packet_size 9000000"]:
        assert line in text
    plain = MosquittoConfig().render().splitlines()
    assert "allow_anonymous true" in plain and "persistence false" in plain and "log_dest stderr" in plain
    assert not any(line.startswith(("cafile", "password_file", "acl_file")) for line in plain)
    with pytest.raises(ValueError, match="persistence_dir"):
        MosquittoConfig(persistence=True).render()


def test_acl_confines_devices_to_their_topics() -> None:
    acl = render_acl("lab/x", servers=["server"], orchestrators=["orch"], monitors=["grafana"]).splitlines()
    for line in ["pattern write lab/x/dev/%u/up", "pattern read lab/x/dev/%u/down", "pattern read lab/x/dev/%u/cmd",
                 "pattern readwrite lab/x/dev/%u/status", "pattern write lab/x/dev/%u/hello",
                 "user server", "topic read lab/x/dev/+/up", "topic write lab/x/dev/+/down", "user orch",
                 "topic readwrite lab/x/#", "user grafana", "topic read lab/x/events"]:
        assert line in acl
    assert not any(line.startswith("pattern") and "+" in line for line in acl)


def test_our_hash_format_matches_mosquitto_passwd(tmp_path: Path) -> None:
    encoded = hash_password("s3cret", salt=b"0123456789ab")
    assert encoded.startswith("$7$101$MDEyMzQ1Njc4OWFi$") and verify_password("s3cret", encoded)
    assert not verify_password("wrong", encoded)
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed (the live broker test still checks our format)")
    path = write_password_file(tmp_path / "pw", {"dev1": "s3cret", "dev2": "other"}, use_tool=True)
    lines = dict(line.split(":", 1) for line in path.read_text().splitlines())
    assert verify_password("s3cret", lines["dev1"]) and verify_password("other", lines["dev2"])
    assert path.stat().st_mode & 0o077 == 0
    ours = write_password_file(tmp_path / "pw2", {"dev1": "s3cret"}, use_tool=False).read_text()
    assert verify_password("s3cret", ours.strip().split(":", 1)[1])


# --------------------------------------------------------------------------- live broker
def connect_as(make_client: Callable[..., BrokerClient], broker: MosquittoProcess, user: str,
               **kwargs: object) -> BrokerClient:
    return make_client(broker.port, user, username=user, password=PASSWORDS[user], **kwargs)


@pytest.mark.slow
def test_acl_stops_a_device_writing_another_devices_topic(
        secured_broker: MosquittoProcess, make_client: Callable[..., BrokerClient]) -> None:
    server = connect_as(make_client, secured_broker, "server")
    ingress = server.subscribe(T.all_devices("up"))
    device_a = connect_as(make_client, secured_broker, "a", device_id="a")  # a's hash is ours ($7$, hashlib)
    with pytest.raises(PublishDenied) as err:
        device_a.send(T.up("b"), features(1), dev="b")
    assert err.value.reason_code == 0x87 and err.value.topic == "hsfl/v1/dev/b/up"
    assert "Not authorized" in str(err.value)
    device_a.send(T.up("a"), features(2))  # allowed; delivered after the denied one would have been
    first = ingress.get(timeout=5)
    assert first.topic == "hsfl/v1/dev/a/up" and first.decode().body.step == 2
    assert ingress.get_nowait() is None
    with pytest.raises(PublishDenied):  # devices cannot impersonate the server either
        device_a.send(T.down("b"), features(3), dev="b")


@pytest.mark.slow
def test_devices_read_only_their_own_downlink(
        secured_broker: MosquittoProcess, make_client: Callable[..., BrokerClient]) -> None:
    device_a = connect_as(make_client, secured_broker, "a")
    snoop = device_a.subscribe(T.all_devices("down"))  # mosquitto 2.0 grants the SUBSCRIBE, then filters by ACL
    server = connect_as(make_client, secured_broker, "server")
    server.send(T.down("b"), features(5))
    server.send(T.down("a"), features(6))
    message = snoop.get(timeout=5)
    assert message.topic == "hsfl/v1/dev/a/down" and snoop.get_nowait() is None


@pytest.mark.slow
def test_bad_credentials_are_refused(secured_broker: MosquittoProcess,
                                     make_client: Callable[..., BrokerClient]) -> None:
    with pytest.raises(ConnectRefused) as err:
        make_client(secured_broker.port, "a", username="a", password="nope")
    assert err.value.reason_code in (0x86, 0x87)
    with pytest.raises(ConnectRefused):
        make_client(secured_broker.port, "anon")


@pytest.mark.slow
def test_process_stop_restart_by_pid(tmp_path: Path) -> None:
    process = MosquittoProcess(tmp_path).start()
    pid, port = process.pid, process.port
    assert process.is_running() and port > 0
    process.restart()
    assert process.port == port and process.pid != pid and process.is_running()
    assert process.stop() == 0 and not process.is_running()
    assert "mosquitto version" in process.log_tail() and process.stop() is None
    broken = MosquittoProcess(tmp_path / "bad", MosquittoConfig(port=0, extra_lines=("no_such_option 1",)))
    with pytest.raises(Exception, match="exited during start-up"):
        broken.start(timeout=5)


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=hsfl-test-ca")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_listener(tmp_path: Path, make_client: Callable[..., BrokerClient]) -> None:
    ca, cert, key = _make_certificates(tmp_path)
    process = MosquittoProcess(tmp_path / "run", MosquittoConfig(port=0, tls=BrokerTls(ca, cert, key))).start()
    try:
        client = make_client(process.port, "tls", tls=TlsSettings(ca_certs=ca))
        inbox = client.subscribe(T.up("t"))
        client.send(T.up("t"), features(4))
        assert inbox.wait_for("features", timeout=5).body.step == 4
        with pytest.raises(ConnectRefused):  # plain MQTT on the TLS port gets no CONNACK
            make_client(process.port, "plain", connect=False).connect(timeout=1)
    finally:
        process.stop()
