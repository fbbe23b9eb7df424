"""Emulated arm64 boards on this machine: ``harmony board up --cpu cortex-a72 --memory 1g``.

A board is the Debian bookworm arm64 root of :func:`testbed.rootfs.debian_root` (made once, cached),
seen through an overlay whose upper layer is the board's own directory (the cached root is never
changed), with ``/proc``, ``/sys`` and ``/dev`` mounted, in a mount namespace of its own, running its
own ``sshd`` (the board's arm64 binary) on a free loopback port that accepts a key made for the board.
Every process in it runs under qemu-user-static through binfmt_misc as the CPU model ``--cpu``: qemu
reads ``QEMU_CPU`` from each process's environment, so sshd is started with it and hands it to every
session (``SetEnv``) — an instruction the model lacks ends a process with SIGILL, as on the real board.
A cgroup v1 ``memory`` limit (``--memory``) holds the board and everything started in it.

CPU models: ``cortex-a72`` (Raspberry Pi 4), ``cortex-a53`` (Pi Zero 2 W, Pi 3), ``cortex-a76`` (Pi 5).
The emulated core is slow (~0.2 GFLOP/s for a training step): give it small configs and long deadlines.

Boards live in ``testbed.rootfs.cache_dir()/boards/NAME`` (``board.json`` describes a running one);
``harmony board down NAME`` stops every process of the board by PID, and the namespace, its mounts
and the cgroup go with them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed.rootfs import BOARD_PACKAGES, RootfsError, cache_dir, debian_root, ensure_binfmt

log = logging.getLogger(__name__)

CPU_MODELS = {"cortex-a72": "Raspberry Pi 4", "cortex-a53": "Raspberry Pi Zero 2 W / Pi 3",
              "cortex-a76": "Raspberry Pi 5"}
MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)i?b?$", re.IGNORECASE)


class BoardError(RuntimeError):
    """A board cannot be made, found or stopped; the message names the option or the missing tool."""


def parse_memory(text: str) -> int:
    """``1g``, ``512m``, ``1.5G``, ``2GiB`` -> bytes."""
    match = _SIZE.match(text.strip())
    if not match:
        raise BoardError(f"--memory {text!r}: expected a size such as 512m or 1g")
    value = float(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2).lower()]
    if value < 64 * 2**20:
        raise BoardError(f"--memory {text!r}: at least 64m (a board's sshd and Python need it)")
    return int(value)


@dataclass
class Board:
    """A running (or stopped) emulated board, as ``board.json`` records it."""

    name: str
    cpu: str
    memory_bytes: int
    ssh_port: int
    pid: int
    directory: str
    identity: str
    known_hosts: str
    cgroup: str | None

    @property
    def target(self) -> str:
        return "root@127.0.0.1"

    def ssh_options(self) -> list[str]:
        """The ``-o`` options that trust this board's host key (for ``ssh`` and ``harmony flash --ssh-option``)."""
        return [f"UserKnownHostsFile={self.known_hosts}", "StrictHostKeyChecking=accept-new"]

    def ssh(self, command: str) -> list[str]:
        """The argv that runs ``command`` on the board."""
        opts = [a for o in self.ssh_options() for a in ("-o", o)]
        return ["ssh", "-p", str(self.ssh_port), "-i", self.identity, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                *opts, self.target, command]

    def flash_args(self) -> list[str]:
        """``harmony flash`` arguments that reach this board."""
        args = [self.target, "--ssh-port", str(self.ssh_port), "--identity", self.identity]
        for opt in self.ssh_options():
            args += ["--ssh-option", opt]
        return args

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def pids(self) -> list[int]:
        """Every process in the board's memory cgroup (all it started), else just its sshd."""
        if self.cgroup:
            try:
                return [int(p) for p in Path(self.cgroup, "cgroup.procs").read_text().split()]
            except OSError:
                pass
        return [self.pid] if self.alive() else []

    def describe(self) -> str:
        state = "up" if self.alive() else "down"
        return (f"{self.name}: {state}, {self.cpu} ({CPU_MODELS.get(self.cpu, '?')}), "
                f"{self.memory_bytes / 2**20:.0f} MiB, ssh -p {self.ssh_port} -i {self.identity} {self.target}")


def boards_dir() -> Path:
    return cache_dir() / "boards"


def _free_port() -> int:
    from broker.mosquitto import free_port

    return free_port()


def board_up(name: str, *, cpu: str = "cortex-a72", memory: str | int = "1g", directory: Path | None = None,
             ready_timeout_s: float = 600.0) -> Board:
    """Make and start the board ``name`` (see the module docstring); returns once its sshd accepts the key."""
    if not _NAME.match(name):
        raise BoardError(f"board name {name!r}: 1-31 of a-z 0-9 -, starting with a letter or digit")
    if cpu not in CPU_MODELS:
        raise BoardError(f"--cpu {cpu!r}: one of {', '.join(CPU_MODELS)} ({', '.join(CPU_MODELS.values())})")
    memory_bytes = memory if isinstance(memory, int) else parse_memory(memory)
    if os.geteuid() != 0:
        raise BoardError("an emulated board needs root (mounts, chroot, cgroups): run as root")
    for tool in ("unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise BoardError(f"`{tool}` not found: apt-get install util-linux openssh-client")
    home = directory or boards_dir() / name
    existing = _read(home)
    if existing is not None and existing.alive():
        raise BoardError(f"board {name} is already up ({existing.describe()}); `harmony board down {name}` first")
    try:
        ensure_binfmt("arm64")
        lower = debian_root("arm64", BOARD_PACKAGES)
    except RootfsError as err:
        raise BoardError(str(err)) from None
    for sub in ("upper", "work", "merged", "keys"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(home / "work", ignore_errors=True)
    (home / "work").mkdir()
    keys = home / "keys"
    for key in ("host_key", "client_key"):
        if not (keys / key).exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"harmony-board-{name}", "-f",
                            str(keys / key)], check=True, capture_output=True)
    (keys / "known_hosts").unlink(missing_ok=True)
    port = _free_port()
    etc = home / "upper" / "etc" / "harmony-board"
    etc.mkdir(parents=True, exist_ok=True)
    shutil.copy(keys / "host_key", etc / "host_key")
    (etc / "host_key").chmod(0o600)
    shutil.copy(keys / "client_key.pub", etc / "authorized_keys")
    (home / "upper" / "run" / "sshd").mkdir(parents=True, exist_ok=True)
    (etc / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", "HostKey /etc/harmony-board/host_key",
        "PidFile /run/harmony-board-sshd.pid", "AuthorizedKeysFile /etc/harmony-board/authorized_keys",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no",
        # every session's processes run as the board's CPU (qemu-user reads QEMU_CPU from the environment)
        f"SetEnv QEMU_CPU={cpu}", "Subsystem sftp /usr/lib/openssh/sftp-server", ""]))
    cgroup = _memory_cgroup(name, memory_bytes)
    merged = home / "merged"
    script = " && ".join([
        f"mount -t overlay overlay -o lowerdir={lower},upperdir={home / 'upper'},workdir={home / 'work'} {merged}",
        f"mount -t proc proc {merged}/proc", f"mount --rbind /sys {merged}/sys", f"mount --rbind /dev {merged}/dev",
        f"exec chroot {merged} /usr/sbin/sshd -D -e -f /etc/harmony-board/sshd_config",
    ])
    env = {"QEMU_CPU": cpu, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

    def join_cgroup() -> None:  # in the child, before exec: the board starts inside its limit
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    with open(home / "sshd.log", "ab") as handle:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=join_cgroup, start_new_session=True)
    board = Board(name=name, cpu=cpu, memory_bytes=memory_bytes, ssh_port=port, pid=proc.pid, directory=str(home),
                  identity=str(keys / "client_key"), known_hosts=str(keys / "known_hosts"),
                  cgroup=None if cgroup is None else str(cgroup))
    (home / "board.json").write_text(json.dumps(asdict(board), indent=1) + "\n")
    deadline = time.monotonic() + ready_timeout_s
    while True:
        done = subprocess.run(board.ssh("echo $QEMU_CPU"), capture_output=True, text=True, timeout=ready_timeout_s)
        if done.returncode == 0:
            if done.stdout.strip() != cpu:
                board_down(name, directory=home)
                raise BoardError(f"board {name}: sessions see QEMU_CPU={done.stdout.strip()!r}, not {cpu!r}")
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (home / "sshd.log").read_text(errors="replace")[-2000:]
            board_down(name, directory=home)
            raise BoardError(f"board {name}: its sshd did not accept the key within {ready_timeout_s:.0f} s:\n{tail}")
        time.sleep(1.0)
    log.info("board %s up: %s", name, board.describe())
    return board


def _memory_cgroup(name: str, memory_bytes: int) -> Path | None:
    if not MEMORY_CGROUP.is_dir():
        log.warning("no cgroup v1 memory controller at %s: board %s runs without a memory limit", MEMORY_CGROUP, name)
        return None
    path = MEMORY_CGROUP / f"hboard-{name}"
    path.mkdir(exist_ok=True)
    (path / "memory.limit_in_bytes").write_text(str(memory_bytes))
    if (path / "memory.memsw.limit_in_bytes").exists():
        (path / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))  # no swap softens it
    return path


def _read(home: Path) -> Board | None:
    try:
        return Board(**json.loads((home / "board.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def find_board(name: str, directory: Path | None = None) -> Board:
    board = _read(directory or boards_dir() / name)
    if board is None:
        raise BoardError(f"no board {name!r} in {directory or boards_dir()} (`harmony board list`)")
    return board


def board_down(name: str, *, directory: Path | None = None, timeout_s: float = 30.0) -> Board:
    """Stop every process of the board (its sshd first, then what its sessions started) by PID; the mount
    namespace and its mounts go with the last one; the cgroup is removed. The board's files stay."""
    board = find_board(name, directory)
    if board.alive():
        os.kill(board.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while True:
        pids = board.pids()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL if time.monotonic() > deadline - timeout_s / 2 else signal.SIGTERM)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise BoardError(f"board {name}: processes {pids} still running after {timeout_s:.0f} s")
        time.sleep(0.2)
    if board.cgroup:
        try:
            Path(board.cgroup).rmdir()
        except OSError as err:
            log.warning("board %s: cgroup %s not removed: %s", name, board.cgroup, err)
    return board


def list_boards() -> list[Board]:
    """The boards under :func:`boards_dir`, up or down."""
    base = boards_dir()
    found = [_read(d) for d in sorted(base.iterdir())] if base.is_dir() else []
    return [b for b in found if b is not None]


@contextmanager
def emulated_board(name: str, *, cpu: str = "cortex-a72", memory: str | int = "1g",
                   directory: Path | None = None) -> Iterator[Board]:
    """A board for the length of a ``with`` block (the tests' fixture): up, then down whatever happens."""
    board = board_up(name, cpu=cpu, memory=memory, directory=directory)
    try:
        yield board
    finally:
        board_down(name, directory=Path(board.directory))
