"""Debian root file systems for emulated boards and locally made container base images.

A root is made with ``debootstrap`` (a foreign architecture is finished under qemu-user-static
through binfmt_misc) and cached between runs under ``$HARMONY_CACHE/rootfs`` (default
``~/.cache/harmony-testbed/rootfs``), one directory per (suite, architecture, variant, packages).
Two processes asking for the same root at once wait on a lock file; a root whose build was
interrupted is made again from scratch, never used half-made.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# Debian architecture name -> the qemu-user binfmt entry that runs its binaries
QEMU_BINFMT = {"arm64": "qemu-aarch64", "armhf": "qemu-arm", "amd64": "qemu-x86_64"}
_HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}


class RootfsError(RuntimeError):
    """A root file system could not be made; the message names the missing tool or failed step."""


def host_arch() -> str:
    """The host's Debian architecture name (``amd64``, ``arm64``)."""
    machine = platform.machine()
    return _HOST_ARCH.get(machine, machine)


def cache_dir() -> Path:
    """Where made roots, wheelhouses and images are kept between runs."""
    return Path(os.environ.get("HARMONY_CACHE", Path.home() / ".cache" / "harmony-testbed"))


def ensure_binfmt(arch: str) -> None:
    """Make binaries of ``arch`` run on this host through qemu-user-static (``F`` flag: also inside
    chroots and containers). A no-op for the host's own architecture."""
    if arch == host_arch():
        return
    entry = QEMU_BINFMT.get(arch)
    if entry is None:
        raise RootfsError(f"architecture {arch!r}: no qemu-user emulation known (one of {sorted(QEMU_BINFMT)})")
    if not (BINFMT_DIR / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], "mounting binfmt_misc")
    if not (BINFMT_DIR / entry).exists():
        if shutil.which("update-binfmts") is None:
            raise RootfsError("update-binfmts not found: apt-get install qemu-user-static binfmt-support")
        _run(["update-binfmts", "--enable", entry], f"enabling the {entry} binfmt entry")
    text = (BINFMT_DIR / entry).read_text()
    if not text.startswith("enabled"):
        _run(["update-binfmts", "--enable", entry], f"enabling the {entry} binfmt entry")
    flags = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), "")
    if "F" not in flags:
        raise RootfsError(f"binfmt entry {entry} lacks the F flag (flags {flags!r}): containers and chroots would "
                          "not find the interpreter; install Debian's qemu-user-static, whose entries carry it")


def root_key(arch: str, packages: Sequence[str], suite: str = DEFAULT_SUITE, variant: str = "minbase") -> str:
    """The cache directory name of a root: readable prefix plus a digest of what is in it."""
    digest = hashlib.sha256("\n".join([arch, suite, variant, *sorted(packages)]).encode()).hexdigest()[:12]
    return f"{suite}-{arch}-{variant}-{digest}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def debian_root(arch: str, packages: Sequence[str] = (), *, suite: str = DEFAULT_SUITE,
                variant: str = "minbase", mirror: str | None = None, cache: Path | None = None) -> Path:
    """A Debian root of ``arch`` with ``packages``, made once and cached; returns its directory.

    The root is read-only by convention: callers that change files copy it first (or mount an
    overlay). ``mirror`` defaults to ``$HARMONY_DEBIAN_MIRROR`` or Debian's own."""
    base = (cache or cache_dir()) / "rootfs"
    root = base / root_key(arch, packages, suite, variant)
    done = root / ".harmony-root-complete"
    if done.exists():
        return root
    for tool in ("debootstrap", "chroot"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise RootfsError(f"{tool} not found: apt-get install debootstrap qemu-user-static binfmt-support")
    with _locked(base / f"{root.name}.lock"):
        if done.exists():
            return root
        mirror = mirror or os.environ.get("HARMONY_DEBIAN_MIRROR", DEFAULT_MIRROR)
        foreign = arch != host_arch()
        if foreign:
            ensure_binfmt(arch)
        partial = base / f"{root.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        cmd = ["debootstrap", f"--arch={arch}", f"--variant={variant}"]
        if packages:
            cmd.append("--include=" + ",".join(packages))
        if foreign:
            cmd.append("--foreign")
        log.info("making a Debian %s %s root in %s (a few minutes under emulation; cached afterwards)",
                 suite, arch, root)
        _run([*cmd, suite, str(partial), mirror], f"debootstrap of {suite}/{arch}")
        if foreign:
            _run(["chroot", str(partial), "/debootstrap/debootstrap", "--second-stage"],
                 f"debootstrap's second stage for {arch} under qemu-user")
        # apt's caches are not needed in a finished root and cost ~100 MB per copy
        shutil.rmtree(partial / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        (partial / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        partial.rename(root)
        done.write_text(f"{suite} {arch} {variant} {' '.join(sorted(packages))}\n")
    return root


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RootfsError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))


# What an emulated board's root holds: Python for the agent's venv, sshd for `harmony flash`.
BOARD_PACKAGES = ("python3", "python3-venv", "python3-pip", "openssh-server", "ca-certificates", "procps")
# What a locally made container base image holds (the stand-in for python:3.11-slim).
IMAGE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
