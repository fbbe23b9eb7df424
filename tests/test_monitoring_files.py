"""The compose file's `monitoring` profile, offline: the monitor service runs `harmony monitor --web`
on the stack's Redis, Prometheus scrapes it (docker/prometheus.yml, checked by `promtool`), and the
Grafana dashboard (docker/grafana/) queries only the metrics `harmony monitor` serves, each query
parsed by `promtool`; Grafana's provisioning points at the prometheus service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_docker_files import (
    COMPOSE_FILE,
    DOCKER,
    credential_store,
    dockerfile_of,
    effective_argv,
    interpolate,
    option_values,
    parse_dockerfile,
    redis_service,
    services,
)

GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "harmony.json"
PROMETHEUS_CONFIG = DOCKER / "prometheus.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed")

# The metrics of `harmony monitor --web`'s /metrics and their labels (the names fixed for this project's
# monitor; docs/monitoring.md). A histogram's series are NAME_bucket{le}, NAME_sum and NAME_count.
METRICS: dict[str, set[str]] = {
    "harmony_rounds_completed_total": set(),
    "harmony_rounds_failed_total": set(),
    "harmony_round_retries_total": set(),
    "harmony_sessions_total": {"outcome"},
    "harmony_stragglers_total": set(),
    "harmony_dropouts_total": set(),
    "harmony_rejected_messages_total": {"code"},
    "harmony_device_bytes_total": {"device", "direction"},
    "harmony_session_duration_seconds": set(),
    "harmony_current_round": set(),
    "harmony_rounds_total_planned": set(),
    "harmony_devices_online": set(),
    "harmony_stack_up": {"component"},
    "harmony_device_split_depth": {"device"},
    "harmony_device_step_seconds": {"device"},
    "harmony_device_online": {"device"},
    "harmony_round_accuracy_percent": {"head"},
    "harmony_round_loss": {"head"},
}
HISTOGRAMS = {"harmony_session_duration_seconds"}
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series


def monitoring_services() -> dict[str, dict]:
    return {name: s for name, s in services().items() if "monitoring" in (s.get("profiles") or [])}


def mounts(service: dict) -> dict[str, Path]:
    """Container path → host path (relative to docker/) of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes") or []:
        source, target, *_ = interpolate(volume).split(":")
        if source.startswith("."):
            out[target] = (DOCKER / source).resolve()
    return out


def dashboard() -> dict:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("panels"), list) and doc["panels"]
    return doc


def queries() -> list[tuple[str, str, str]]:
    """(panel title, PromQL expression, legend format) of every query of the dashboard."""
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dashboard()["panels"] for t in p["targets"]]


def series_in(expr: str) -> list[str]:
    return re.findall(r"\b(harmony_[a-z_]+)\b", expr)


def metric_of(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and base in HISTOGRAMS:
            return base
    return series


def test_the_profile_holds_monitor_prometheus_and_grafana():
    profiled = monitoring_services()
    assert set(profiled) == {"monitor", "prometheus", "grafana"}
    monitor = profiled["monitor"]
    argv = effective_argv(monitor)
    assert argv[:3] == ["harmony", "monitor", "--web"]
    assert option_values(argv, "--host") == ["0.0.0.0"] and option_values(argv, "--port") == ["8765"]
    # the stack's Redis with its read-only ACL user; the password from the env file's HARMONY_REDIS_PASSWORD
    assert option_values(argv, "--redis") == [f"redis://harmony-monitor@{redis_service()}:6379/0"]
    assert any(interpolate(f).endswith("/services/monitor.env") for f in monitor["env_file"])
    # the server image installs the monitor extra (starlette, uvicorn, prometheus-client)
    installs = [i.args for i in parse_dockerfile(DOCKER / dockerfile_of(monitor)) if i.keyword == "RUN"]
    assert any(re.search(r"""\.\[[\w,-]*\bmonitor\b[\w,-]*\]""", r) for r in installs)
    for name, service in profiled.items():
        for port in service.get("ports") or []:
            assert interpolate(port).startswith("127.0.0.1:"), f"{name}: published beyond the host's loopback"
        assert service["networks"] == ["backend"]
    for name, service in services().items():  # nothing outside the profile depends on it
        if name not in profiled:
            assert not set(service.get("depends_on") or {}) & set(profiled), name


@needs_promtool
def test_prometheus_scrapes_the_monitor_service():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    monitor = services()["monitor"]
    port = option_values(effective_argv(monitor), "--port")[0]
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert targets == [f"monitor:{port}"]
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])
    assert mounts(services()["prometheus"])["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG.resolve()
    ok = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_grafana_provisioning_points_at_prometheus_and_loads_the_dashboard():
    grafana = services()["grafana"]
    mounted = mounts(grafana)
    provisioning = mounted["/etc/grafana/provisioning"]
    assert provisioning == (GRAFANA / "provisioning").resolve()
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in services() and source.get("isDefault") is True
    providers = yaml.safe_load((provisioning / "dashboards" / "harmony.yml").read_text())["providers"]
    (provider,) = providers
    assert provider["type"] == "file"
    assert mounted[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted[str(Path(home).parent)] / Path(home).name == DASHBOARD.resolve()
    # every panel and query names the provisioned data source by its uid
    for panel in dashboard()["panels"]:
        for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel["targets"]]:
            assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]


def test_dashboard_uses_only_the_monitor_metrics_and_their_labels():
    doc = dashboard()
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for p in doc["panels"]:  # panels do not overlap on Grafana's 24-column grid
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["targets"], f"{p['title']}: no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    used = set()
    for title, expr, legend in queries():
        names = series_in(expr)
        assert names, f"{title}: {expr} queries no harmony metric"
        metrics = {metric_of(n) for n in names}
        unknown = metrics - set(METRICS)
        assert not unknown, f"{title}: {sorted(unknown)} are not metrics of `harmony monitor`"
        for n in names:
            if n.endswith("_bucket"):
                assert metric_of(n) in HISTOGRAMS, f"{title}: {n} is not a histogram's buckets"
            if metric_of(n) in HISTOGRAMS:
                assert n != metric_of(n), f"{title}: a histogram is queried as _bucket, _sum or _count"
        labels = set().union(*(METRICS[m] for m in metrics)) | SCRAPE_LABELS | (
            {"le"} if any(n.endswith("_bucket") for n in names) else set())
        grouped = {lbl.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for lbl in group.split(",")}
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert grouped <= labels, f"{title}: groups by {sorted(grouped - labels)}, not labels of {sorted(metrics)}"
        assert shown <= labels, f"{title}: legend shows {sorted(shown - labels)}, not labels of {sorted(metrics)}"
        used |= metrics
    # what the issue asks the dashboard to show
    for metric in ("harmony_rounds_completed_total", "harmony_session_duration_seconds",
                   "harmony_device_bytes_total", "harmony_rejected_messages_total", "harmony_stragglers_total",
                   "harmony_dropouts_total", "harmony_device_split_depth", "harmony_device_step_seconds",
                   "harmony_device_online"):
        assert metric in used, f"the dashboard shows no {metric}"


def test_the_metric_check_can_fail():
    assert series_in("rate(harmony_session_duration_seconds_bucket[1m])") == ["harmony_session_duration_seconds_bucket"]
    assert metric_of("harmony_session_duration_seconds_bucket") == "harmony_session_duration_seconds"
    assert metric_of("harmony_device_bytes_total") == "harmony_device_bytes_total"
    assert metric_of("harmony_rounds_total_count") not in METRICS  # a _count of a non-histogram stays unknown


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """Each expression (Grafana's $__rate_interval as 1m) as a recording rule: `promtool check rules`
    parses it with Prometheus's own PromQL parser; a broken one is refused."""
    def check(exprs: list[str]) -> subprocess.CompletedProcess:
        rules = [{"record": f"harmony:q{k}", "expr": e.replace("$__rate_interval", "1m").replace(
            "$__interval", "1m")} for k, e in enumerate(exprs)]
        path = tmp_path / "rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)

    ok = check([expr for _, expr, _ in queries()])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = check(["sum by (code (harmony_rejected_messages_total)"])
    assert bad.returncode != 0


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose (Debian package) is not installed")
def test_docker_compose_accepts_the_monitoring_profile():
    """docker-compose 1.29 (Debian's) knows `profiles:` (1.28 and later): its resolved config keeps the
    three services in profile `monitoring`, which `up` starts only with `--profile monitoring`."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_IMAGE")}  # the file's default images
    env["HARMONY_CREDENTIALS_DIR"] = str(credential_store())
    run = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "--profile", "monitoring", "config"],
                         capture_output=True, text=True, env=env, cwd=DOCKER, timeout=60)
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load(run.stdout)["services"]
    for name in ("monitor", "prometheus", "grafana"):
        assert resolved[name]["profiles"] == ["monitoring"], name
    assert resolved["prometheus"]["image"] == interpolate(services()["prometheus"]["image"])
