"""The 95% confidence interval used by `harmony compare`."""

import math

import pytest

from harmony.stats import mean_ci95, paired_difference, t975


def test_three_seed_interval_by_hand():
    mean, half = mean_ci95([90.0, 92.0, 94.0])
    # sample sd = 2, n = 3, t(2) = 4.303: 4.303 · 2/√3 = 4.9687…
    assert mean == 92.0
    assert half == pytest.approx(4.303 * 2 / math.sqrt(3), rel=1e-12)


def test_single_value_has_zero_width_and_large_dof_uses_normal():
    assert mean_ci95([5.0]) == (5.0, 0.0)
    assert t975(1) == 12.706 and t975(100) == 1.96
    with pytest.raises(ValueError):
        mean_ci95([])


def test_paired_difference_cancels_the_shared_seed_spread():
    # B trails A by exactly 1 point on every seed, while the seeds themselves spread by 10
    a = [[90.0, 60.0], [80.0, 70.0], [85.0, 50.0]]
    b = [[89.0, 58.0], [79.0, 68.0], [84.0, 48.0]]
    (d0, h0), (d1, h1) = paired_difference(a, b)
    assert (d0, h0) == (1.0, 0.0) and (d1, h1) == (2.0, 0.0)
    assert mean_ci95([r[0] for r in a])[1] > 10  # each side's own interval is wide
    mean, half = paired_difference([[3.0], [1.0]], [[1.0], [1.0]])[0]
    assert mean == 1.0 and half == pytest.approx(12.706 * 1.0)  # differences 2, 0: sd √2, se 1


def test_paired_difference_refuses_unpaired_rows():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([[1.0]], [[1.0], [2.0]])


def test_paired_table_pairs_by_seed_and_names_a_missing_policy(tmp_path):
    """``benchmarks/paired_table.py``: the reference minus each row by seed, under each policy; a
    baseline without the policy is compared under its oracle and the table says so."""
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("paired_table", root / "benchmarks" / "paired_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    harmony = {"algorithm": "harmony", "accuracy_per_seed": [[80.0, 70.0], [82.0, 72.0], [81.0, 74.0]],
               "policies": {"estimated_mix": {"accuracy_per_seed": [[79.0, 69.0], [80.0, 70.0], [78.0, 71.0]]}}}
    base = {"algorithm": "multi-exit", "accuracy_per_seed": [[78.0, 60.0], [79.0, 61.0], [80.0, 62.0]]}
    doc = {"rho": [0.0, 0.8], "seeds": [0, 1, 2], "rows": [harmony, base]}
    entries = table.paired_rows(doc, "harmony", ["oracle", "estimated_mix"])
    assert [(e["policy"], e["against_policy"]) for e in entries] == [("oracle", "oracle"), ("estimated_mix", "oracle")]
    assert entries[0]["cells"] == paired_difference(harmony["accuracy_per_seed"], base["accuracy_per_seed"])
    assert entries[0]["cells"][0][0] == pytest.approx(2.0) and entries[1]["cells"][1][0] == pytest.approx(9.0)
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "paired_table.py"), str(path), "--policies",
                          "oracle,estimated_mix"], capture_output=True, text=True, check=True).stdout
    assert "| estimated_mix | multi-exit (oracle) | +0.0 ± " in out
    path.write_text(json.dumps({**doc, "seeds": [0], "rows": [{**r, "accuracy_per_seed": r["accuracy_per_seed"][:1]}
                                                              for r in (harmony, base)]}))
    one = subprocess.run([sys.executable, str(root / "benchmarks" / "paired_table.py"), str(path)],
                         capture_output=True, text=True)
    assert one.returncode != 0 and "one seed" in one.stderr
