"""The device's resource profile for ``hello``: psutil facts, a matmul micro-benchmark, a link probe."""

from __future__ import annotations

import os
import time

import psutil
import torch

from broker.schemas import Hello

AGENT_VERSION = "0.1.0"


def matmul_gflops(size: int = 256, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a small fp32 matmul (a rough compute rate for split-depth assignment)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / max(time.perf_counter() - t0, 1e-9) / 1e9


def probe_hello(rtt_ms: float = 0.0, uplink_bps: float = 0.0) -> Hello:
    freq = psutil.cpu_freq()
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    return Hello(
        agent_version=AGENT_VERSION,
        cores=os.cpu_count() or 1,
        freq_mhz=float(freq.current) if freq else 0.0,
        memory_bytes=int(psutil.virtual_memory().total),
        load=float(os.getloadavg()[0]),
        gflops=matmul_gflops(),
        rtt_ms=rtt_ms,
        uplink_bps=uplink_bps,
        battery=float(battery.percent) if battery is not None else None,
    )
