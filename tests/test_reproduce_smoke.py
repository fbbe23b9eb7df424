"""The smoke reproduction of the paper's Fashion-MNIST table, on real data.

The paper's qualitative claim: HARMONY's accuracy at ρ = 0.8 beats SplitGP with max
personalisation (λ = 1), and at ρ = 0 it stays within a few points of it. Margins come from
our own 3-seed smoke runs (benchmarks/RESULTS.md): HARMONY − SplitGP(λ=1) at ρ = 0.8 was
+16.7 / +21.3 / +9.7 points (seeds 0/1/2), at ρ = 0 it was −3.5 / −3.1 / −3.2 points. The test
asks for about half the smallest ρ = 0.8 gain and allows a 6-point ρ = 0 gap.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    assert harmony[-1] > personal[-1] + 5.0, (harmony, personal)
    assert harmony[0] >= personal[0] - 6.0, (harmony, personal)
    assert harmony[0] > 80.0  # on-device personalisation still works
