"""What a board is, read over SSH before anything is installed, and which torch it gets.

``PROBE_SCRIPT`` runs with the board's own Python and prints one JSON object: ``uname -m``, the Python
version, the CPU (``/proc/cpuinfo``'s implementer/part, the instruction-set features of the kernel's
``AT_HWCAP`` read from ``/proc/self/auxv`` — what the CPU really executes, also under qemu-user where
``/proc/cpuinfo`` shows the host's CPU), a Jetson's L4T release (``/etc/nv_tegra_release``) and the torch
its system Python has, free memory (bounded by the cgroup limit) and free disk. :func:`parse_probe`
turns it into :class:`BoardFacts`; :func:`choose_torch` is the pure decision (facts in, torch
requirement, index and reason out) that ``harmony flash`` follows and ``--dry-run`` prints.

Why the choice is needed (benchmarks/RESULTS.md, docs/flashing.md): PyPI's aarch64 torch 2.11 and newer
are CUDA builds that need NVIDIA's libraries; 2.10.0, the last CPU-only one there, dies with SIGILL on
the Armv8.0 cores of a Pi 4 (Cortex-A72) and a Pi Zero 2 W / Pi 3 (Cortex-A53); 2.9.1 runs on them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from edge_agent.selfcheck import ARM_CORES

TORCH_RANGE = ((2, 8), (2, 13))
"""The torch releases the agent supports on devices (pyproject.toml's ``[agent]`` extra), first and last."""
PINNED_TORCH = "2.13.0"
"""The server's torch (the ``[server]`` extra), and what a board gets where a CPU build of it runs."""
ARMV80_TORCH = "2.9.1"
"""The newest torch with a CPU-only aarch64 wheel on PyPI that runs on Armv8.0 cores (Cortex-A53/A72)."""
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Armv8.2-A features whose absence marks an Armv8.0 core (Cortex-A53, A57, A72): torch >= 2.10 on aarch64
# executes instructions of this level (the board matrix: SIGILL at import on A53/A72)
ARMV82_FEATURES = frozenset({"atomics", "asimdrdm", "fphp", "asimdhp", "dcpop"})

# AArch64 AT_HWCAP bits as Linux names them (arch/arm64/include/uapi/asm/hwcap.h), as /proc/cpuinfo lists them
HWCAP_NAMES = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
               "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512",
               "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg")
PROBE_SCRIPT = r"""
import json, os, platform, shutil, struct, sys
f = {"machine": platform.machine(), "python": "%d.%d" % sys.version_info[:2]}
try:
    f["cpuinfo"] = open("/proc/cpuinfo").read()[:20000]
except OSError:
    pass
try:
    aux = open("/proc/self/auxv", "rb").read()
    pairs = dict(struct.iter_unpack("<QQ", aux[: len(aux) // 16 * 16]))
    f["hwcap"], f["hwcap2"] = pairs.get(16, 0), pairs.get(26, 0)
except (OSError, struct.error):
    pass
try:
    f["l4t"] = open("/etc/nv_tegra_release").readline().strip()
except OSError:
    pass
if "l4t" in f:
    try:
        from importlib import metadata
        f["system_torch"] = metadata.version("torch")
    except Exception:
        pass
try:
    f["mem_available"] = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))) * 1024
except (OSError, StopIteration, ValueError):
    pass
for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
        v = open(p).read().strip()
    except OSError:
        continue
    if v.isdigit():
        f["cgroup_memory_limit"] = int(v)
    break
d = os.environ.get("HARMONY_PROBE_DIR") or "/"
while d != "/" and not os.path.isdir(d):
    d = os.path.dirname(d)
f["disk_free"] = shutil.disk_usage(d).free
if os.environ.get("QEMU_CPU"):
    f["qemu_cpu"] = os.environ["QEMU_CPU"]
print(json.dumps(f))
"""


class ProbeError(ValueError):
    """The board's probe output could not be read; the message says which fact."""


@dataclass(frozen=True)
class BoardFacts:
    """What :data:`PROBE_SCRIPT` found on a board."""

    machine: str
    python: tuple[int, int] | None = None
    cpu: str = "unknown CPU"
    features: frozenset[str] = frozenset()
    l4t: str | None = None
    """A Jetson's L4T release (``35.4.1``); None elsewhere."""
    system_torch: str | None = None
    """The torch version the board's system Python has (read on Jetsons only)."""
    mem_available: int | None = None
    disk_free: int | None = None
    emulated: str | None = None
    """The qemu-user CPU model when the "board" is emulated (``QEMU_CPU``)."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        """One line: CPU, architecture, Python, memory, disk."""
        parts = [f"{self.cpu} ({self.machine})"]
        if self.python:
            parts.append(f"Python {self.python[0]}.{self.python[1]}")
        if self.l4t:
            parts.append(f"Jetson L4T {self.l4t}" + (f" with torch {self.system_torch}" if self.system_torch else ""))
        if self.mem_available is not None:
            parts.append(f"{self.mem_available / 2**20:.0f} MiB free memory")
        if self.disk_free is not None:
            parts.append(f"{self.disk_free / 2**30:.1f} GiB free disk")
        return ", ".join(parts)


def hwcap_features(hwcap: int) -> frozenset[str]:
    """The feature names set in an AArch64 ``AT_HWCAP`` value."""
    return frozenset(name for bit, name in enumerate(HWCAP_NAMES) if hwcap >> bit & 1)


def parse_cpuinfo(text: str) -> tuple[str | None, frozenset[str]]:
    """``(core name or None, features)`` from an aarch64 ``/proc/cpuinfo`` (first core)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    features = frozenset(fields.get("Features", "").split())
    name = None
    try:
        implementer, part = int(fields["CPU implementer"], 16), int(fields["CPU part"], 16)
        name = ARM_CORES.get((implementer, part), f"Arm core implementer {implementer:#x} part {part:#05x}")
    except (KeyError, ValueError):
        pass
    return name, features


def parse_l4t(line: str) -> str | None:
    """``# R35 (release), REVISION: 4.1, GCID: …`` -> ``35.4.1``."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", line)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def parse_probe(doc: dict[str, Any] | str) -> BoardFacts:
    """:class:`BoardFacts` from :data:`PROBE_SCRIPT`'s JSON (a string or the decoded object)."""
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except json.JSONDecodeError as err:
            raise ProbeError(f"board probe: not JSON ({err}): {doc[:200]!r}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("machine"), str):
        raise ProbeError(f"board probe: expected an object with 'machine', got {str(doc)[:200]!r}")
    python = None
    if isinstance(doc.get("python"), str) and re.fullmatch(r"\d+\.\d+", doc["python"]):
        major, minor = doc["python"].split(".")
        python = (int(major), int(minor))
    name, features = parse_cpuinfo(doc.get("cpuinfo", "")) if doc["machine"] == "aarch64" else (None, frozenset())
    if isinstance(doc.get("hwcap"), int) and doc["machine"] == "aarch64":
        features = hwcap_features(doc["hwcap"])  # what the CPU executes (also under qemu-user)
    emulated = doc.get("qemu_cpu") if isinstance(doc.get("qemu_cpu"), str) else None
    if emulated:
        name = f"{emulated} (emulated by qemu-user)"
    elif name is None:
        model = re.search(r"^model name\s*:\s*(.+)$", doc.get("cpuinfo", ""), re.MULTILINE)
        name = model.group(1).strip() if model else "unknown CPU"
    mem = doc.get("mem_available")
    limit = doc.get("cgroup_memory_limit")
    if isinstance(mem, int) and isinstance(limit, int) and limit < mem:
        mem = limit
    return BoardFacts(machine=doc["machine"], python=python, cpu=name, features=features,
                      l4t=parse_l4t(doc["l4t"]) if isinstance(doc.get("l4t"), str) else None,
                      system_torch=doc.get("system_torch") if isinstance(doc.get("system_torch"), str) else None,
                      mem_available=mem if isinstance(mem, int) else None,
                      disk_free=doc.get("disk_free") if isinstance(doc.get("disk_free"), int) else None,
                      emulated=emulated, raw=doc)


@dataclass(frozen=True)
class TorchChoice:
    """The torch a board gets: ``requirement`` for pip (None: use the board's own), from ``index_url``
    (None: pip's defaults or the wheelhouse), with ``system_site_packages`` for a board-provided torch."""

    requirement: str | None
    index_url: str | None
    system_site_packages: bool
    reason: str

    def describe(self) -> str:
        what = (self.requirement or "the board's own torch") + (f" from {self.index_url}" if self.index_url else "")
        return f"torch: {what} — {self.reason}"


def torch_version_tuple(version: str) -> tuple[int, int]:
    """``"2.9.1+cpu"`` -> ``(2, 9)``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"torch version {version!r}: expected MAJOR.MINOR[.PATCH]")
    return int(match.group(1)), int(match.group(2))


def in_range(version: str) -> bool:
    """Whether a torch version is one the agent supports (:data:`TORCH_RANGE`)."""
    return TORCH_RANGE[0] <= torch_version_tuple(version) <= TORCH_RANGE[1]


def is_armv80(facts: BoardFacts) -> bool:
    """An aarch64 core without the Armv8.2-A features torch >= 2.10 uses (Cortex-A53, A57, A72)."""
    return facts.machine == "aarch64" and not ARMV82_FEATURES <= facts.features


def choose_torch(facts: BoardFacts, *, override: str | None = None, wheelhouse: bool = False) -> TorchChoice:
    """The torch for a board, and why (pure: the same facts give the same choice).

    ``override`` (``--torch SPEC``) wins; a Jetson whose system torch is in range keeps it (its CUDA build,
    through ``--system-site-packages``); an Armv8.0 aarch64 core gets :data:`ARMV80_TORCH` from PyPI; a newer
    aarch64 core the server's :data:`PINNED_TORCH` from PyTorch's CPU index (PyPI's is a CUDA build); x86_64
    the pinned version from the CPU index. ``wheelhouse``: the wheels come from a local directory, so no
    index is named.
    """
    from testbed.wheelhouse import torch_requirement

    index = None if wheelhouse else PYTORCH_CPU_INDEX
    if override:
        requirement = torch_requirement(override)
        version = re.search(r"==\s*([0-9][\w.+]*)", requirement)
        if version and not in_range(version.group(1)):
            lo, hi = TORCH_RANGE
            raise ValueError(f"--torch {override}: the agent supports torch {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}")
        warn = ""
        if version and is_armv80(facts) and torch_version_tuple(version.group(1)) >= (2, 10):
            missing = ", ".join(sorted(ARMV82_FEATURES - facts.features))
            warn = (f"; note: {facts.cpu} lacks Armv8.2 features ({missing}) and torch >= 2.10 dies there with "
                    "SIGILL, the self-check will say so")
        return TorchChoice(requirement, None, False, f"--torch {override} given{warn}")
    if facts.l4t is not None:
        if facts.system_torch and in_range(facts.system_torch):
            return TorchChoice(None, None, True, f"Jetson (L4T {facts.l4t}) with JetPack's torch {facts.system_torch} "
                               "(CUDA) in the supported range: the agent's venv uses it (--system-site-packages)")
        have = (f"its torch {facts.system_torch} is outside" if facts.system_torch
                else "no JetPack torch is installed, in")
        reason = (f"Jetson (L4T {facts.l4t}): {have} the supported range, so the agent runs on the CPU; install "
                  "NVIDIA's torch for this JetPack and flash again to use the GPU")
        if is_armv80(facts):
            return TorchChoice(f"torch=={ARMV80_TORCH}", None, False, reason)
        return TorchChoice(f"torch=={PINNED_TORCH}", index, False, reason)
    if facts.machine == "aarch64":
        if is_armv80(facts):
            missing = ", ".join(sorted(ARMV82_FEATURES - facts.features))
            return TorchChoice(f"torch=={ARMV80_TORCH}", None, False,
                               f"{facts.cpu} is an Armv8.0 core (no {missing}): torch 2.10+ aarch64 builds die there "
                               f"with SIGILL; {ARMV80_TORCH} is the newest CPU-only aarch64 wheel on PyPI that runs")
        return TorchChoice(f"torch=={PINNED_TORCH}", index, False,
                           f"{facts.cpu} has the Armv8.2 features torch 2.10+ needs; PyPI's aarch64 {PINNED_TORCH} is "
                           "a CUDA build, so the server's version comes from PyTorch's CPU index")
    if facts.machine == "x86_64":
        return TorchChoice(f"torch=={PINNED_TORCH}", index, False,
                           "x86_64: the server's version, CPU-only build (PyPI's x86_64 wheel pulls CUDA libraries)")
    raise ValueError(f"{facts.machine}: no torch for this architecture (a 64-bit OS on aarch64 or x86_64 is needed)")
