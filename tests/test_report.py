"""`harmony report`: the three PNGs from a finished comparison."""

from __future__ import annotations

from testbed.compare import compare
from testbed.report import write_report
from tests.conftest import tiny_config


def test_report_writes_pngs(tmp_path):
    cfg = tiny_config(**{"train.rounds": 1, "eval.measure_latency_samples": 0})
    doc = compare(cfg, ["harmony", "splitgp(lambda=0.2)"], 1, tmp_path)
    assert [r["algorithm"] for r in doc["rows"]] == ["harmony", "splitgp(lambda=0.2)"]
    paths = write_report(tmp_path, rho=0.5)
    assert {p.name for p in paths} == {"accuracy_vs_rho.png", "accuracy_latency.png", "tsne_server.png"}
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
