"""Credentials and TLS against a real mosquitto and redis-server (docs/security.md).

A broker configured as ``harmony up --tls`` configures it (TLS device listener asking for client
certificates, client ids tied to user names, a certificate-only service listener, the per-device
ACL): a wrong password and a certificate of another CA are refused at connect; a cross-device
publish gets PUBACK reason code 0x87 and reaches no subscriber; a device cannot take over another
device's client id (the same attack succeeds on a listener without the fix); the production profile
refuses plaintext listeners. Then one ``harmony up --tls`` stack: Redis refuses connections without
the password, devices register over TLS and a tiny run trains through the stack and through
``harmony run --broker/--redis`` with explicit credentials, with no secret in its output or files.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import yaml
from typer.testing import CliRunner

from broker.client import BrokerClient, TlsSettings
from broker.errors import ConnectRefused, PublishDenied
from broker.mosquitto import (
    COMPOSE_CREDENTIALS,
    COMPOSE_DEVICE_PORT,
    COMPOSE_SERVICE_PORT,
    BrokerTls,
    MosquittoConfig,
    MosquittoProcess,
    ServiceListener,
    find_mosquitto,
    free_port,
    render_compose_config,
)
from broker.topics import Topics
from testbed.cli import app
from testbed.credentials import CredentialStore
from testbed.stack import load_stack
from tests.test_runtime_cli import TINY

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
NOT_AUTHORIZED = 0x87
BAD_LOGIN = 0x86
T = Topics()


def _broker(tmp: Path, store: CredentialStore, *, takeover_fix: bool = True) -> MosquittoProcess:
    cert, key = store.broker_certificate([])
    passwd, acl = store.write_broker_files()
    config = MosquittoConfig(
        port=0, password_file=passwd, acl_file=acl, use_username_as_clientid=takeover_fix,
        tls=BrokerTls(store.ca_file, cert, key, require_certificate=True),
        service_listener=ServiceListener(free_port(), BrokerTls(store.service_ca_file, cert, key,
                                                                require_certificate=True)))
    return MosquittoProcess(tmp, config).start()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tls")
    store = CredentialStore(tmp / "store")
    for device in ("emu-0", "emu-1"):
        store.add_device(device)
    for name in ("server", "orchestrator"):
        store.service_certificate(name)
    broker = _broker(tmp / "broker", store)
    yield store, broker
    broker.stop()


def _device(store: CredentialStore, broker: MosquittoProcess, device: str, *, client_id: str | None = None,
            password: str | None = None, tls: TlsSettings | None = None, **kw) -> BrokerClient:
    creds = store.device(device)
    tls = tls or TlsSettings(creds.ca_file, creds.cert_file, creds.key_file)
    return BrokerClient(client_id or f"agent-{device}", broker.host, broker.port, username=device,
                        password=creds.password if password is None else password, tls=tls, clean_start=True,
                        **kw)


def _orchestrator(store: CredentialStore, broker: MosquittoProcess) -> BrokerClient:
    cert, key = store.service_certificate("orchestrator")
    assert broker.config.service_listener is not None
    return BrokerClient(f"orchestrator-{uuid.uuid4().hex[:6]}", broker.host, broker.config.service_listener.port,
                        username="orchestrator", password=store.service_password("orchestrator"),
                        tls=TlsSettings(store.ca_file, cert, key), clean_start=True, session_expiry_s=0)


def _refused_in_handshake(client: BrokerClient, broker: MosquittoProcess, why: str) -> None:
    """``client`` gets no connection, and the broker logged that its TLS handshake failed for ``why``."""
    before = len(broker.log_path.read_text())
    with pytest.raises(ConnectRefused):
        client.connect(timeout=1.5)
    deadline = time.monotonic() + 5
    while why not in broker.log_path.read_text()[before:]:
        assert time.monotonic() < deadline, f"the broker did not log {why!r}:\n{broker.log_tail()}"
        time.sleep(0.05)


@pytest.mark.slow
def test_wrong_password_and_untrusted_certificates_are_refused(fleet, tmp_path):
    store, broker = fleet
    with pytest.raises(ConnectRefused) as refused:
        _device(store, broker, "emu-0", password="not-the-password").connect(timeout=5)
    assert refused.value.reason_code in (BAD_LOGIN, NOT_AUTHORIZED)  # mosquitto 2.0 answers 0x87
    other = CredentialStore(tmp_path / "another-ca")  # same device id, right password, another CA's certificate
    forged = other.add_device("emu-0")
    _refused_in_handshake(_device(store, broker, "emu-0", client_id="forged-cert",
                                  tls=TlsSettings(store.ca_file, forged.cert_file, forged.key_file)),
                          broker, "certificate verify failed")
    _refused_in_handshake(_device(store, broker, "emu-0", client_id="no-cert", tls=TlsSettings(store.ca_file)),
                          broker, "peer did not return a certificate")
    # a client that trusts another CA does not accept our broker's certificate
    _refused_in_handshake(_device(store, broker, "emu-0", client_id="wrong-ca",
                                  tls=TlsSettings(other.ca_file, forged.cert_file, forged.key_file)),
                          broker, "unknown ca")
    # a device's own certificate does not open the service listener (another CA signs the services')
    creds = store.device("emu-0")
    assert broker.config.service_listener is not None
    _refused_in_handshake(BrokerClient("session-emu-1-x", broker.host, broker.config.service_listener.port,
                                       username="emu-0", password=creds.password, clean_start=True,
                                       tls=TlsSettings(creds.ca_file, creds.cert_file, creds.key_file)),
                          broker, "certificate verify failed")
    ok = _device(store, broker, "emu-0", client_id="control")
    ok.connect(timeout=5)  # and the right credentials do connect
    ok.close()


@pytest.mark.slow
def test_cross_device_publish_is_refused_and_reaches_no_subscriber(fleet):
    store, broker = fleet
    attacker, watcher = _device(store, broker, "emu-0"), _orchestrator(store, broker)
    attacker.connect()
    watcher.connect()
    try:
        seen = watcher.subscribe(f"{T.prefix}/dev/emu-1/#")
        for topic in (T.up("emu-1"), T.hello("emu-1"), T.status("emu-1"), T.cmd("emu-1"), T.down("emu-1")):
            with pytest.raises(PublishDenied) as denied:
                attacker.publish_raw(topic, b"forged")
            assert denied.value.reason_code == NOT_AUTHORIZED, topic
        assert attacker.publish_raw(T.up("emu-0"), b"its own uplink").reason_code < 0x80
        watcher.publish_raw(T.up("emu-1"), b"marker")  # everything before it has been routed
        assert seen.get(timeout=10).payload == b"marker" and len(seen) == 0
    finally:
        attacker.close()
        watcher.close()


def _takeover(store: CredentialStore, broker: MosquittoProcess) -> tuple[BrokerClient, bool, bytes | None]:
    """emu-0 connects with emu-1's client id while emu-1 is online; returns (victim, whether the victim
    was kicked off, the command the victim then received)."""
    victim = _device(store, broker, "emu-1", device_id="emu-1")
    victim.connect()
    cmd = victim.subscribe(T.cmd("emu-1"))
    orchestrator = _orchestrator(store, broker)
    orchestrator.connect()
    attackers = [_device(store, broker, "emu-0", client_id=cid, reconnect_min_delay_s=0.1,
                         reconnect_max_delay_s=0.2) for cid in ("agent-emu-1", "emu-1")]
    try:
        for attacker in attackers:
            attacker.connect(timeout=5)
        time.sleep(1.0)  # an attacker that reconnects in a loop would have kicked the victim by now
        kicked = victim.disconnected_at is not None or victim.connect_count > 1
        if kicked:
            return victim, kicked, None
        orchestrator.publish_raw(T.cmd("emu-1"), b"round_start for emu-1")
        return victim, kicked, cmd.get(timeout=10).payload
    finally:
        for attacker in attackers:
            attacker.close()
        orchestrator.close()
        victim.close()


@pytest.mark.slow
def test_client_id_takeover_is_refused(fleet, tmp_path):
    store, broker = fleet
    victim, kicked, received = _takeover(store, broker)
    assert not kicked, "another device's login took over emu-1's client id"
    assert received == b"round_start for emu-1"
    # the same attack against a broker without use_username_as_clientid does kick the victim
    unfixed = _broker(tmp_path / "unfixed", store, takeover_fix=False)
    try:
        _, kicked, _ = _takeover(store, unfixed)
    finally:
        unfixed.stop()
    assert kicked


@pytest.mark.slow
def test_compose_broker_config_is_generated_and_serves_tls(tmp_path):
    """docker/mosquitto/mosquitto.conf is what broker.mosquitto generates, and a real mosquitto started on
    it (paths and ports moved to this machine) serves a device over TLS and the services on their listener."""
    text = (ROOT / "docker" / "mosquitto" / "mosquitto.conf").read_text()
    assert text == render_compose_config(), "regenerate docker/mosquitto/mosquitto.conf (see its header)"
    assert "allow_anonymous true" not in text and "use_username_as_clientid true" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("listener ")] == [
        str(COMPOSE_DEVICE_PORT), str(COMPOSE_SERVICE_PORT)]
    store_dir = tmp_path / "credentials"
    result = CliRunner().invoke(app, ["certs", "--dir", str(store_dir), "--host", "mosquitto", "--device", "pi4-0"])
    assert result.exit_code == 0, result.output
    store = CredentialStore(store_dir)
    device_port, service_port = free_port(), free_port()
    text = (text.replace(COMPOSE_CREDENTIALS, str(store_dir)).replace("/mosquitto/data", str(tmp_path / "data"))
            .replace(f"listener {COMPOSE_DEVICE_PORT} 0.0.0.0", f"listener {device_port} 127.0.0.1")
            .replace(f"listener {COMPOSE_SERVICE_PORT} 0.0.0.0", f"listener {service_port} 127.0.0.1")
            .replace("log_dest stdout", "log_dest stderr"))  # stdout is block-buffered into a file
    if os.geteuid() == 0:  # as root mosquitto would switch to the user "mosquitto"
        text = f"user {getpass.getuser()}\n" + text
    (tmp_path / "data").mkdir()
    broker = MosquittoProcess(tmp_path / "run", MosquittoConfig(host="127.0.0.1", port=device_port))
    broker.run_dir.mkdir()
    broker.config_path.write_text(text)
    with open(broker.log_path, "ab") as log:
        broker._process = subprocess.Popen([find_mosquitto(), "-c", str(broker.config_path)], stdout=log,
                                           stderr=subprocess.STDOUT)
    try:
        broker.wait_ready()
        creds = store.device("pi4-0")
        device = BrokerClient("agent-pi4-0", "127.0.0.1", device_port, username="pi4-0", password=creds.password,
                              tls=TlsSettings(creds.ca_file, creds.cert_file, creds.key_file), clean_start=True)
        cert, key = store.service_certificate("server")
        server = BrokerClient("session-x", "127.0.0.1", service_port, username="server",
                              password=store.service_password("server"), tls=TlsSettings(store.ca_file, cert, key),
                              clean_start=True)
        device.connect()
        server.connect()
        try:
            ups = server.subscribe(T.up("pi4-0"))
            device.publish_raw(T.up("pi4-0"), b"features")
            assert ups.get(timeout=10).payload == b"features"
        finally:
            device.close()
            server.close()
        assert "as pi4-0 (p5" in broker.log_path.read_text()  # the client id is the user name
    finally:
        broker.stop()


def test_production_profile_refuses_plaintext(tmp_path):
    with pytest.raises(ValueError, match="production profile: listener 1883 .* plaintext.*--tls"):
        MosquittoConfig(profile="production", password_file="p").render()
    with pytest.raises(ValueError, match="anonymous"):
        MosquittoConfig(profile="production", tls=BrokerTls("c", "s", "k")).render()
    result = CliRunner().invoke(app, ["up", "--profile", "production", "--run-dir", str(tmp_path / "stack")])
    assert result.exit_code == 2 and "--tls" in result.output
    assert not (tmp_path / "stack").exists()  # nothing started


@pytest.mark.slow
def test_up_tls_trains_over_tls_and_redis_needs_its_password(tmp_path):
    runner = CliRunner()
    stack_dir, cfg_path = tmp_path / "stack", tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["up", "--tls", "--profile", "production", "--agents", "1", "--devices-per-agent",
                                 "4", "--torch-threads", "1", "--run-dir", str(stack_dir)])
    assert result.exit_code == 0, result.output
    info = load_stack(stack_dir)
    store = CredentialStore(info.store)
    secrets = [store.service_password(n) for n in ("server", "orchestrator", "redis")]
    secrets += [store.device(d).password for d in info.devices]
    try:
        assert info.tls and "redis://harmony:***@" in result.output
        conf = (stack_dir / "mosquitto.conf").read_text()
        assert "allow_anonymous true" not in conf and conf.count("require_certificate true") == 2
        # redis-py 5 opens with HELLO: refused as "NOAUTH"/"must be called with the client already authenticated"
        with pytest.raises((redis.exceptions.ResponseError, redis.exceptions.AuthenticationError),
                           match="NOAUTH|authenticated"):
            redis.Redis(port=info.redis_port).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=info.redis_port, username="harmony", password="guess").ping()
        assert redis.Redis.from_url(info.redis_url).ping()

        result = runner.invoke(app, ["fleet", "plan", str(cfg_path), "--stack", str(stack_dir), "--json",
                                     "--wait", "60"])  # the stack's service listener, with its certificate
        assert result.exit_code == 0, result.output
        assert sorted(json.loads(line)["device"] for line in result.output.splitlines()) == info.devices
        result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--stack", str(stack_dir),
                                     "--out", str(tmp_path / "a")])
        assert result.exit_code == 0, result.output
        doc = json.loads((tmp_path / "a" / "results.json").read_text())
        assert doc["runtime"] == "distributed" and doc["devices"] == ["emu-0", "emu-1", "emu-2", "emu-3"]

        # the same fleet driven from outside: credentials and TLS on the command line, Redis password in the URL
        cert, key = store.service_certificate("orchestrator")
        host, port = info.service_mqtt
        result = runner.invoke(app, [
            "run", str(cfg_path), "--runtime", "distributed", "--broker", f"{host}:{port}", "--redis", info.redis_url,
            "--credentials", info.credentials["orchestrator"], "--cafile", str(store.ca_file), "--certfile",
            str(cert), "--keyfile", str(key), "--out", str(tmp_path / "b")])
        assert result.exit_code == 0, result.output
        losses = [(r["train_loss_exit"], r["train_loss_server"]) for r in doc["rounds"]]
        again = json.loads((tmp_path / "b" / "results.json").read_text())["rounds"]
        assert [(r["train_loss_exit"], r["train_loss_server"]) for r in again] == losses
        result = runner.invoke(app, [  # a wrong Redis password: a clear error, the password not echoed
            "run", str(cfg_path), "--runtime", "distributed", "--broker", f"{host}:{port}", "--redis",
            f"redis://harmony:wrong-password@127.0.0.1:{info.redis_port}/0", "--credentials",
            info.credentials["orchestrator"], "--cafile", str(store.ca_file), "--certfile", str(cert), "--keyfile",
            str(key), "--out", str(tmp_path / "c")])
        assert result.exit_code == 2 and "redis://harmony:***@" in result.output, result.output
        assert "wrong-password" not in result.output
    finally:
        assert runner.invoke(app, ["down", "--run-dir", str(stack_dir)]).exit_code == 0
    log = (stack_dir / "mosquitto.log").read_text()
    assert "as emu-0 (p5" in log and "u'server'" in log  # devices by their user name; services on TLS
    written = [result.output] + [p.read_text(errors="replace") for p in (tmp_path / "a").iterdir() if p.suffix in
                                 (".json", ".csv")] + [p.read_text(errors="replace") for p in stack_dir.glob("*.log")]
    written.append((stack_dir / "stack.json").read_text())
    for secret in secrets:
        assert not any(secret in text for text in written), "a secret in the output, results or logs"


@pytest.mark.slow
def test_tls_connect_benchmark_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/tls_connect.py", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "tls_connect" and result["connections"] == 3
    assert 0 < result["plain_ms"]["median"] and 0 < result["mtls_ms"]["median"]
