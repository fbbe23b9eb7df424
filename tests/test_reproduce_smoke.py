"""The smoke reproduction of the paper's Fashion-MNIST table, on real data.

The paper's qualitative claim: HARMONY's accuracy at ρ = 0.8 beats SplitGP with max
personalisation (λ = 1), and at ρ = 0 it stays within a few points of it. Margins come from
our own 3-seed smoke runs (benchmarks/RESULTS.md §2): HARMONY − SplitGP(λ=1) at ρ = 0.8 was
+27.2 / +29.3 / +23.4 points (seeds 0/1/2) with the default CSA weight 1 and +27.1 / +25.9 / +22.3
with weight 5, at ρ = 0 it was −1.6 / −0.4 / −2.9 and −1.5 / −0.9 / −2.6 points, and HARMONY's
ρ = 0 accuracy was 94.1–95.8 %. The test asks for under half the smallest ρ = 0.8
gain, allows a 6-point ρ = 0 gap, and wants HARMONY above 90 % at ρ = 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_reproduction_keeps_the_papers_claim(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/reproduce_fmnist.py", "--scale", "smoke", "--seeds", "1",
         "--algorithms", "harmony,splitgp(lambda=1)", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["rho"] == [0.0, 0.2, 0.4, 0.6, 0.8]
    acc = {row["algorithm"]: row["accuracy"] for row in doc["rows"]}
    harmony, personal = acc["harmony"], acc["splitgp(lambda=1)"]
    assert harmony[-1] > personal[-1] + 10.0, (harmony, personal)
    assert harmony[0] >= personal[0] - 6.0, (harmony, personal)
    assert harmony[0] > 90.0  # on-device personalisation still works
