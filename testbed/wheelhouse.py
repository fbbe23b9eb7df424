"""Wheelhouses: every wheel an agent (or a server) needs on a machine of another architecture, made here.

A board with no internet, or a container image built without an index, installs with
``pip install --no-index --find-links WHEELHOUSE 'harmony-testbed[agent]'``. The wheelhouse is made on
the operator's machine with ``pip download --platform ... --only-binary=:all:``, which picks wheels for
the *target*'s platform tags but evaluates dependency markers for *this* host: torch's own CUDA
dependencies (``platform_machine == "x86_64"``) would follow an aarch64 torch from an x86 host. So torch
is downloaded with ``--no-deps`` and its pure-Python dependencies are named here; every other
dependency is resolved normally (none of them carries an architecture marker).

The public call is :func:`build_wheelhouse`. Third-party wheels are downloaded once per
(machine, Python, torch spec, extras) into a cache directory under
``testbed.rootfs.cache_dir()/wheelhouse`` (or into ``dest``), guarded by a lock; the project's own wheel
is built afresh from this source tree on every call (a few seconds) and replaces the previous one.
"""

from __future__ import annotations

import fcntl
import logging
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from testbed.rootfs import cache_dir

log = logging.getLogger(__name__)

# What each extra of pyproject.toml needs besides torch (tests/test_wheelhouse.py keeps them equal).
EXTRA_DEPS: dict[str, tuple[str, ...]] = {
    "agent": ("numpy>=1.26", "paho-mqtt>=2.1,<3", "msgpack>=1.0", "psutil>=5.9", "pyyaml>=6"),
    "server": ("numpy>=1.26", "paho-mqtt>=2.1,<3", "msgpack>=1.0", "psutil>=5.9", "pyyaml>=6",
               "celery[redis]>=5.3,<6", "redis[hiredis]>=5", "cryptography>=41"),
    "monitor": ("starlette>=0.37", "uvicorn>=0.29", "prometheus-client>=0.20", "redis[hiredis]>=5"),
}
# What pip needs to build the project from its source (pyproject.toml's build-system.requires): an
# image's Dockerfile installs `.[EXTRA]` from the source tree, offline from the wheelhouse.
BUILD_DEPS = ("setuptools>=68", "wheel")
# Dependencies behind a marker that this host (pip evaluates markers for it, not for the target) may
# rule out: redis needs async-timeout on Python < 3.11.3, which Debian bookworm's 3.11.2 is.
MARKER_DEPS = {"redis[hiredis]>=5": ("async-timeout>=4.0.3",)}
# pyproject.toml's own dependencies besides torch: every extra installs them too
BASE_DEPS = ("numpy>=1.26", "pyyaml>=6", "pydantic>=2.6", "typer>=0.12", "rich>=13", "psutil>=5.9")
# torch's dependencies that are not CUDA libraries (the same for every torch from 2.8 to 2.13)
TORCH_PURE_DEPS = ("filelock", "typing-extensions>=4.10.0", "sympy>=1.13.3", "mpmath", "networkx>=2.5.1",
                   "jinja2", "MarkupSafe", "fsspec>=0.8.5", "setuptools")
MACHINES = ("aarch64", "x86_64")
# manylinux tags a target with glibc up to this version accepts; 2.31 covers Raspberry Pi OS bullseye
# and bookworm (2.36), Ubuntu 20.04 and 22.04 (JetPack 5 and 6), Debian bookworm images
DEFAULT_GLIBC = "2.31"
_SPEC_NAME = re.compile(r"^\s*torch\b", re.IGNORECASE)


class WheelhouseError(RuntimeError):
    """A wheelhouse could not be made; the message names the argument or the pip step that failed."""


def torch_requirement(torch_spec: str) -> str:
    """``"2.9.1"`` -> ``"torch==2.9.1"``; a specifier (``">=2.8,<2.10"``) or a whole requirement
    (``"torch==2.13.0+cpu"``) is kept as it is."""
    spec = torch_spec.strip()
    if not spec:
        raise WheelhouseError("torch_spec: empty; give a version (2.9.1) or a requirement (torch>=2.8,<2.10)")
    if _SPEC_NAME.match(spec):
        return spec
    if spec[0].isdigit():
        return f"torch=={spec}"
    if spec[0] in "<>=!~":
        return f"torch{spec}"
    raise WheelhouseError(f"torch_spec {torch_spec!r}: expected a version (2.9.1), a specifier (>=2.8,<2.10) "
                          "or a requirement (torch==2.13.0+cpu)")


def platform_tags(machine: str, glibc: str = DEFAULT_GLIBC) -> list[str]:
    """The wheel platform tags a Linux ``machine`` with glibc ``glibc`` installs, newest first."""
    if machine not in MACHINES:
        raise WheelhouseError(f"machine {machine!r}: one of {', '.join(MACHINES)} (uname -m of the target)")
    major, _, minor = glibc.partition(".")
    if major != "2" or not minor.isdigit() or int(minor) < 17:
        raise WheelhouseError(f"glibc {glibc!r}: expected 2.17 or newer, e.g. 2.31 (ldd --version on the target)")
    tags = [f"manylinux_2_{m}_{machine}" for m in range(int(minor), 16, -1)]
    return [*tags, f"manylinux2014_{machine}"]


def wheelhouse_dir(*, machine: str, torch_spec: str, extras: Sequence[str] = ("agent",),
                   python: str = "3.11") -> Path:
    """Where :func:`build_wheelhouse` keeps the wheelhouse for these arguments when no ``dest`` is given."""
    torch_part = re.sub(r"[^A-Za-z0-9.+_-]+", "_", torch_requirement(torch_spec).replace("torch", "", 1)).strip("_")
    name = f"{machine}-py{python}-torch{torch_part}-{'+'.join(sorted(extras)) or 'none'}"
    return cache_dir() / "wheelhouse" / name


def build_wheelhouse(dest: Path | None = None, *, machine: str, torch_spec: str,
                     extras: Sequence[str] = ("agent",), python: str = "3.11", torch_index: str | None = None,
                     glibc: str = DEFAULT_GLIBC, project_wheel: bool = True) -> Path:
    """Make (or bring up to date) a wheelhouse for a Linux ``machine`` and return its directory.

    ``machine``: ``aarch64`` or ``x86_64`` (the target's ``uname -m``). ``torch_spec``: a version
    (``"2.9.1"``), a specifier or a whole requirement (``"torch==2.13.0+cpu"``). ``extras``: the
    project's extras whose dependencies go in (``agent``; add ``server`` for a server image).
    ``python``: the target's ``MAJOR.MINOR``. ``torch_index``: an index URL for torch only (e.g.
    PyTorch's CPU index ``https://download.pytorch.org/whl/cpu``); other wheels come from pip's
    configured indexes. ``dest``: the directory to fill (default: :func:`wheelhouse_dir`, cached).
    ``project_wheel``: also build this source tree's ``harmony_testbed-*.whl`` into it (replacing an
    older one). The third-party download runs once per directory (a stamp file records it), so a
    second call is offline.

    Install from it on the target with
    ``pip install --no-index --find-links DIR 'harmony-testbed[agent]' 'torch==VERSION'``.
    """
    unknown = [e for e in extras if e not in EXTRA_DEPS]
    if unknown:
        raise WheelhouseError(f"extras {unknown}: known extras are {', '.join(EXTRA_DEPS)}")
    if not re.fullmatch(r"3\.\d+", python):
        raise WheelhouseError(f"python {python!r}: expected MAJOR.MINOR, e.g. 3.11")
    torch_req = torch_requirement(torch_spec)
    platforms = platform_tags(machine, glibc)
    dest = Path(dest) if dest is not None else wheelhouse_dir(machine=machine, torch_spec=torch_spec,
                                                              extras=extras, python=python)
    dest.mkdir(parents=True, exist_ok=True)
    deps = {d for e in extras for d in EXTRA_DEPS[e]} | set(TORCH_PURE_DEPS) | set(BUILD_DEPS) | set(BASE_DEPS)
    deps = sorted(deps | {m for d in deps for m in MARKER_DEPS.get(d, ())})
    # what was asked for, dependencies included: a changed list downloads again
    stamp_text = "\n".join([torch_req, f"index={torch_index}", python, *platforms, *sorted(extras), *deps]) + "\n"
    stamp = dest / ".harmony-wheelhouse-complete"
    with open(dest / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == stamp_text):
            stamp.unlink(missing_ok=True)
            target = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python,
                      "--abi", "cp" + python.replace(".", ""), *[a for p in platforms for a in ("--platform", p)]]
            index = ["--index-url", torch_index] if torch_index else []
            log.info("wheelhouse %s: downloading %s for %s (Python %s)", dest, torch_req, machine, python)
            _pip(["download", "-d", str(dest), *target, *index, "--no-deps", torch_req], f"downloading {torch_req}")
            _pip(["download", "-d", str(dest), *target, *deps], "downloading the dependencies")
            stamp.write_text(stamp_text)
        if project_wheel:
            from testbed.flash import build_wheel

            for old in dest.glob("harmony_testbed-*.whl"):
                old.unlink()
            wheel = build_wheel(dest)
            log.info("wheelhouse %s: %s", dest, wheel.name)
    return dest


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise WheelhouseError(f"{what} failed ({shlex.join(cmd)}):\n{(done.stderr or done.stdout)[-3000:]}")
