"""The device's resource profile for ``hello``: psutil facts bounded by the container's cgroup limits,
a matmul micro-benchmark, a link probe.

Inside a container with CPU and memory limits (docker/compose.yaml gives each device class its
own), the host's core count and memory say nothing about the device being emulated, so the
profile takes the smaller of the host's value and the cgroup limit:

- cgroup v2 (``/sys/fs/cgroup``): ``cpu.max`` (``"max 100000"`` unlimited, ``"200000 100000"``
  2.0 CPUs) and ``memory.max`` (``"max"`` or bytes);
- cgroup v1 (fallback): ``cpu/cpu.cfs_quota_us`` over ``cpu/cpu.cfs_period_us`` (quota ``-1``
  unlimited; also under ``cpu,cpuacct/``) and ``memory/memory.limit_in_bytes``.

The cgroup read is the process's own (``/proc/self/cgroup``: where ``harmony fleet emulate`` puts
an emulated device's agent) when that directory exists under the mount, else the one at the
root of the mount (a container's own under Docker's default private cgroup namespace (v2) and
its bind-mounted hierarchies (v1)); limits set on ancestor cgroups are not seen.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from broker.schemas import Hello
from harmony.version import installed_version

AGENT_VERSION = installed_version()
"""The installed package version (``hello.agent_version``; the orchestrator admits only its own)."""
CGROUP_ROOT = Path("/sys/fs/cgroup")
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CgroupLimits:
    """A cgroup's CPU quota (in CPUs) and memory limit (bytes); ``None`` where unlimited or unreadable."""

    cpus: float | None = None
    memory_bytes: int | None = None


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"$QUOTA $PERIOD"``, quota ``max`` when unlimited) in CPUs."""
    fields = text.split()
    if not fields or len(fields) > 2:
        raise ValueError(f"cpu.max: expected '$QUOTA $PERIOD', got {text!r}")
    if fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) == 2 else 100_000  # the kernel's default period
    return _quota_cpus(int(fields[0]), period)


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (``-1`` when unlimited) over ``cpu.cfs_period_us``, in CPUs."""
    quota = int(quota_text.strip())
    if quota < 0:
        return None
    return _quota_cpus(quota, int(period_text.strip()))


def _quota_cpus(quota_us: int, period_us: int) -> float:
    if quota_us <= 0 or period_us <= 0:
        raise ValueError(f"expected a positive CPU quota and period, got {quota_us} / {period_us}")
    return quota_us / period_us


def parse_memory_limit(text: str) -> int | None:
    """cgroup v2 ``memory.max`` (``"max"`` when unlimited) or v1 ``memory.limit_in_bytes``, in bytes.

    v1 writes "unlimited" as a huge page-aligned number; it is returned as is and loses to the
    host's memory in :func:`effective_resources`.
    """
    text = text.strip()
    if text == "max":
        return None
    limit = int(text)
    if limit < 0:
        raise ValueError(f"expected a memory limit >= 0 bytes, got {limit}")
    return limit


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # absent (not this cgroup version, or no such controller) or not readable
        return None


def own_cgroups(proc_file: Path = Path("/proc/self/cgroup")) -> dict[str, str]:
    """Controller (``cpu``, ``memory``; ``""`` for v2) → this process's cgroup path, from ``proc_file``."""
    text = _read(proc_file)
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                out[controller] = parts[2].strip().lstrip("/")
    return out


def _own_dir(root: Path, hierarchy: str, path: str | None) -> Path:
    """``root/hierarchy/path`` when this process's cgroup directory exists there, else ``root/hierarchy``."""
    base = root / hierarchy if hierarchy else root
    if path:
        mine = base / path
        if mine.is_dir():
            return mine
    return base


def read_cgroup_limits(root: Path = CGROUP_ROOT, proc_file: Path = Path("/proc/self/cgroup")) -> CgroupLimits:
    """The CPU quota and memory limit of this process's cgroup under ``root`` (v2, else v1
    hierarchies; the root of the mount where the process's own directory is not there)."""
    cpus: float | None = None
    memory: int | None = None
    mine = own_cgroups(proc_file)
    try:
        if (text := _read(_own_dir(root, "", mine.get("")) / "cpu.max")) is not None:
            cpus = parse_cpu_max(text)
        else:
            for name in _V1_CPU_DIRS:
                where = _own_dir(root, name, mine.get("cpu"))
                quota, period = _read(where / "cpu.cfs_quota_us"), _read(where / "cpu.cfs_period_us")
                if quota is not None and period is not None:
                    cpus = parse_cfs_quota(quota, period)
                    break
    except ValueError as err:
        log.warning("cgroup CPU limit under %s unreadable (%s); using the host's cores", root, err)
        cpus = None
    try:
        text = _read(_own_dir(root, "", mine.get("")) / "memory.max")
        if text is None:
            text = _read(_own_dir(root, "memory", mine.get("memory")) / "memory.limit_in_bytes")
        if text is not None:
            memory = parse_memory_limit(text)
    except ValueError as err:
        log.warning("cgroup memory limit under %s unreadable (%s); using the host's memory", root, err)
        memory = None
    return CgroupLimits(cpus=cpus, memory_bytes=memory)


@dataclass(frozen=True)
class Resources:
    """What the device may use: whole cores it can run on, CPU time in CPUs, memory in bytes."""

    cores: int
    cpus: float
    memory_bytes: int


def effective_resources(host_cores: int, host_memory_bytes: int, limits: CgroupLimits) -> Resources:
    """The smaller of the host's value and the cgroup limit, for CPUs and for memory.

    ``cores`` is the CPU quota rounded up (1.5 CPUs run on 2 cores, throttled), at least 1.
    """
    cpus = float(host_cores) if limits.cpus is None else min(float(host_cores), limits.cpus)
    memory = host_memory_bytes if limits.memory_bytes is None else min(host_memory_bytes, limits.memory_bytes)
    return Resources(cores=max(1, min(host_cores, math.ceil(cpus))), cpus=cpus, memory_bytes=memory)


def host_cores() -> int:
    """Logical CPUs this process may be scheduled on (its affinity mask: a cpuset is a limit too)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def matmul_gflops(size: int = 256, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a small fp32 matmul (a rough compute rate for split-depth assignment)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / max(time.perf_counter() - t0, 1e-9) / 1e9


def _kernel_layers() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """One small training layer of each kind ``harmony.assignment.KERNELS`` names, with its input."""
    nn = torch.nn
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {
            "conv": (nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
                     torch.randn(8, 16, 16, 16)),
            "depthwise": (nn.Sequential(nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.ReLU6(),
                                        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.BatchNorm2d(64), nn.ReLU6(),
                                        nn.Conv2d(64, 16, 1), nn.BatchNorm2d(16)),
                          torch.randn(8, 16, 16, 16)),
            "attention": (nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True),
                          torch.randn(8, 16, 64)),
        }


def kernel_rates(slowdown: float = 1.0, repeats: int = 3, *, pace_flops: float | None = None,
                 sustained_s: float = 0.0) -> dict[str, float]:
    """Training FLOP/s (forward + backward, counted by torch's FLOP counter) of one small layer of
    each kind, the best of ``repeats`` timed steps, on a device emulated ``slowdown`` times slower
    than this host (the agent's pacing sleeps ``slowdown − 1`` times each compute phase, so such a
    device computes at the host's rate ÷ ``slowdown``; timing the sleeps too would only make a
    very slow emulated device take minutes to register).

    ``pace_flops``: the agent paces compute to that rate (``--emulate``): each timed step is padded
    to its FLOPs ÷ that rate, as a training step is, and the padded time is what is measured.
    ``sustained_s``: under a CPU quota a short burst runs at full speed until the quota of the CFS
    period is spent, so the best single step says nothing; time back-to-back steps for at least
    that many seconds instead and take their mean rate."""
    from torch.utils.flop_counter import FlopCounterMode

    rates: dict[str, float] = {}
    for kind, (layer, x) in _kernel_layers().items():
        def step(layer: torch.nn.Module = layer, x: torch.Tensor = x) -> None:
            layer.zero_grad(set_to_none=True)
            layer(x).square().mean().backward()

        with FlopCounterMode(display=False) as counter:
            step()  # also the warm-up
        flops = counter.get_total_flops()
        if sustained_s > 0:
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < sustained_s or n < repeats:
                t1 = time.perf_counter()
                step()
                n += 1
                if pace_flops is not None and (left := flops / pace_flops - (time.perf_counter() - t1)) > 0:
                    time.sleep(left)
            rates[kind] = n * flops / elapsed / slowdown
            continue
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            if pace_flops is not None:
                left = flops / pace_flops - (time.perf_counter() - t0)
                if left > 0:
                    time.sleep(left)
            best = min(best, time.perf_counter() - t0)
        rates[kind] = flops / max(best, 1e-9) / slowdown
    return rates


def probe_link(publish: Callable[[bytes], None], payload_bytes: int = 256 * 1024, repeats: int = 2
               ) -> tuple[float, float]:
    """``(rtt_ms, uplink_bps)`` of the link under ``publish`` (one acknowledged publish of that many
    bytes): the round trip of a 1-byte publish, the best of three, and the bits of a
    ``payload_bytes`` publish (the best of ``repeats``) over the time it took beyond that round trip."""
    def timed(n: int) -> float:
        t0 = time.perf_counter()
        publish(b"\0" * n)
        return time.perf_counter() - t0

    rtt = min(timed(1) for _ in range(3))
    big = min(timed(payload_bytes) for _ in range(repeats))
    return rtt * 1e3, payload_bytes * 8 / max(big - rtt, 1e-6)


def cpu_quota_cpus(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """This process's CPU quota in CPUs when it is below the cores it may run on, else None."""
    cpus = read_cgroup_limits(cgroup_root).cpus
    return cpus if cpus is not None and cpus < host_cores() else None


def probe_hello(rtt_ms: float = 0.0, uplink_bps: float = 0.0, cgroup_root: Path = CGROUP_ROOT,
                rates: dict[str, float] | None = None, device_class: str | None = None) -> Hello:
    """This device's ``hello``: host facts from psutil, bounded by the cgroup limits under ``cgroup_root``;
    ``rtt_ms``/``uplink_bps`` from :func:`probe_link`, ``rates`` from :func:`kernel_rates`."""
    freq = psutil.cpu_freq()
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    resources = effective_resources(host_cores(), int(psutil.virtual_memory().total),
                                    read_cgroup_limits(cgroup_root))
    return Hello(
        agent_version=AGENT_VERSION,
        cores=resources.cores,
        freq_mhz=float(freq.current) if freq else 0.0,
        memory_bytes=resources.memory_bytes,
        load=float(os.getloadavg()[0]),
        gflops=matmul_gflops(),
        rtt_ms=rtt_ms,
        uplink_bps=uplink_bps,
        battery=float(battery.percent) if battery is not None else None,
        cpus=resources.cpus,
        rates=rates,
        device_class=device_class,
    )
