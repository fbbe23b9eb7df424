"""The images and the compose fleet on a real Docker engine (``make test-containers``; not in ``make test``).

Debian's dockerd runs in a network namespace this test makes (testbed/engine.py). No registry is
reachable from there, so the base images are made here (testbed/images.py: a Debian bookworm root
with Python 3.11 for amd64 and arm64, Mosquitto, Redis and Prometheus from Debian's packages) and
the project's images install from wheelhouses made on this host (testbed/wheelhouse.py). Then:

- ``docker/Dockerfile.server`` and ``docker/Dockerfile.agent`` build for linux/amd64, and
  ``Dockerfile.agent`` for linux/arm64 with a CPU-only torch from PyPI (2.9.1: PyPI's aarch64
  torch 2.11 and later is a CUDA build, 2.10.0 dies with SIGILL on Raspberry Pi CPUs); the arm64
  image trains a step under qemu-user emulating a Pi 4's Cortex-A72;
- ``harmony fleet compose`` of two Pi Zero 2 W and two Pi 4 comes up; each agent container's CPU
  quota, memory limit and networks, read from the engine and from its cgroup files, are its class's,
  and each agent's ``hello`` reports the quota and the limit it sees;
- one HARMONY round through the ``driver`` profile with ``fleet.assignment: measured``: the Pi 4s get
  a deeper split than the Pi Zeros, and the results equal those of the same config over a
  ``harmony up`` stack given the same split depths;
- the ``monitoring`` profile's ``monitor`` (dashboard and /metrics) and Prometheus (scraping it)
  answer inside the engine's namespace (Grafana: no Debian package, no local image);
- everything is torn down: no process, namespace or cgroup of the engine is left.

Images are cached in the engine's data root (``$HARMONY_CACHE/docker``) between runs; a cold
cache builds everything (docker/README.md has the times)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edge_agent.probe import own_cgroups
from harmony.config import validate_config
from harmony.profiles import load_profiles
from testbed.cli import app
from testbed.compose import PROJECT_UID, agent_service, device_ids, mounted_copy, prepare_credentials
from testbed.engine import DockerEngine
from testbed.images import base_image, build_project_image, service_images
from testbed.wheelhouse import build_wheelhouse

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(5400)]

REPO = Path(__file__).resolve().parents[1]
FLEET = [("pi_zero_2", 2), ("pi4", 2)]
SERVER_TORCH = "2.13.0"
ARM64_TORCH = "2.9.1"  # the newest CPU-only aarch64 torch on PyPI that runs on a Cortex-A72/A53
SERVER_IMAGE, AGENT_IMAGE = "harmony/server:0.1.0", "harmony/agent:0.1.0"
AGENT_ARM64_IMAGE = "harmony/agent:0.1.0-arm64"
# Measured assignment decided by memory, which the cgroup limit sets exactly (compute rates measured
# on a shared host vary with its load): a batch of 3000 would need ~470 MiB at depth 2, ~630 at 3 and
# ~710 at 4 (harmony.assignment.step_needs), so a Pi Zero 2 W (512 MiB) fits depth 2 only and a Pi 4
# (4 GiB) the deepest; a client holds 150 samples, so a real batch is those 150 (one per epoch).
# The step budget is wide enough that compute and uplink decide nothing.
CONFIG = {
    "name": "containers", "seed": 11,
    "data": {"num_shards": 8, "train_fraction": 0.01, "test_per_client": 20, "rhos": [0.0]},
    "model": {"family": "cnn8", "width": 0.25},
    "fleet": {"num_clients": 4, "assignment": "measured", "step_budget_s": 3600},
    "train": {"algorithm": "harmony", "rounds": 1, "batch_size": 3000, "local_steps": 2},
    "eval": {"measure_latency_samples": 0},
    "threads": 1,  # every process alike: the thread count changes a run's bits
}


def _missing() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux (network namespaces, dockerd, cgroups)"
    for tool, package in (("dockerd", "docker.io"), ("docker-compose", "docker-compose"),
                          ("debootstrap", "debootstrap"), ("update-binfmts", "binfmt-support"),
                          ("qemu-aarch64-static", "qemu-user-static"), ("ip", "iproute2"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} not found: apt-get install {package} (make setup-containers)"
    return None


if (why := _missing()) is not None:
    pytest.skip(why, allow_module_level=True)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    e = DockerEngine(f"harmony-ct-{os.getpid()}", tmp_path_factory.mktemp("engine"))
    e.start()
    try:
        yield e
    finally:
        e.stop()
        assert e.leftover_pids() == [] and e.cgroup_dirs() == [] and not e.netns.exists(), "the engine left things"


@pytest.fixture(scope="module")
def images(engine: DockerEngine) -> dict[str, str]:
    """Base images, the stand-ins for the third-party services, and the project's three images."""
    t0 = time.monotonic()
    amd64, arm64 = base_image(engine, "amd64"), base_image(engine, "arm64")
    services = service_images(engine)
    # third-party wheels only: the Dockerfiles build the project from its source (a wheel made afresh on
    # every run would also miss the build cache)
    server_wheels = build_wheelhouse(machine="x86_64", torch_spec=f"{SERVER_TORCH}+cpu",
                                     extras=("agent", "server", "monitor"), project_wheel=False)
    arm_wheels = build_wheelhouse(machine="aarch64", torch_spec=ARM64_TORCH, extras=("agent",), project_wheel=False)
    build_project_image(engine, REPO, "Dockerfile.server", SERVER_IMAGE, arch="amd64", base=amd64,
                        wheelhouse=server_wheels)
    build_project_image(engine, REPO, "Dockerfile.agent", AGENT_IMAGE, arch="amd64", base=amd64,
                        wheelhouse=server_wheels)
    build_project_image(engine, REPO, "Dockerfile.agent", AGENT_ARM64_IMAGE, arch="arm64", base=arm64,
                        wheelhouse=arm_wheels, build_args={"TORCH_REQUIREMENT": f"torch=={ARM64_TORCH}"})
    print(f"images ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return services


def _architecture(engine: DockerEngine, image: str) -> str:
    return engine.docker("image", "inspect", "--format", "{{.Architecture}}", image).stdout.strip()


# ------------------------------------------------------------------------------------ the images
def test_images_build_for_both_architectures_with_a_cpu_torch(engine, images):
    assert _architecture(engine, SERVER_IMAGE) == "amd64" and _architecture(engine, AGENT_IMAGE) == "amd64"
    assert _architecture(engine, AGENT_ARM64_IMAGE) == "arm64"
    for image in (SERVER_IMAGE, AGENT_IMAGE, AGENT_ARM64_IMAGE):
        user = engine.docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
        assert user == f"{PROJECT_UID}:{PROJECT_UID}", (image, user)
    # the arm64 agent on a Pi 4's CPU (qemu-user, exactly a Cortex-A72): torch imports and trains a step
    step = ("import platform, torch, edge_agent.agent; torch.manual_seed(0); "
            "torch.nn.Conv2d(1, 8, 3)(torch.randn(4, 1, 28, 28)).square().mean().backward(); "
            "print(platform.machine(), torch.__version__, torch.version.cuda)")
    out = engine.docker("run", "--rm", "--platform", "linux/arm64", "-e", "QEMU_CPU=cortex-a72", "--entrypoint",
                        "python", AGENT_ARM64_IMAGE, "-c", step, timeout=600)
    machine, version, cuda = out.stdout.split()[-3:]
    assert (machine, version.split("+")[0], cuda) == ("aarch64", ARM64_TORCH, "None"), out.stdout + out.stderr
    out = engine.docker("run", "--rm", "--entrypoint", "python", SERVER_IMAGE, "-c",
                        "import torch; print(torch.__version__, torch.version.cuda)")
    assert out.stdout.split() == [f"{SERVER_TORCH}+cpu", "None"], out.stdout


# ------------------------------------------------------------------------------------ the fleet
class Fleet:
    """A compose fleet of FLEET in ``engine``, from ``harmony fleet compose``."""

    def __init__(self, engine: DockerEngine, where: Path, services: dict[str, str]) -> None:
        self.engine, self.where = engine, where
        self.project = "harmonyct"
        self.file = where / "compose.yaml"
        args = [a for name, count in FLEET for a in ("--profile", f"{name}:{count}")]
        result = CliRunner().invoke(app, ["fleet", "compose", *args, "--out", str(self.file)])
        assert result.exit_code == 0, result.output
        for name in ("mosquitto", "prometheus.yml", "grafana"):  # what the file mounts beside itself
            (where / name).symlink_to(REPO / "docker" / name)
        self.store = where / "store"
        prepare_credentials(self.store, FLEET)
        self.mounted = mounted_copy(self.store, where / "credentials")
        self.runs = where / "runs"
        self.runs.mkdir()
        os.chown(self.runs, PROJECT_UID, PROJECT_UID)
        self.env = {**services, "HARMONY_CREDENTIALS_DIR": str(self.mounted), "HARMONY_RUNS_DIR": str(self.runs),
                    "HARMONY_DATA_DIR": "/usr/share/datasets"}

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return self.engine.compose(self.file, *args, project=self.project, env=self.env, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def redis(self, *command: str) -> str:
        password = (self.store / "services" / "redis.password").read_text().strip()
        return self.engine.docker("exec", self.container("redis"), "redis-cli", "--no-auth-warning", "--user",
                                  "harmony", "--pass", password, *command).stdout

    def hellos(self, devices: list[str], timeout: float = 600) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = {}
            for dev in devices:
                text = self.redis("HGET", f"hsfl:dev:{dev}", "profile").strip()
                if text:
                    found[dev] = json.loads(text)
            if len(found) == len(devices) or time.monotonic() > deadline:
                return found
            time.sleep(3)


def test_compose_fleet_trains_a_round_within_its_class_limits(engine, images, tmp_path):
    fleet = Fleet(engine, tmp_path, images)
    table = load_profiles()
    ids = device_ids(FLEET)
    try:
        fleet.compose("up", "-d")
        # -- the limits, from the engine and from the cgroup files, against the classes
        hellos = fleet.hellos([d for d, _ in ids])
        assert sorted(hellos) == sorted(d for d, _ in ids), f"hellos from {sorted(hellos)} only"
        devices_net = f"{fleet.project}_devices"
        assert engine.docker("network", "inspect", "--format", "{{.Internal}}", devices_net).stdout.strip() == "true"
        for dev, cls in ids:
            want = agent_service(dev, table[cls])
            cid = fleet.container(f"agent-{dev}")
            info = json.loads(engine.docker("inspect", cid).stdout)[0]
            host = info["HostConfig"]
            assert host["NanoCpus"] == round(want["cpus"] * 1e9), (dev, host["NanoCpus"])
            assert host["Memory"] == table[cls].memory_bytes == host["MemorySwap"], (dev, host["Memory"])
            assert sorted(info["NetworkSettings"]["Networks"]) == [devices_net], dev
            # the container's own cgroups, as the host sees them (its init's /proc/PID/cgroup)
            groups = own_cgroups(Path(f"/proc/{info['State']['Pid']}/cgroup"))
            assert engine.cgroup_parent in groups["cpu"], groups
            cpu, memory = Path("/sys/fs/cgroup/cpu", groups["cpu"]), Path("/sys/fs/cgroup/memory", groups["memory"])
            assert int((cpu / "cpu.cfs_quota_us").read_text()) == round(
                want["cpus"] * int((cpu / "cpu.cfs_period_us").read_text()))
            assert int((memory / "memory.limit_in_bytes").read_text()) == table[cls].memory_bytes
            # what the agent saw from inside (edge_agent/probe.py reads the same files) and reported
            hello = hellos[dev]
            assert hello["device_class"] == cls
            assert hello["cpus"] == pytest.approx(want["cpus"]) and hello["memory_bytes"] == table[cls].memory_bytes
            assert hello["uplink_bps"] < 1.15 * table[cls].uplink_bps  # the agent's token bucket
            assert hello["rtt_ms"] >= 2 * table[cls].latency_ms

        # -- one HARMONY round through the driver, depths from the hellos
        zeros = [d for d, c in ids if c == "pi_zero_2"]
        pi4s = [d for d, c in ids if c == "pi4"]
        cfg = validate_config(CONFIG)
        config = tmp_path / "containers.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        config.chmod(0o644)
        t0 = time.monotonic()
        fleet.compose("--profile", "driver", "run", "--rm", "-v", f"{config}:/app/containers.yaml:ro", "driver",
                      "/app/containers.yaml", "--out", "/runs/containers", "--round-timeout", "900", timeout=1800)
        print(f"driver run: {time.monotonic() - t0:.0f} s", file=sys.stderr)
        doc = json.loads((fleet.runs / "containers" / "results.json").read_text())
        assert doc["runtime"] == "distributed" and len(doc["rounds"]) == 1
        plan = {row["device"]: row for row in doc["fleet"]["assignment"]}
        assert all("(measured)" in row["source"] for row in plan.values())
        assert {plan[d]["depth"] for d in pi4s} == {4} and {plan[d]["depth"] for d in zeros} == {2}, plan
        assert all(plan[d]["available_memory_bytes"] == table["pi_zero_2"].memory_bytes for d in zeros)
        assert all("MiB available" in plan[d]["reason"] for d in zeros), plan  # memory decided it

        # -- the monitoring profile: monitor and Prometheus inside the engine's namespace
        fleet.compose("--profile", "monitoring", "up", "-d", "monitor", "prometheus")
        metrics = _get(engine, "http://127.0.0.1:8765/metrics", contains="harmony_")
        assert "harmony_devices_online" in metrics or "harmony_" in metrics
        assert "<html" in _get(engine, "http://127.0.0.1:8765/", contains="<html").lower()
        targets = _get(engine, "http://127.0.0.1:9090/api/v1/targets", contains='"health":"up"', timeout=120)
        assert "monitor:8765" in targets
        query = urllib.parse.quote("up{job=~\".*\"}")
        assert '"value"' in _get(engine, f"http://127.0.0.1:9090/api/v1/query?query={query}", contains='"value"')
    finally:
        fleet.compose("--profile", "driver", "--profile", "monitoring", "down", "-v", "--remove-orphans",
                      check=False, timeout=300)
    assert engine.docker("ps", "-aq").stdout.strip() == ""

    # -- the same round over a `harmony up` stack given the same depths: the same results
    same = cfg.with_overrides(**{"fleet.assignment": "config", "fleet.split_depths": doc["fleet"]["split_depths"]})
    (tmp_path / "up.yaml").write_text(yaml.safe_dump(same.model_dump(mode="json")))
    runner = CliRunner()
    stack = tmp_path / "stack"
    result = runner.invoke(app, ["up", "--agents", "1", "--devices-per-agent", "4", "--run-dir", str(stack)])
    assert result.exit_code == 0, result.output
    try:
        result = runner.invoke(app, ["run", str(tmp_path / "up.yaml"), "--runtime", "distributed", "--stack",
                                     str(stack), "--out", str(tmp_path / "up")])
        assert result.exit_code == 0, result.output
    finally:
        runner.invoke(app, ["down", "--run-dir", str(stack)])
    local = json.loads((tmp_path / "up" / "results.json").read_text())
    assert local["fleet"]["split_depths"] == doc["fleet"]["split_depths"]
    assert local["fleet"]["train_samples"] == doc["fleet"]["train_samples"]
    for a, b in zip(doc["rounds"], local["rounds"], strict=True):
        for key in ("participants", "samples", "train_loss_exit", "train_acc_exit", "train_acc_server"):
            assert a[key] == b[key], key
        # the server side's float32 loss varies in its last bits between two runs over one `harmony up`
        # stack as well (concurrent sessions on a worker's threads): equal to float32 precision
        assert a["train_loss_server"] == pytest.approx(b["train_loss_server"], rel=1e-6)
    assert doc["evaluation"]["accuracy"] == local["evaluation"]["accuracy"]
    for mine, theirs in zip(doc["evaluation"]["per_client"], local["evaluation"]["per_client"], strict=True):
        for key in ("accuracy", "tau", "offload_probability", "accuracy_fixed_tau", "offload_probability_fixed_tau"):
            assert [row[key] for row in mine["rho"]] == [row[key] for row in theirs["rho"]], (mine["client"], key)


def _get(engine: DockerEngine, url: str, *, contains: str, timeout: float = 90) -> str:
    """GET ``url`` from inside the engine's namespace (its published loopback ports) until the body has ``contains``."""
    script = ("import sys, urllib.request\n"
              "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
              "except Exception as err:\n    print('ERROR', err)\n")
    deadline = time.monotonic() + timeout
    while True:
        body = engine.inside([sys.executable, "-c", script, url], check=False).stdout
        if contains in body or time.monotonic() > deadline:
            assert contains in body, f"{url}: {body[-500:]}"
            return body
        time.sleep(2)

