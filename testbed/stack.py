"""The local stack of the distributed runtime: Mosquitto, redis-server, a Celery worker, the
orchestrator's registry and N emulated agents, each a process whose PID and log live in a run
directory (``stack.json``), so that ``harmony down`` stops exactly those processes.

Used by ``harmony up``/``down``/``run --runtime distributed`` and by the runtime tests.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from broker.mosquitto import MosquittoConfig, find_mosquitto, free_port

STACK_FILE = "stack.json"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StackInfo:
    """What ``stack.json`` records."""

    run_dir: str
    mqtt_port: int
    redis_port: int
    pids: dict[str, int] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def mqtt(self) -> tuple[str, int]:
        return ("127.0.0.1", self.mqtt_port)


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

    # ------------------------------------------------------------------------------ processes
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.run_dir / f"{name}.log"
        full_env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    **(env or {})}
        with open(log, "ab") as handle:
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.run_dir, env=full_env, start_new_session=True)
        self._procs[name] = proc
        assert self.info is not None
        self.info.pids[name] = proc.pid
        self._save()
        return proc

    def _save(self) -> None:
        assert self.info is not None
        (self.run_dir / STACK_FILE).write_text(json.dumps(asdict(self.info), indent=2))

    def start(self, agents: int = 0, devices_per_agent: int = 4, worker_concurrency: int = 2,
              registry: bool = True) -> StackInfo:
        """Start mosquitto, redis-server, one Celery worker, the registry and ``agents`` agent processes."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.info = StackInfo(str(self.run_dir), free_port(), free_port())
        info = self.info
        conf = self.run_dir / "mosquitto.conf"
        conf.write_text(MosquittoConfig(port=info.mqtt_port).render())
        mosq = self._spawn("mosquitto", [find_mosquitto(), "-c", str(conf)])
        redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
        (self.run_dir / "redis").mkdir(exist_ok=True)
        red = self._spawn("redis", [redis_bin, "--port", str(info.redis_port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "yes", "--dir", str(self.run_dir / "redis")])
        _wait_port(info.mqtt_port, mosq, "mosquitto", self.run_dir / "mosquitto.log")
        _wait_port(info.redis_port, red, "redis-server", self.run_dir / "redis.log")
        env = {"HSFL_REDIS_URL": info.redis_url, "HSFL_MQTT": f"127.0.0.1:{info.mqtt_port}"}
        self._spawn("worker", [sys.executable, "-m", "celery", "-A", "server.app", "worker", "--pool", "threads",
                               "--concurrency", str(worker_concurrency), "-Q", "hsfl", "--loglevel", "INFO",
                               "-n", f"hsfl-{info.mqtt_port}@%h", "--without-gossip", "--without-mingle",
                               "--without-heartbeat"], env)
        if registry:
            self._spawn("orchestrator", [sys.executable, "-m", "orchestrator", "--broker",
                                         f"127.0.0.1:{info.mqtt_port}", "--redis", info.redis_url])
        for a in range(agents):
            self.add_agent([f"emu-{a * devices_per_agent + k}" for k in range(devices_per_agent)])
        return info

    def add_agent(self, device_ids: list[str]) -> None:
        assert self.info is not None
        argv = [sys.executable, "-m", "edge_agent", "--broker", f"127.0.0.1:{self.info.mqtt_port}"]
        for d in device_ids:
            argv += ["--device-id", d]
        self._spawn(f"agent-{len([k for k in self.info.pids if k.startswith('agent-')])}", argv)
        self.info.devices += device_ids
        self._save()

    def stop(self) -> list[str]:
        """Stop every process recorded in ``stack.json`` (agents first, brokers last)."""
        return stop_stack(self.run_dir, self._procs)


def load_stack(run_dir: str | Path) -> StackInfo:
    path = Path(run_dir) / STACK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: no stack was started there (harmony up --run-dir DIR)")
    return StackInfo(**json.loads(path.read_text()))


def stack_running(run_dir: str | Path) -> bool:
    """True when ``run_dir`` records a stack whose mosquitto and redis-server still run."""
    try:
        info = load_stack(run_dir)
    except FileNotFoundError:
        return False
    return all(name in info.pids and _alive(info.pids[name]) for name in ("mosquitto", "redis"))


def _alive(pid: int) -> bool:
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
    order = sorted(info.pids, key=lambda n: (0 if n.startswith("agent") else 1 if n in ("orchestrator", "worker")
                                               else 2, n))
    stopped = []
    for name in order:
        pid = info.pids[name]
        proc = procs.get(name)
        if proc is not None and proc.poll() is not None:
            continue
        if proc is None and not _alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while (proc.poll() is None) if proc is not None else _alive(pid):
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
