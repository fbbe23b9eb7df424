"""The credential store of a fleet: a CA, the broker's certificate, each device's password and client
certificate, the service passwords, and the broker's and Redis's files generated from them.

``harmony certs --dir DIR`` and ``harmony fleet add ID --dir DIR`` (testbed/cli.py) and
``harmony up --tls`` (testbed/stack.py) use it; docs/security.md describes it. Layout::

    DIR/ca.crt, ca.key (0600)                the fleet's CA (EC P-256, 10 years)
    DIR/broker.crt, broker.key (0600)        the broker's server certificate (SAN: its hosts, 127.0.0.1, localhost)
    DIR/devices/ID/password (0600)           the device's broker password (user name = device id)
    DIR/devices/ID/ca.crt, client.crt, client.key (0600)   with TLS: the CA and the device's client
                                             certificate (CN = device id, clientAuth)
    DIR/services/NAME.password (0600)        ``server`` (Celery workers), ``orchestrator``, ``redis`` (the
                                             Redis user ``harmony``), ``redis-worker``, ``redis-registry``,
                                             ``redis-monitor`` (one Redis user per service role)
    DIR/services/ca.crt, ca.key (0600)       the services CA: signs only the services' client certificates
    DIR/services/NAME.crt, NAME.key (0600)   ``server``'s and ``orchestrator``'s client certificates, which the
                                             broker's service listener asks for (docs/security.md)
    DIR/services/server.env, orchestrator.env, orchestrator.login, monitor.env (0600)
                                             the services' secrets for docker/compose.yaml (env_file)
    DIR/mosquitto.passwd (0600)              every device and the two service users (mosquitto $7$ hashes)
    DIR/mosquitto.acl (0600)                 the per-device ACL of ``broker.mosquitto.render_acl``
    DIR/redis.acl (0600)                     Redis ACL: ``default`` off, one user per service role
                                             (``REDIS_ROLES``; passwords hashed)

A device's directory is all a board needs (``harmony flash`` copies it). Everything is created once
and kept: running a command again changes nothing unless ``rotate`` asks for a new password and
certificate.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import WireError
from broker.mosquitto import render_acl, write_password_file
from broker.topics import validate_device_id

log = logging.getLogger(__name__)

SERVICES = ("server", "orchestrator", "redis", "redis-worker", "redis-registry", "redis-monitor")
"""Service names of :meth:`CredentialStore.service_password`: the broker users of the Celery workers and
the orchestrator, and the Redis users of :data:`REDIS_ROLES` (``harmony``'s password is ``redis``'s)."""
REDIS_USER = "harmony"
_NOT_ADMIN = "-@admin -@dangerous"
REDIS_ROLES: dict[str, tuple[str, str, str]] = {
    # role: (Redis user, its password's service name, its ACL rules)
    "driver": (REDIS_USER, "redis", f"~* &* +@all {_NOT_ADMIN}"),
    "worker": ("harmony-worker", "redis-worker", f"~* &* +@all {_NOT_ADMIN}"),
    "registry": ("harmony-registry", "redis-registry",
                 f"resetchannels ~hsfl:dev:* ~hsfl:devices ~hsfl:events +@connection +@read +@write +@stream "
                 f"{_NOT_ADMIN}"),
    "monitor": ("harmony-monitor", "redis-monitor", f"resetchannels ~hsfl:* +@connection +@read {_NOT_ADMIN}"),
}
"""Least privilege in Redis: the driver (``harmony run``: round state, models, Celery tasks) and the
Celery workers may use every key but no administrative or dangerous command (``CONFIG``,
``FLUSHALL``, ``KEYS``, ``DEBUG``, ``SHUTDOWN``, ``ACL``, …); the registry writes only the devices'
hashes, the device set and the event stream; the monitor only reads the ``hsfl:`` keys."""
CA_DAYS = 3650
CERT_DAYS = 825
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


class CredentialError(ValueError):
    """A credential the command needs is missing or invalid; the message names the fix."""


@dataclass(frozen=True)
class DeviceCredentials:
    """What one device needs to log in: its password and, with TLS, the CA and its client certificate."""

    device_id: str
    password: str
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None


def _write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` with mode 0600 from the start (no moment where others may read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(0o600)
    return path


def _write_public(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class CredentialStore:
    """The credential store rooted at ``root`` (created with mode 0700); see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------------------ paths
    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key_file(self) -> Path:
        return self.root / "ca.key"

    @property
    def service_ca_file(self) -> Path:
        return self.root / "services" / "ca.crt"

    @property
    def service_ca_key_file(self) -> Path:
        return self.root / "services" / "ca.key"

    @property
    def password_file(self) -> Path:
        return self.root / "mosquitto.passwd"

    @property
    def acl_file(self) -> Path:
        return self.root / "mosquitto.acl"

    @property
    def redis_acl_file(self) -> Path:
        return self.root / "redis.acl"

    def device_dir(self, device_id: str) -> Path:
        return self.root / "devices" / device_id

    def _mkroot(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)

    # ------------------------------------------------------------------------------ CA
    def _load_ca(self, services: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        ca_file = self.ensure_service_ca() if services else self.ensure_ca()
        key_file = self.service_ca_key_file if services else self.ca_key_file
        cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def ensure_ca(self) -> Path:
        """DIR/ca.crt (and DIR/ca.key, 0600), made on the first call and kept afterwards."""
        return self._ensure_ca(self.ca_file, self.ca_key_file, "harmony-testbed CA")

    def ensure_service_ca(self) -> Path:
        """DIR/services/ca.crt (+ ca.key): a second CA that signs only the services' client certificates,
        so that the broker's service listener (``require_certificate``, this CA) admits no device."""
        return self._ensure_ca(self.service_ca_file, self.service_ca_key_file, "harmony-testbed services CA")

    def _ensure_ca(self, ca_file: Path, ca_key_file: Path, title: str) -> Path:
        if ca_file.is_file() and ca_key_file.is_file():
            return ca_file
        if ca_file.exists() != ca_key_file.exists():
            raise CredentialError(f"{ca_file.parent}: one of {ca_file.name}/{ca_key_file.name} is missing; restore "
                                  "it, or remove both (and every certificate they signed) and run `harmony certs` "
                                  "again")
        self._mkroot()
        ca_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "harmony-testbed"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{title} {secrets.token_hex(4)}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(ca_key_file, _key_pem(key))
        _write_public(ca_file, cert.public_bytes(serialization.Encoding.PEM))
        log.info("made a CA in %s", ca_file)
        return ca_file

    def _issue(self, common_name: str, san: list[x509.GeneralName], usage: x509.ObjectIdentifier,
               cert_path: Path, key_path: Path, *, services: bool = False) -> None:
        ca_cert, ca_key = self._load_ca(services)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "harmony-testbed"),
                                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=True,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def _signed_by_ca(self, cert_path: Path, ca_file: Path | None = None) -> x509.Certificate | None:
        """The certificate at ``cert_path`` if it exists and this store's CA (or ``ca_file``) issued it."""
        if not cert_path.is_file():
            return None
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        ca = x509.load_pem_x509_certificate((ca_file or self.ca_file).read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError):
            return None
        return cert

    def broker_certificate(self, hosts: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
        """DIR/broker.crt and DIR/broker.key for ``hosts`` (names or IP addresses; 127.0.0.1 and
        localhost always). Kept when it already covers them, issued again otherwise."""
        wanted = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
        for host in wanted:
            if not host or any(c.isspace() for c in host):
                raise CredentialError(f"broker host {host!r}: expected a DNS name or an IP address")
        self.ensure_ca()
        cert_path, key_path = self.root / "broker.crt", self.root / "broker.key"
        current = self._signed_by_ca(cert_path) if key_path.is_file() else None
        if current is not None:
            san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if all(_san_entry(h) in san for h in wanted):
                return cert_path, key_path
        common_name = next((h for h in wanted if h not in DEFAULT_HOSTS), "localhost")
        self._issue(common_name, [_san_entry(h) for h in wanted], ExtendedKeyUsageOID.SERVER_AUTH, cert_path, key_path)
        log.info("issued the broker certificate for %s", ", ".join(wanted))
        return cert_path, key_path

    # ------------------------------------------------------------------------------ devices
    def _check_device_id(self, device_id: str) -> str:
        try:
            validate_device_id(device_id, "device id")
        except WireError as err:
            raise CredentialError(f"device id {device_id!r}: expected 1-64 of A-Z a-z 0-9 _ -") from err
        if device_id in SERVICES:
            raise CredentialError(f"device id {device_id!r} is a service's user name ({', '.join(SERVICES)}); "
                                  "choose another id")
        return device_id

    def add_device(self, device_id: str, *, tls: bool = True, rotate: bool = False) -> DeviceCredentials:
        """Create ``device_id``'s password (and with ``tls`` its client certificate). An existing
        device keeps what it has unless ``rotate``; a device first made without TLS gets its
        certificate when added again with ``tls``."""
        self._check_device_id(device_id)
        self._mkroot()
        folder = self.device_dir(device_id)
        folder.parent.mkdir(exist_ok=True, mode=0o700)
        folder.mkdir(exist_ok=True, mode=0o700)
        password_path = folder / "password"
        if rotate or not password_path.is_file():
            _write_private(password_path, (secrets.token_urlsafe(24) + "\n").encode())
        if tls:
            self.ensure_ca()
            cert_path, key_path = folder / "client.crt", folder / "client.key"
            if rotate or not key_path.is_file() or self._signed_by_ca(cert_path) is None:
                self._issue(device_id, [x509.UniformResourceIdentifier(f"urn:harmony-testbed:device:{device_id}")],
                            ExtendedKeyUsageOID.CLIENT_AUTH, cert_path, key_path)
            if not (folder / "ca.crt").is_file() or (folder / "ca.crt").read_bytes() != self.ca_file.read_bytes():
                shutil.copyfile(self.ca_file, folder / "ca.crt")
                (folder / "ca.crt").chmod(0o644)
        return self.device(device_id)

    def device(self, device_id: str) -> DeviceCredentials:
        """The credentials of a device added before; ``CredentialError`` naming ``harmony fleet add`` if absent."""
        folder = self.device_dir(device_id)
        password_path = folder / "password"
        if not password_path.is_file():
            raise CredentialError(f"no credentials for device {device_id!r} in {self.root}; create them with "
                                  f"`harmony fleet add {device_id} --dir {self.root}`")
        cert = folder / "client.crt"
        has_cert = cert.is_file() and (folder / "client.key").is_file()
        return DeviceCredentials(device_id, password_path.read_text().strip(),
                                 folder / "ca.crt" if (folder / "ca.crt").is_file() else None,
                                 cert if has_cert else None, folder / "client.key" if has_cert else None)

    def remove_device(self, device_id: str) -> None:
        """Delete ``device_id``'s directory (password, certificate); the next :meth:`write_broker_files`
        leaves it out of the broker's password file. Its certificate is not revoked (no CRL)."""
        self.device(device_id)  # CredentialError naming `harmony fleet add` if there is none
        shutil.rmtree(self.device_dir(device_id))

    def devices(self) -> list[str]:
        """The ids of every device in the store, sorted."""
        base = self.root / "devices"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "password").is_file())

    # ------------------------------------------------------------------------------ services
    def service_password(self, name: str) -> str:
        """The password of service ``name`` (``server``, ``orchestrator`` or ``redis``), made once."""
        if name not in SERVICES:
            raise CredentialError(f"service {name!r}: expected one of {', '.join(SERVICES)}")
        path = self.root / "services" / f"{name}.password"
        if not path.is_file():
            self._mkroot()
            (self.root / "services").mkdir(exist_ok=True, mode=0o700)
            _write_private(path, (secrets.token_urlsafe(24) + "\n").encode())
        return path.read_text().strip()

    def service_certificate(self, name: str) -> tuple[Path, Path]:
        """DIR/services/NAME.crt and NAME.key (0600): the client certificate (CN = ``name``, signed by the
        services CA) that ``server`` or ``orchestrator`` presents on the broker's service listener."""
        if name not in ("server", "orchestrator"):
            raise CredentialError(f"service certificate {name!r}: expected server or orchestrator")
        cert_path, key_path = self.root / "services" / f"{name}.crt", self.root / "services" / f"{name}.key"
        self.ensure_service_ca()
        if not key_path.is_file() or self._signed_by_ca(cert_path, self.service_ca_file) is None:
            self._issue(name, [x509.UniformResourceIdentifier(f"urn:harmony-testbed:service:{name}")],
                        ExtendedKeyUsageOID.CLIENT_AUTH, cert_path, key_path, services=True)
        return cert_path, key_path

    def redis_url(self, host: str = "127.0.0.1", port: int = 6379, db: int = 0, role: str = "driver") -> str:
        """``redis://USER:PASSWORD@host:port/db`` of service ``role`` (:data:`REDIS_ROLES`; the
        driver's user is ``harmony``). A secret: never log it."""
        if role not in REDIS_ROLES:
            raise CredentialError(f"Redis role {role!r}: expected one of {', '.join(REDIS_ROLES)}")
        user, service, _ = REDIS_ROLES[role]
        return f"redis://{user}:{self.service_password(service)}@{host}:{port}/{db}"

    # ------------------------------------------------------------------------------ generated files
    def write_broker_files(self) -> tuple[Path, Path]:
        """DIR/mosquitto.passwd (every device and the ``server``/``orchestrator`` users), DIR/mosquitto.acl
        (the per-device ACL) and DIR/redis.acl."""
        self._mkroot()
        services = {name: self.service_password(name) for name in ("server", "orchestrator")}
        users = {**{d: self.device(d).password for d in self.devices()}, **services}
        write_password_file(self.password_file, users)
        _write_private(self.acl_file, render_acl(servers=["server"], orchestrators=["orchestrator"]).encode())
        self.write_redis_acl()
        return self.password_file, self.acl_file

    def write_service_env(self, redis_host: str = "redis", redis_port: int = 6379) -> list[Path]:
        """What the containers of docker/compose.yaml read their secrets from (``env_file``; 0600):
        DIR/services/server.env (the worker: ``HSFL_MQTT_PASSWORD``, ``HSFL_REDIS_URL``),
        DIR/services/orchestrator.env (registry and driver: ``HSFL_REDIS_URL`` of the registry's Redis
        user, ``HARMONY_MQTT_PASSWORD``, ``HARMONY_REDIS_PASSWORD`` of the driver's), DIR/services/
        orchestrator.login (``orchestrator:PASSWORD``, the registry's ``--credentials``) and
        DIR/services/monitor.env (``HARMONY_REDIS_PASSWORD`` of the read-only monitor user)."""
        folder = self.root / "services"
        worker_url = self.redis_url(redis_host, redis_port, role="worker")
        server = _write_private(folder / "server.env", (f"HSFL_MQTT_PASSWORD={self.service_password('server')}\n"
                                                         f"HSFL_REDIS_URL={worker_url}\n").encode())
        registry_url = self.redis_url(redis_host, redis_port, role="registry")
        orchestrator = _write_private(folder / "orchestrator.env", (
            f"HSFL_REDIS_URL={registry_url}\nHARMONY_MQTT_PASSWORD={self.service_password('orchestrator')}\n"
            f"HARMONY_REDIS_PASSWORD={self.service_password('redis')}\n").encode())
        login = _write_private(folder / "orchestrator.login",
                               f"orchestrator:{self.service_password('orchestrator')}\n".encode())
        monitor = _write_private(folder / "monitor.env",
                                 f"HARMONY_REDIS_PASSWORD={self.service_password('redis-monitor')}\n".encode())
        return [server, orchestrator, login, monitor]

    def write_redis_acl(self) -> Path:
        """DIR/redis.acl: the ``default`` user off, one user per service role of :data:`REDIS_ROLES`
        (passwords stored as their SHA-256)."""
        lines = ["user default off"]
        for user, service, rules in REDIS_ROLES.values():
            digest = hashlib.sha256(self.service_password(service).encode()).hexdigest()
            lines.append(f"user {user} on #{digest} {rules}")
        return _write_private(self.redis_acl_file, ("\n".join(lines) + "\n").encode())
