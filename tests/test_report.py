"""`harmony report`: report.html and its PNGs for a comparison and for a single run, the session
timeline from events.jsonl, and the page in real headless Chromium with every image loaded."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.cli import app
from testbed.compare import compare
from testbed.report import read_events, session_timeline, write_report
from tests.browser import artifact_path, browser_page, chromium  # noqa: F401
from tests.conftest import tiny_config

PNG = b"\x89PNG\r\n\x1a\n"
RUN_PLOTS = {"accuracy_vs_rho.png", "accuracy_latency.png", "split_depths.png", "device_latency.png",
             "round_accuracy.png", "session_timeline.png"}


def images_of(page: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page.read_text())


def jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory) -> Path:
    """A 1-round comparison of two algorithms; each run's events.jsonl is written from the engine's own
    progress events (compare's carry ``run``) in the run-dir format: one JSON object a line, ``t`` first."""
    cfg = tiny_config(**{"name": "tiny <b>&", "train.rounds": 1, "eval.measure_latency_samples": 0})
    out = tmp_path_factory.mktemp("compare")
    events: dict[str, list[str]] = {}

    def progress(event: str, **fields) -> None:
        run = fields.pop("run")
        events.setdefault(run, []).append(json.dumps({"t": time.time(), "event": event,
                                                      **{k: jsonable(v) for k, v in fields.items()}}))

    doc = compare(cfg, ["harmony", "splitgp(lambda=0.2)"], 1, out, progress)
    assert [r["algorithm"] for r in doc["rows"]] == ["harmony", "splitgp(lambda=0.2)"]
    (out / "harmony" / "seed7" / "events.jsonl").write_text("\n".join(events["harmony seed 7"]) + "\n")
    return out


@pytest.fixture(scope="module")
def run_dir(compare_dir, tmp_path_factory) -> Path:
    """The comparison's HARMONY run on its own, without its checkpoint (the t-SNE shows its skipped line)."""
    out = tmp_path_factory.mktemp("run") / "harmony"
    shutil.copytree(compare_dir / "harmony" / "seed7", out, ignore=shutil.ignore_patterns("checkpoint.pt", "*.png",
                                                                                          "report.html"))
    return out


def test_run_report_writes_its_plots_and_page(run_dir):
    paths = write_report(run_dir, rho=0.5)
    assert {p.name for p in paths} == RUN_PLOTS | {"report.html"}
    for p in paths:
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == PNG and len(data) > 5000, p.name
    page = run_dir / "report.html"
    assert sorted(images_of(page)) == sorted(RUN_PLOTS)  # relative names, beside the page
    text = page.read_text()
    assert "tiny &lt;b&gt;&amp;" in text and "<b>" not in text  # the run's name is escaped
    assert "Not drawn: no checkpoint.pt" in text and not (run_dir / "tsne_server.png").exists()
    results = json.loads((run_dir / "results.json").read_text())
    for acc in results["evaluation"]["accuracy"]:
        assert f"{acc:.2f}" in text  # the summary table shows the run's accuracies
    bars, spans = session_timeline(read_events(run_dir / "events.jsonl"))
    assert [s.round for s in spans] == [1]
    assert sorted(b.device for b in bars) == ["0", "1", "2", "3"]
    assert all(b.outcome == "done" and spans[0].start <= b.end <= spans[0].end for b in bars)


def test_report_of_a_comparison_links_its_runs(compare_dir):
    paths = write_report(compare_dir, rho=0.5)
    top = {p.name for p in paths if p.parent == compare_dir}
    assert top == {"accuracy_vs_rho.png", "accuracy_latency.png", "tsne_server.png", "split_depths.png",
                   "round_accuracy.png", "report.html"}
    for p in paths:
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == PNG and len(data) > 5000, p
    page = compare_dir / "report.html"
    assert sorted(images_of(page)) == sorted(top - {"report.html"})
    links = re.findall(r'<a href="([^"]+)"', page.read_text())
    assert links == ["harmony/seed7/report.html", "splitgp_lambda=0.2_/seed7/report.html"]
    # the second run has no events.jsonl: its timeline says why instead of showing a broken image
    assert "Not drawn: this run has no events.jsonl" in (compare_dir / links[1]).read_text()
    assert "session_timeline.png" in images_of(compare_dir / links[0])
    for link in links:
        run_page = compare_dir / link
        assert run_page.is_file()
        assert all((run_page.parent / img).is_file() for img in images_of(run_page))


@pytest.mark.slow
def test_report_in_chromium_loads_every_image(run_dir, compare_dir, browser_page, tmp_path):  # noqa: F811
    for directory, shot in ((run_dir, "report_run.png"), (compare_dir, "report_compare.png")):
        if not (directory / "report.html").is_file():
            write_report(directory, rho=0.5)
        browser_page.goto((directory / "report.html").as_uri())
        browser_page.wait_for_load_state("load")
        images = browser_page.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert len(images) == len(images_of(directory / "report.html")) >= 5
        assert all(done and width > 0 for _, done, width in images), images
        assert browser_page.errors == []
        browser_page.screenshot(path=str(artifact_path(shot)), full_page=True)
    # the check can fail: a page whose PNG is gone shows a broken image (naturalWidth 0) and an error
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "device_latency.png").unlink()
    browser_page.goto((broken / "report.html").as_uri())
    browser_page.wait_for_load_state("load")
    widths = dict((src, w) for src, _, w in browser_page.evaluate(
        "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"))
    assert widths["device_latency.png"] == 0 and widths["split_depths.png"] > 0
    assert browser_page.errors


def test_session_timeline_from_events(tmp_path):
    """Bars from a hand-written events.jsonl: a session ends at its event's t and starts `seconds`
    before (else at its round's start); a retried round's try ends where the next starts; unknown
    events, events missing fields and a torn last line are ignored."""
    t0 = 1_800_000_000.0
    lines = [
        {"t": t0, "event": "run_start"},
        {"t": t0, "event": "round_start", "round": 1, "rounds": 2, "sessions": 3},
        {"t": t0 + 4.0, "event": "session_done", "round": 1, "device": 0, "seconds": 3.5},
        {"t": t0 + 9.0, "event": "session_late", "round": 1, "device": 2, "seconds": 9.0},
        {"t": t0 + 5.0, "event": "session_dropped", "round": 1, "device": 1},
        {"t": t0 + 10.0, "event": "round_start", "round": 1, "rounds": 2, "sessions": 2, "attempt": 2,
         "deadline_s": 5.0},
        {"t": t0 + 12.0, "event": "session_done", "round": 1, "device": 0, "seconds": 2.0},
        {"t": t0 + 13.0, "event": "session_done", "round": 1, "device": 2, "seconds": 3.0},
        {"t": t0 + 13.5, "event": "round_end", "record": {"round": 1, "deadline_s": 6.0}},
        {"t": t0 + 14.0, "event": "round_start", "round": 2, "rounds": 2, "sessions": 1, "deadline_s": 4.0},
        {"t": t0 + 15.0, "event": "session_done", "round": 2, "device": 0, "seconds": "1"},  # not a number
        {"t": t0 + 14.0, "event": "session_done", "device": 0},  # no round
        {"event": "session_done", "round": 1, "device": 0},  # no t
        {"t": t0 + 14.0, "event": "device_online", "device": "pi4-0"},  # unknown here
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"t": 1800000020.0, "event": "sess')
    bars, spans = session_timeline(read_events(path))
    got = [(b.round, b.attempt, b.device, b.start - t0, b.end - t0, b.outcome, b.measured) for b in bars]
    assert got == [(1, 1, "0", 0.5, 4.0, "done", True), (1, 1, "2", 0.0, 9.0, "late", True),
                   (1, 1, "1", 0.0, 5.0, "dropped", False), (1, 2, "0", 10.0, 12.0, "done", True),
                   (1, 2, "2", 10.0, 13.0, "done", True), (2, 1, "0", 14.0, 15.0, "done", False)]
    # a deadline from round_end's record, else from round_start; the last round has not ended yet
    assert [(s.round, s.attempt, s.start - t0, None if s.end is None else s.end - t0, s.deadline_s)
            for s in spans] == [(1, 1, 0.0, 10.0, None), (1, 2, 10.0, 13.5, 6.0), (2, 1, 14.0, None, 4.0)]
    from testbed.report import plot_session_timeline

    out = plot_session_timeline(bars, spans, tmp_path / "timeline.png", {"0": "0 · pi4 · d3"})
    assert out.read_bytes()[:8] == PNG


def test_cli_report_names_what_it_needs(tmp_path, run_dir):
    runner = CliRunner()
    empty = runner.invoke(app, ["report", str(tmp_path)])
    assert empty.exit_code == 2 and "neither compare.json nor results.json" in " ".join(empty.output.split())
    assert not (tmp_path / "report.html").exists()
    tsne = runner.invoke(app, ["report", str(run_dir), "--tsne", "harmony"])
    assert tsne.exit_code == 2 and "--tsne" in tsne.output
    ok = runner.invoke(app, ["report", str(run_dir), "--rho", "0.5"])
    assert ok.exit_code == 0, ok.output
    assert f"wrote{run_dir / 'report.html'}" in "".join(ok.output.split())  # however the console wraps it


def test_a_run_without_evaluation_or_fleet_gets_lines_not_broken_images(run_dir, tmp_path):
    """A results.json of an older or unfinished writer: only its rounds are drawn; every other plot
    is a line saying why, and the page references no image that is not there."""
    results = json.loads((run_dir / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({"algorithm": results["algorithm"],
                                                       "rounds": results["rounds"]}))
    paths = write_report(tmp_path)
    assert [p.name for p in paths] == ["round_accuracy.png", "report.html"]
    text = (tmp_path / "report.html").read_text()
    assert images_of(tmp_path / "report.html") == ["round_accuracy.png"]
    assert text.count('class="skipped"') == 6
    assert "results.json has no evaluation" in text and "this run has no events.jsonl" in text
