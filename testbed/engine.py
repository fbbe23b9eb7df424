"""A Docker engine of one's own: Debian's ``dockerd`` started inside a network namespace made for it.

Its bridges, its containers' addresses and the ports it publishes live in that namespace, so
nothing it runs can reach or be reached from the host's network, and a second engine (or the
host's own) is not disturbed. Clients talk to it over its Unix socket (``DOCKER_HOST``).
``nsenter --net=/var/run/netns/NAME`` is used, not ``ip netns exec``: the latter remounts ``/sys``
and hides the cgroup hierarchies, and dockerd then refuses to start ("Devices cgroup isn't
mounted").

The engine keeps its images in ``data_root`` (default ``testbed.rootfs.cache_dir()/docker``), so that
base images built once serve later runs; only one engine uses a data root at a time (a lock
file), a second one gets a fresh directory of its own. Its containers' cgroups go under a parent
named after the engine, removed with it. :meth:`DockerEngine.stop` stops exactly what
:meth:`DockerEngine.start` started, by PID, and removes the namespace.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from testbed.rootfs import cache_dir

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/var/run/netns")


class EngineError(RuntimeError):
    """The engine could not be started or a client command failed; the message says which and why."""


def docker_client() -> str:
    """The ``docker`` client to use: one that builds with BuildKit (it sets ``TARGETARCH`` and reads
    ``Dockerfile.*.dockerignore``). Debian's docker.io client (20.10, ``/usr/bin/docker``) has BuildKit
    built in; a newer client needs the buildx plugin for it."""
    candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c and Path(c).exists()]
    for client in candidates:
        out = subprocess.run([client, "buildx", "version"], capture_output=True, text=True)
        if out.returncode == 0:
            return client
    for client in candidates:
        out = subprocess.run([client, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
        major = (out.stdout.strip().split(".") or ["0"])[0]
        if major.isdigit() and int(major) < 23:
            return client
    raise EngineError("no docker client that builds with BuildKit: install Debian's docker.io (apt-get install "
                      "docker.io) or the buildx plugin")


class DockerEngine:
    """``dockerd`` in the network namespace ``name`` (module docstring)."""

    def __init__(self, name: str, state_dir: Path, data_root: Path | None = None) -> None:
        if not name.replace("-", "").isalnum() or len(name) > 40:
            raise EngineError(f"engine name {name!r}: letters, digits and '-' only, at most 40 characters")
        self.name = name
        self.state_dir = Path(state_dir)
        self.wanted_root = Path(data_root) if data_root is not None else cache_dir() / "docker"
        self.data_root: Path | None = None
        self.socket = self.state_dir / "docker.sock"
        self.pid: int | None = None
        self.client = docker_client()
        self._lock: IO[str] | None = None
        self._own_root = False

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def netns(self) -> Path:
        return NETNS_DIR / self.name

    @property
    def cgroup_parent(self) -> str:
        return f"harmony-engine-{self.name}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for a client of this engine (``docker``, ``docker-compose``)."""
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}

    def start(self, timeout_s: float = 120.0) -> None:
        """Make the namespace, start dockerd in it and wait until it answers."""
        if os.geteuid() != 0:
            raise EngineError("a Docker engine needs root (namespaces, mounts, cgroups)")
        if shutil.which("dockerd") is None and not Path("/usr/sbin/dockerd").exists():
            raise EngineError("dockerd not found: apt-get install docker.io")
        if self.netns.exists():
            raise EngineError(f"network namespace {self.name} exists already: another engine of that name runs")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.data_root = self._claim_root()
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True)
        log_file = open(self.state_dir / "dockerd.log", "ab")
        try:
            proc = subprocess.Popen(
                ["nsenter", f"--net={self.netns}", "dockerd", "--data-root", str(self.data_root),
                 "--exec-root", str(self.state_dir / "exec"), "--pidfile", str(self.state_dir / "dockerd.pid"),
                 "-H", f"unix://{self.socket}", "--iptables=false", "--ip6tables=false",
                 "--cgroup-parent", self.cgroup_parent, "--log-level", "warn"],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log_file.close()
        self.pid = proc.pid  # nsenter execs dockerd: the same process
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.state_dir / "dockerd.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise EngineError(f"dockerd exited with {proc.returncode}: {tail}")
            if self.socket.exists() and self.docker("version", check=False, timeout=20).returncode == 0:
                log.info("engine %s: dockerd %d on %s, data root %s", self.name, self.pid, self.socket,
                         self.data_root)
                return
            time.sleep(0.5)
        self.stop()
        raise EngineError(f"dockerd did not answer on {self.socket} within {timeout_s:g} s")

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop dockerd (it stops its containers and containerd), anything of this engine left, the namespace."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(self.pid):
                _reap(self.pid)
                time.sleep(0.2)
            if _alive(self.pid):
                log.warning("engine %s: dockerd %d ignored SIGTERM for %g s; killing it", self.name, self.pid,
                            timeout_s)
                os.kill(self.pid, signal.SIGKILL)
                _reap(self.pid)
            self.pid = None
        for pid in self.leftover_pids():  # shims of containers dockerd could not stop
            log.warning("engine %s: killing leftover process %d", self.name, pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        exec_root = str(self.state_dir / "exec")
        for mount in reversed(_mounts_under([exec_root, *([str(self.data_root)] if self.data_root else [])])):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        if self.netns.exists():
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        for parent in self.cgroup_dirs():
            for child in sorted(parent.glob("*/"), reverse=True):
                _rmdir(child)
            _rmdir(parent)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._own_root and self.data_root is not None:
            shutil.rmtree(self.data_root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """Processes still running that belong to this engine (by its exec root in their command line)."""
        marker = str(self.state_dir / "exec").encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def cgroup_dirs(self) -> list[Path]:
        """This engine's cgroup directories (its parent in each hierarchy) that exist now. The parent is
        relative to dockerd's own cgroup, which it inherits from this process: ``/harmony-engine-NAME``
        in a hierarchy where this process sits at the root, deeper where it does not."""
        if not CGROUP_ROOT.is_dir():
            return []
        own = _own_cgroups()
        found = []
        for hierarchy in CGROUP_ROOT.iterdir():
            names = hierarchy.name.split(",")
            bases = {""} | {own[n] for n in (*names, f"name={hierarchy.name}") if n in own}
            if hierarchy.name == "unified":
                bases.add(own.get("", ""))
            found += [d for d in {hierarchy / base / self.cgroup_parent for base in bases} if d.is_dir()]
        return sorted(found)

    def _claim_root(self) -> Path:
        root = self.wanted_root
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root.parent / f".{root.name}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            fresh = Path(tempfile.mkdtemp(prefix=f"{root.name}-", dir=root.parent))
            log.info("engine %s: %s is in use by another engine; using %s (removed afterwards)", self.name, root,
                     fresh)
            self._own_root = True
            return fresh
        self._lock = lock
        return root

    # ------------------------------------------------------------------------------ clients
    def docker(self, *args: str, check: bool = True, timeout: float | None = 600, input: bytes | None = None,
               env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``docker ARGS`` against this engine; output captured as text (``check``: raise on failure)."""
        return self._run([self.client, *args], check=check, timeout=timeout, input=input, env=env, cwd=cwd)

    def compose(self, compose_file: Path, *args: str, project: str, check: bool = True, timeout: float | None = 600,
                env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``docker-compose -f FILE -p PROJECT ARGS`` (Debian's 1.29) against this engine."""
        binary = shutil.which("docker-compose")
        if binary is None:
            raise EngineError("docker-compose not found: apt-get install docker-compose")
        return self._run([binary, "-f", str(compose_file), "-p", project, *args], check=check, timeout=timeout,
                         env=env, cwd=compose_file.parent)

    def inside(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = 120
               ) -> subprocess.CompletedProcess:
        """Run ``argv`` on the host in the engine's network namespace (its published loopback ports)."""
        return self._run(["nsenter", f"--net={self.netns}", *argv], check=check, timeout=timeout)

    def _run(self, argv: list[str], *, check: bool, timeout: float | None, input: bytes | None = None,
             env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        full_env = {**self.env, **(env or {})}
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, input=input, env=full_env, cwd=cwd)
        out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                          proc.stderr.decode(errors="replace"))
        if check and out.returncode != 0:
            raise EngineError(f"{' '.join(argv[:4])} ... failed ({out.returncode}): "
                              f"{(out.stderr or out.stdout)[-3000:]}")
        return out


def _own_cgroups() -> dict[str, str]:
    """Controller (``cpu``, ``memory``, ``name=systemd``; ``""`` for v2) → this process's cgroup path."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                out[controller] = parts[2].strip().lstrip("/")
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as err:
        log.warning("could not remove cgroup %s: %s", path, err)


def _mounts_under(prefixes: Sequence[str]) -> list[str]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if any(target == p or target.startswith(p.rstrip("/") + "/") for p in prefixes):
            out.append(target)
    return out
