"""The fuzz benchmark's smoke size: 100 generated payloads into a running stack during a round —
0 crashes, 0 state changes (weights and accuracy equal the local run bit for bit), every one answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fuzz_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/fuzz.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "fuzz" and result["payloads"] == 100, result
    assert (result["crashes"], result["state_changes"], result["unanswered"]) == (0, 0, 0), result
    assert {"foreign_dev", "bad_schema"} <= set(result["codes"]), result
