"""Smoke sizes of the benchmarks: they run and print their JSON line (figures, not targets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_engine_throughput_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/engine_throughput.py", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "engine_throughput"
    assert result["ratio_to_floor"] > 0 and result["gflops"] > 0 and result["matmul_gflops"] > 0


def test_speed_options_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/speed_options.py", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "speed_options"
    assert set(result["seconds_per_step"]) == {"contiguous", "channels_last", "bf16_autocast", "compile",
                                               "vmap_8", "loop_8"}
    assert all(v > 0 for v in result["seconds_per_step"].values())
    assert result["time_vs_channels_last"]["channels_last"] == 1.0
