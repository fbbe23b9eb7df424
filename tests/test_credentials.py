"""The credential store (testbed/credentials.py) and `harmony certs` / `harmony fleet add`: a CA, a broker
certificate whose SAN covers its hosts, per-device passwords and client certificates (CN = device id),
private files 0600, idempotent unless rotated, and the broker and Redis files generated from it."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from broker.mosquitto import verify_password
from testbed.cli import app
from testbed.credentials import CredentialError, CredentialStore


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path) -> str:
    return oct(path.stat().st_mode & 0o777)


def test_ca_and_broker_certificate(tmp_path):
    store = CredentialStore(tmp_path / "creds")
    ca_path = store.ensure_ca()
    assert _mode(store.ca_key_file) == "0o600" and _mode(tmp_path / "creds") == "0o700"
    ca = _cert(ca_path)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert store.ensure_ca() == ca_path and _cert(ca_path) == ca  # idempotent: the same CA

    cert_path, key_path = store.broker_certificate(["broker.lan", "10.0.0.7"])
    assert _mode(key_path) == "0o600"
    cert = _cert(cert_path)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.lan"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("10.0.0.7")}
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # kept while it covers what is asked; issued again for a new host
    assert store.broker_certificate(["broker.lan"]) == (cert_path, key_path) and _cert(cert_path) == cert
    store.broker_certificate(["other.lan"])
    assert "other.lan" in _cert(cert_path).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_device_credentials(tmp_path):
    store = CredentialStore(tmp_path)
    with pytest.raises(CredentialError, match="harmony fleet add pi4-01"):
        store.device("pi4-01")
    creds = store.add_device("pi4-01")
    folder = tmp_path / "devices" / "pi4-01"
    assert creds.cert_file == folder / "client.crt" and creds.key_file == folder / "client.key"
    assert creds.ca_file == folder / "ca.crt" and creds.ca_file.read_bytes() == store.ca_file.read_bytes()
    assert _mode(folder / "password") == "0o600" and _mode(creds.key_file) == "0o600"
    assert len(creds.password) >= 24
    cert = _cert(creds.cert_file)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi4-01"
    cert.verify_directly_issued_by(_cert(store.ca_file))
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:harmony-testbed:device:pi4-01"]

    again = store.add_device("pi4-01")  # idempotent
    assert again == creds and _cert(again.cert_file) == cert
    rotated = store.add_device("pi4-01", rotate=True)
    assert rotated.password != creds.password and _cert(rotated.cert_file) != cert

    plain = store.add_device("zero-1", tls=False)
    assert plain.cert_file is None and plain.key_file is None and plain.ca_file is None
    assert store.devices() == ["pi4-01", "zero-1"]
    for bad in ("a/b", "", "server"):
        with pytest.raises(CredentialError, match="device id"):
            store.add_device(bad)
    assert store.devices() == ["pi4-01", "zero-1"]  # bad input changed nothing


def test_broker_and_redis_files(tmp_path):
    store = CredentialStore(tmp_path)
    devices = {d: store.add_device(d, tls=False).password for d in ("emu-0", "emu-1")}
    server = store.service_password("server")
    assert store.service_password("server") == server  # made once
    with pytest.raises(CredentialError, match="server, orchestrator, redis"):
        store.service_password("admin")
    passwd, acl = store.write_broker_files()
    assert _mode(passwd) == _mode(acl) == _mode(store.redis_acl_file) == "0o600"
    hashes = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
    assert sorted(hashes) == ["emu-0", "emu-1", "orchestrator", "server"]
    assert all(verify_password(pw, hashes[d]) for d, pw in devices.items())
    assert not verify_password(devices["emu-0"], hashes["emu-1"])
    assert verify_password(server, hashes["server"])
    assert "pattern write hsfl/v1/dev/%u/up" in acl.read_text()
    redis_acl = store.redis_acl_file.read_text()
    assert "user default off" in redis_acl
    digest = hashlib.sha256(store.service_password("redis").encode()).hexdigest()
    assert f"user harmony on #{digest} " in redis_acl and store.service_password("redis") not in redis_acl
    assert store.redis_url(port=7000) == f"redis://harmony:{store.service_password('redis')}@127.0.0.1:7000/0"


def test_openssl_accepts_the_certificates(tmp_path):
    """A real TLS handshake on loopback: the client trusts the broker certificate for 127.0.0.1 through the
    store's CA, and the server verifies the device's client certificate."""
    store = CredentialStore(tmp_path)
    cert, key = store.broker_certificate([])
    device = store.add_device("emu-0")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.load_verify_locations(store.ca_file)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(device.ca_file))
    client_ctx.load_cert_chain(device.cert_file, device.key_file)
    seen: dict[str, object] = {}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve)
        thread.start()
        with socket.create_connection(listener.getsockname()) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.recv(2) == b"ok"
        thread.join(10)
    assert dict(x[0] for x in seen["peer"]["subject"])["commonName"] == "emu-0"


def test_cli_certs_and_fleet_add(tmp_path):
    runner = CliRunner()
    store_dir = tmp_path / "store"
    result = runner.invoke(app, ["certs", "--dir", str(store_dir), "--host", "broker.lan", "--device", "pi4-01"])
    assert result.exit_code == 0, result.output
    store = CredentialStore(store_dir)
    assert store.ca_file.is_file() and (store_dir / "broker.crt").is_file() and store.devices() == ["pi4-01"]
    env = store_dir / "services" / "server.env"  # compose's env_file for the worker
    assert _mode(env) == "0o600"
    assert f"HSFL_REDIS_URL=redis://harmony-worker:{store.service_password('redis-worker')}@redis:6379/0" in \
        env.read_text()  # the workers' own Redis user (testbed.credentials.REDIS_ROLES)
    monitor_env = (store_dir / "services" / "monitor.env").read_text()
    assert monitor_env == f"HARMONY_REDIS_PASSWORD={store.service_password('redis-monitor')}\n"
    assert store.service_password("redis") not in result.output
    result = runner.invoke(app, ["fleet", "add", "jetson-1", "--dir", str(store_dir)])
    assert result.exit_code == 0, result.output
    creds = store.device("jetson-1")
    assert creds.cert_file is not None and creds.password not in result.output  # never echo a secret
    assert "jetson-1:" in store.password_file.read_text()  # the broker's files know the new device
    before = (store_dir / "devices" / "jetson-1" / "password").read_text()
    assert runner.invoke(app, ["fleet", "add", "jetson-1", "--dir", str(store_dir)]).exit_code == 0
    assert (store_dir / "devices" / "jetson-1" / "password").read_text() == before
    result = runner.invoke(app, ["fleet", "remove", "jetson-1", "--dir", str(store_dir)])
    assert result.exit_code == 0, result.output
    assert store.devices() == ["pi4-01"] and "jetson-1:" not in store.password_file.read_text()
    result = runner.invoke(app, ["fleet", "remove", "jetson-1", "--dir", str(store_dir)])
    assert result.exit_code == 2 and "harmony fleet add jetson-1" in result.output
    result = runner.invoke(app, ["fleet", "add", "bad/id", "--dir", str(store_dir)])
    assert result.exit_code == 2 and "device id" in result.output


def test_redis_password_from_the_environment(monkeypatch):
    from testbed.cli import _redis_with_password

    monkeypatch.setenv("HARMONY_REDIS_PASSWORD", "s3cret")
    assert _redis_with_password("redis://harmony@redis:6379/0") == "redis://harmony:s3cret@redis:6379/0"
    assert _redis_with_password("redis://harmony:given@redis:6379/0") == "redis://harmony:given@redis:6379/0"
    assert _redis_with_password("redis://redis:6379/0") == "redis://redis:6379/0"
