"""The local stack of the distributed runtime: Mosquitto, redis-server, a Celery worker, the
orchestrator's registry and N emulated agents, each a process whose PID and log live in a run
directory (``stack.json``), so that ``harmony down`` stops exactly those processes.

Used by ``harmony up``/``down``/``run --runtime distributed`` and by the runtime tests, which also
use :meth:`LocalStack.kill` and :meth:`LocalStack.restart` to inject faults. redis-server runs with
its append-only file in ``{run_dir}/redis`` (fsync every second), so a restart keeps the round
state; a hard crash may lose the last second of writes, as Redis documents for that setting.
Mosquitto runs with persistence in ``{run_dir}/mosquitto`` (saved on SIGTERM and every
``autosave_interval``), so a restart keeps the clients' sessions and the retained messages; after a
kill -9 the agents announce their ``hello`` and status again when they reconnect.

With ``auth=True`` (``harmony up``'s default; ``--insecure`` turns it off) the broker refuses
anonymous clients and confines each device to its own topics: the stack's credential store (``testbed.credentials``) in
``{run_dir}/credentials`` holds a random password per device, for the Celery worker (user
``server``) and for the orchestrator (user ``orchestrator``), mosquitto's password file and the
ACL of ``broker.mosquitto.render_acl``. Each agent reads its devices' passwords from
``credentials/agent-{k}.txt`` (``--credentials``), the registry and ``harmony run --stack`` from
``credentials/orchestrator.txt``, the worker from its environment. Files are mode 0600. The
device listener ties each client id to its user name; the services connect to a second listener
that asks for a client certificate of the services CA (``broker.mosquitto.ServiceListener``,
docs/security.md). Redis runs with the store's ``redis.acl`` (``default`` off, one user per service
role: the driver ``harmony``, the workers, the registry, the read-only monitor).
With ``tls=True`` (``harmony up --tls``) the device listener speaks TLS too and asks each device
for its client certificate; ``profile="production"`` refuses to start without TLS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Container
from dataclasses import asdict, dataclass, field
from pathlib import Path

from broker.client import TlsSettings, read_login
from broker.mosquitto import PROFILES, BrokerTls, MosquittoConfig, ServiceListener, find_mosquitto, free_port

STACK_FILE = "stack.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
SESSION_THREADS = 32
"""Default session threads of a stack's Celery worker (``harmony up --concurrency``), or one per
emulated device where ``harmony up`` starts more. A ceiling, not a cost: Celery's thread pool starts
a thread only when a task needs one, and a session mostly waits for its device, so every device of a
round — emulated by ``up``, by ``fleet emulate`` or a flashed board, whatever joined after ``up`` —
trains at once up to this many; beyond it the sessions queue (their ``queued_s``, docs/design.md)."""


@dataclass
class StackInfo:
    """What ``stack.json`` records."""

    run_dir: str
    mqtt_port: int
    redis_port: int
    pids: dict[str, int] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    credentials: dict[str, str] = field(default_factory=dict)
    """Role (``orchestrator``, ``agent-0``, …) → its credentials file, when the broker requires them."""
    service_port: int | None = None
    """The broker's service listener (workers, orchestrator, ``harmony run``) when auth is on."""
    tls: bool = False
    """Whether the device listener speaks TLS (``harmony up --tls``)."""
    store: str | None = None
    """The stack's credential store (``testbed.credentials``), when auth is on."""
    profile: str = "development"
    worker_concurrency: int | None = None
    """Session threads of each Celery worker (None: a stack recorded before this was)."""

    def known_devices(self) -> Container[str] | None:
        """With auth, the devices that may log in to this stack: every device of its credential store
        (its agents', ``harmony fleet add``, ``flash``, ``fleet emulate``); the registry admits no
        other and clears their retained announcements. None without auth: the
        broker lets anyone in, so no list of names means anything (the run warns that it is open)."""
        if self.store is None:
            return None
        from orchestrator.registry import StoreDevices

        return StoreDevices(self.store)

    def orchestrator_login(self) -> tuple[str | None, str | None]:
        """(user name, password) for the orchestrator's broker connection; (None, None) without auth."""
        path = self.credentials.get("orchestrator")
        if path is None:
            return None, None
        return read_login(Path(path))

    def service_tls(self, name: str = "orchestrator") -> TlsSettings | None:
        """TLS of a service's connection to the service listener: the stack's CA and the client
        certificate of ``name`` (``orchestrator`` or ``server``); None without auth."""
        if self.store is None:
            return None
        store = Path(self.store)
        return TlsSettings(store / "ca.crt", store / "services" / f"{name}.crt", store / "services" / f"{name}.key")

    @property
    def redis_url(self) -> str:
        """The Redis URL, with the password of the ``harmony`` ACL user when auth is on (a secret:
        print :attr:`redis_url_redacted`)."""
        if self.store is None:
            return f"redis://127.0.0.1:{self.redis_port}/0"
        password = (Path(self.store) / "services" / "redis.password").read_text().strip()
        return f"redis://harmony:{password}@127.0.0.1:{self.redis_port}/0"

    def redis_url_for(self, role: str) -> str:
        """The Redis URL of service ``role`` (``driver``, ``worker``, ``registry``, ``monitor``:
        ``testbed.credentials.REDIS_ROLES``, each its own Redis user when auth is on). A secret."""
        if self.store is None:
            return self.redis_url
        from testbed.credentials import CredentialStore

        return CredentialStore(self.store).redis_url(port=self.redis_port, role=role)

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)

    @property
    def mqtt(self) -> tuple[str, int]:
        """The device listener."""
        return ("127.0.0.1", self.mqtt_port)

    @property
    def service_mqtt(self) -> tuple[str, int]:
        """Where the services connect: the service listener when auth is on, else the one listener."""
        return ("127.0.0.1", self.service_port if self.service_port is not None else self.mqtt_port)


def redact_url(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def _write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)
    return path


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited during start-up; see {log}:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on port {port} within {timeout} s; see {log}") from None
            time.sleep(0.05)


class LocalStack:
    """Start and stop the processes of a local stack; every process is its own session (detached)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.info: StackInfo | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        self._passwords: dict[str, str] | None = None  # user → password when the broker requires them
        self._torch_env: dict[str, str] = {}  # OMP/MKL threads of the worker and agent processes

    # ------------------------------------------------------------------------------ processes
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.run_dir / f"{name}.log"
        full_env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    **(env or {})}
        with open(log, "ab") as handle:
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.run_dir, env=full_env, start_new_session=True)
        self._procs[name] = proc
        self._commands[name] = (argv, env)
        assert self.info is not None
        self.info.pids[name] = proc.pid
        self._save()
        return proc

    def _save(self) -> None:
        assert self.info is not None
        (self.run_dir / STACK_FILE).write_text(json.dumps(asdict(self.info), indent=2))

    def start(self, agents: int = 0, devices_per_agent: int = 4, worker_concurrency: int | None = None,
              registry: bool = True, visibility_timeout_s: int | None = None,
              restore_interval_s: int | None = None, auth: bool = False,
              torch_threads: int | None = None, workers: int = 1, tls: bool = False,
              profile: str = "development") -> StackInfo:
        """Start mosquitto, redis-server, one Celery worker, the registry and ``agents`` agent processes.

        ``visibility_timeout_s``/``restore_interval_s``: the worker's ``HSFL_VISIBILITY_S`` and
        ``HSFL_RESTORE_INTERVAL_S`` (how soon a session of a dead worker is redelivered; see
        ``server.app``), for fault tests; by default the worker's own defaults. ``auth``: password
        authentication and the per-device ACL (module docstring); off by default in this library
        call, for tests that talk to the broker anonymously — `harmony up`, `harmony run --stack`
        and `fleet emulate` turn it on unless `--insecure` (docs/security.md). ``worker_concurrency``: session
        threads of the worker; by default :data:`SESSION_THREADS`, or one per emulated device where
        that is more, so every device of a round trains at once: a session mostly waits for its
        device, and with fewer threads the round runs in waves whose set-up and tail leave cores idle.
        ``torch_threads``: the intra-op threads (``OMP_NUM_THREADS``) of the worker and agent
        processes; ``None`` leaves torch's default (one per core in every process). A run's
        ``threads`` setting overrides both.
        ``workers``: Celery worker processes (``worker``, ``worker-1``, …), each with
        ``worker_concurrency`` session threads: one process's sessions share one GIL, so past a
        hundred or so concurrent sessions a second process spreads the server side's Python over
        the cores (``benchmarks/fleet_scale.py``). ``tls``: the device listener speaks TLS and asks
        for the devices' client certificates (implies ``auth``). ``profile="production"`` refuses
        to start without ``tls`` (no plaintext listener)."""
        from server.app import QUEUE  # here, not at import: the CLI loads this module on every command

        if profile not in PROFILES:
            raise ValueError(f"--profile {profile!r}: expected one of {', '.join(PROFILES)}")
        if profile == "production" and not tls:
            raise ValueError("the production profile refuses plaintext listeners: add --tls "
                             "(or use --profile development)")
        auth = auth or tls
        refuse_stale(self.run_dir)  # never overwrite the record of processes that still run
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._torch_env = {} if torch_threads is None else {"OMP_NUM_THREADS": str(torch_threads),
                                                            "MKL_NUM_THREADS": str(torch_threads)}
        self.info = StackInfo(str(self.run_dir), free_port(), free_port(), tls=tls, profile=profile)
        info = self.info
        conf = self.run_dir / "mosquitto.conf"
        # persistence: sessions, their queued messages and retained messages (hello, blobs) survive a
        # restart; after a kill -9 what the last autosave held (the clients announce themselves again)
        store = self.run_dir / "mosquitto"
        store.mkdir(exist_ok=True)
        mosquitto_config = MosquittoConfig(port=info.mqtt_port, persistence=True, persistence_dir=store)
        if auth:
            mosquitto_config = self._credentials(agents * devices_per_agent, store, profile)
        conf.write_text(mosquitto_config.render())
        mosq = self._spawn("mosquitto", [find_mosquitto(), "-c", str(conf)])
        redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
        (self.run_dir / "redis").mkdir(exist_ok=True)
        redis_argv = [redis_bin, "--port", str(info.redis_port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "yes", "--dir", str(self.run_dir / "redis")]
        if info.store is not None:  # a Redis user per service role (testbed.credentials.REDIS_ROLES); default off
            redis_argv += ["--aclfile", str(Path(info.store) / "redis.acl")]
        red = self._spawn("redis", redis_argv)
        _wait_port(info.mqtt_port, mosq, "mosquitto", self.run_dir / "mosquitto.log")
        if info.service_port is not None:
            _wait_port(info.service_port, mosq, "mosquitto (service listener)", self.run_dir / "mosquitto.log")
        _wait_port(info.redis_port, red, "redis-server", self.run_dir / "redis.log")
        service_host, service_port = info.service_mqtt
        env = {"HSFL_REDIS_URL": info.redis_url_for("worker"), "HSFL_MQTT": f"{service_host}:{service_port}",
               **self._torch_env}
        if visibility_timeout_s is not None:
            env["HSFL_VISIBILITY_S"] = str(visibility_timeout_s)
        if restore_interval_s is not None:
            env["HSFL_RESTORE_INTERVAL_S"] = str(restore_interval_s)
        if self._passwords is not None:
            env.update({"HSFL_MQTT_USER": "server", "HSFL_MQTT_PASSWORD": self._passwords["server"]})
            server_tls = info.service_tls("server")
            assert server_tls is not None
            env.update({"HSFL_MQTT_CAFILE": str(server_tls.ca_certs), "HSFL_MQTT_CERTFILE": str(server_tls.certfile),
                        "HSFL_MQTT_KEYFILE": str(server_tls.keyfile)})
        if worker_concurrency is None:
            worker_concurrency = max(SESSION_THREADS, agents * devices_per_agent)
        info.worker_concurrency = worker_concurrency
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        for k in range(workers):
            self._spawn("worker" if k == 0 else f"worker-{k}", [
                sys.executable, "-m", "celery", "-A", "server.app", "worker", "--pool", "threads", "--concurrency",
                str(worker_concurrency), "-Q", QUEUE, "--loglevel", "INFO",
                "-n", f"hsfl-{info.mqtt_port}@%h" if k == 0 else f"hsfl-{info.mqtt_port}-{k}@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat"], env)
        if registry:
            # the Redis URL (with its password) in the environment, not on a command line others can read
            argv = [sys.executable, "-m", "orchestrator", "--broker", f"{service_host}:{service_port}"]
            if "orchestrator" in info.credentials:
                argv += ["--credentials", info.credentials["orchestrator"]]
            if info.store is not None:  # admit only the store's devices (docs/design.md §15)
                argv += ["--devices-from", info.store]
            orchestrator_tls = info.service_tls("orchestrator")
            if orchestrator_tls is not None:
                argv += ["--cafile", str(orchestrator_tls.ca_certs), "--certfile", str(orchestrator_tls.certfile),
                         "--keyfile", str(orchestrator_tls.keyfile)]
            self._spawn("orchestrator", argv, {"HSFL_REDIS_URL": info.redis_url_for("registry")})
        for a in range(agents):
            self.add_agent([f"emu-{a * devices_per_agent + k}" for k in range(devices_per_agent)])
        return info

    def _credentials(self, devices: int, persistence_dir: Path, profile: str) -> MosquittoConfig:
        """The stack's credential store in ``{run_dir}/credentials``: the planned devices, the service
        users and certificates, the broker's files and redis.acl; returns the broker's configuration."""
        from testbed.credentials import CredentialStore  # here: cryptography is not needed without auth

        assert self.info is not None
        store = CredentialStore(self.run_dir / "credentials")
        self.info.store = str(store.root)
        planned = [f"emu-{k}" for k in range(devices)]
        self._passwords = {d: store.add_device(d, tls=self.info.tls).password for d in planned}
        self._passwords.update({name: store.service_password(name) for name in ("server", "orchestrator")})
        store.ensure_ca()
        cert, key = store.broker_certificate([])
        for name in ("server", "orchestrator"):
            store.service_certificate(name)
        passwd, acl = store.write_broker_files()
        orchestrator = _write_private(store.root / "orchestrator.txt",
                                      f"orchestrator:{self._passwords['orchestrator']}\n")
        self.info.credentials["orchestrator"] = str(orchestrator)
        self.info.service_port = free_port()
        return MosquittoConfig(
            port=self.info.mqtt_port, password_file=passwd, acl_file=acl, persistence=True,
            persistence_dir=persistence_dir, use_username_as_clientid=True, profile=profile,
            tls=BrokerTls(store.ca_file, cert, key, require_certificate=True) if self.info.tls else None,
            service_listener=ServiceListener(self.info.service_port,
                                             BrokerTls(store.service_ca_file, cert, key, require_certificate=True)))

    def add_agent(self, device_ids: list[str], extra_args: list[str] | None = None) -> None:
        """Start an agent process hosting ``device_ids`` (with auth: new devices get passwords, and
        mosquitto reloads its password file on SIGHUP); ``extra_args`` go to ``python -m edge_agent``
        (e.g. ``["--slowdown", "20"]``)."""
        assert self.info is not None
        name = f"agent-{len([k for k in self._commands if k.startswith('agent-')])}"
        argv = [sys.executable, "-m", "edge_agent", "--broker", f"127.0.0.1:{self.info.mqtt_port}"]
        for d in device_ids:
            argv += ["--device-id", d]
        argv += list(extra_args or [])
        if self._passwords is not None:
            from testbed.credentials import CredentialStore

            assert self.info.store is not None
            store = CredentialStore(self.info.store)
            new = [d for d in device_ids if d not in self._passwords]
            if new:
                for d in new:
                    self._passwords[d] = store.add_device(d, tls=self.info.tls).password
                store.write_broker_files()
                os.kill(self.pid("mosquitto"), signal.SIGHUP)  # mosquitto reloads its password file and ACL
            path = _write_private(store.root / f"{name}.txt",
                                  "".join(f"{d}:{self._passwords[d]}\n" for d in device_ids))
            self.info.credentials[name] = str(path)
            argv += ["--credentials", str(path)]
            if self.info.tls:
                argv += ["--cafile", str(store.ca_file), "--certfile", str(store.root / "devices/{device}/client.crt"),
                         "--keyfile", str(store.root / "devices/{device}/client.key")]
        self._spawn(name, argv, self._torch_env)
        self.info.devices += device_ids
        self._save()

    def pid(self, name: str) -> int:
        """The PID of process ``name`` (``worker``, ``redis``, ``agent-0``, …)."""
        assert self.info is not None
        if name not in self.info.pids:
            raise KeyError(f"no running process {name!r} in this stack; running: {sorted(self.info.pids)}")
        return self.info.pids[name]

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int:
        """Send ``sig`` to process ``name`` by its PID and wait until it has exited; returns the PID.
        (SIGKILL: a crash, nothing is cleaned up; SIGTERM: the process shuts down as it would.)"""
        assert self.info is not None
        pid = self.pid(name)
        proc = self._procs.get(name)
        os.kill(pid, sig)
        if proc is not None:
            proc.wait(timeout)
        else:
            deadline = time.monotonic() + timeout
            while process_alive(pid):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} (pid {pid}) still runs {timeout} s after signal {sig}")
                time.sleep(0.05)
        del self.info.pids[name]
        self._procs.pop(name, None)
        self._save()
        return pid

    def restart(self, name: str, sig: int = signal.SIGTERM) -> int:
        """Stop process ``name`` with ``sig`` (unless it is already gone) and start it again with the same
        command line (same ports and directories); returns the new PID once it serves."""
        assert self.info is not None
        if name not in self._commands:
            raise KeyError(f"{name!r} was not started by this LocalStack; started: {sorted(self._commands)}")
        if name in self.info.pids:
            self.kill(name, sig)
        argv, env = self._commands[name]
        proc = self._spawn(name, argv, env)
        if name == "redis":
            _wait_port(self.info.redis_port, proc, "redis-server", self.run_dir / "redis.log")
            _wait_redis_loaded(self.info.redis_url)
        elif name == "mosquitto":
            _wait_port(self.info.mqtt_port, proc, "mosquitto", self.run_dir / "mosquitto.log")
        return proc.pid

    def stop(self) -> list[str]:
        """Stop every process recorded in ``stack.json`` (agents first, brokers last)."""
        return stop_stack(self.run_dir, self._procs)


def _wait_redis_loaded(url: str, timeout: float = 20.0) -> None:
    """Until redis-server answers PING (it refuses commands while it replays its append-only file)."""
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.ping():
                    return
            except (redis.BusyLoadingError, redis.ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server at {url} did not finish loading within {timeout} s") from None
                time.sleep(0.05)
    finally:
        client.close()


def load_stack(run_dir: str | Path) -> StackInfo:
    path = Path(run_dir) / STACK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: no stack was started there (harmony up --run-dir DIR)")
    return StackInfo(**json.loads(path.read_text()))


_PROGRAMS = {"mosquitto": "mosquitto", "redis": "redis-server", "worker": "celery", "orchestrator": "orchestrator",
             "agent": "edge_agent"}
"""What a recorded process's command line names (``/proc/{pid}/cmdline``), by its name's first part:
a PID the system gave to another program since is not the stack's."""


def _runs_as(name: str, pid: int) -> bool:
    """Whether ``pid`` is alive and still the program process ``name`` of a stack was."""
    if not process_alive(pid):
        return False
    program = _PROGRAMS.get(name.split("-")[0])
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: trust the PID
    if stat.rpartition(")")[2].split()[0] == "Z":
        return False  # a zombie of another parent
    return program is None or program.encode() in cmdline


def recorded_alive(run_dir: str | Path) -> dict[str, int]:
    """The processes ``stack.json`` in ``run_dir`` records that still run (name → PID); {} without one."""
    try:
        info = load_stack(run_dir)
    except FileNotFoundError:
        return {}
    return {name: pid for name, pid in sorted(info.pids.items()) if _runs_as(name, pid)}


class StaleStack(RuntimeError):
    """A run directory whose recorded processes partly still run: starting over it would overwrite
    ``stack.json`` and leave them running, unstoppable (two redis-servers on one data directory)."""


def refuse_stale(run_dir: str | Path) -> None:
    """``StaleStack`` naming the recorded processes of ``run_dir`` that still run, and the fix."""
    alive = recorded_alive(run_dir)
    if not alive:
        return
    try:
        gone = sorted(set(load_stack(run_dir).pids) - set(alive))
    except FileNotFoundError:
        gone = []
    listed = ", ".join(f"{name} (pid {pid})" for name, pid in alive.items())
    why = f" while {', '.join(gone)} {'is' if len(gone) == 1 else 'are'} gone" if gone else ""
    raise StaleStack(f"{run_dir}/{STACK_FILE} records processes that still run: {listed}{why}; stop them with "
                     f"`harmony down --run-dir {run_dir}` and start again (or use another --run-dir)")


def stack_running(run_dir: str | Path) -> bool:
    """True when ``run_dir`` records a stack whose mosquitto and redis-server still run."""
    try:
        info = load_stack(run_dir)
    except FileNotFoundError:
        return False
    return all(name in info.pids and _runs_as(name, info.pids[name]) for name in ("mosquitto", "redis"))


def process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs. An exited child of this very process (``harmony up`` and ``down`` in one
    process, as in the tests) is a zombie until reaped, so reap it first: otherwise every stop would wait
    its full SIGTERM timeout and then SIGKILL a process that is already gone."""
    if pid <= 0:  # 0 and -1 would address a process group, not a process
        return False
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: init reaps it
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_stack(run_dir: str | Path, procs: dict[str, subprocess.Popen[bytes]] | None = None,
               timeout: float = 10.0) -> list[str]:
    """SIGTERM each recorded PID (SIGKILL after ``timeout``); returns the names stopped."""
    info = load_stack(run_dir)
    procs = procs or {}
    order = sorted(info.pids, key=lambda n: (0 if n.startswith("agent")
                                             else 1 if n == "orchestrator" or n.startswith("worker") else 2, n))
    stopped = []
    for name in order:
        pid = info.pids[name]
        proc = procs.get(name)
        if proc is not None and proc.poll() is not None:
            continue
        if proc is None and not _runs_as(name, pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while (proc.poll() is None) if proc is not None else process_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                if proc is not None:
                    proc.wait(5)
                break
            time.sleep(0.05)
        stopped.append(name)
    info.pids = {}
    (Path(run_dir) / STACK_FILE).write_text(json.dumps(asdict(info), indent=2))
    return stopped
