"""The agent's ``hello`` profile inside a container: cgroup CPU and memory limits bound the host's
cores and memory (cgroup trees written under tmp_path, in the kernel's file formats)."""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import pytest

from broker.schemas import from_body, to_body
from edge_agent.probe import (
    CgroupLimits,
    Resources,
    effective_resources,
    host_cores,
    parse_cfs_quota,
    parse_cpu_max,
    parse_memory_limit,
    probe_hello,
    read_cgroup_limits,
)

GIB = 1 << 30


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(("text", "cpus"), [
    ("max 100000\n", None),
    ("200000 100000\n", 2.0),
    ("15000 100000\n", 0.15),  # compose's `cpus: 0.15`
    ("50000 200000\n", 0.25),
    ("150000\n", 1.5),  # period omitted: the kernel's default 100 ms
])
def test_parse_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == pytest.approx(cpus) if cpus is not None else parse_cpu_max(text) is None


@pytest.mark.parametrize("text", ["", "max 100000 1", "0 100000", "fast 100000"])
def test_parse_cpu_max_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_max(text)


def test_parse_v1_quota_and_memory() -> None:
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("40000\n", "100000\n") == pytest.approx(0.4)
    assert parse_memory_limit("max\n") is None
    assert parse_memory_limit("1073741824\n") == GIB
    assert parse_memory_limit("9223372036854771712\n") == 9223372036854771712  # v1's "unlimited"


def test_reads_cgroup_v2(tmp_path: Path) -> None:
    root = _write(tmp_path, {"cpu.max": "40000 100000\n", "memory.max": "4294967296\n"})
    assert read_cgroup_limits(root) == CgroupLimits(cpus=pytest.approx(0.4), memory_bytes=4 * GIB)
    _write(tmp_path, {"cpu.max": "max 100000\n", "memory.max": "max\n"})
    assert read_cgroup_limits(root) == CgroupLimits(cpus=None, memory_bytes=None)


@pytest.mark.parametrize("cpu_dir", ["cpu", "cpu,cpuacct"])
def test_falls_back_to_cgroup_v1(tmp_path: Path, cpu_dir: str) -> None:
    root = _write(tmp_path, {f"{cpu_dir}/cpu.cfs_quota_us": "150000\n", f"{cpu_dir}/cpu.cfs_period_us": "100000\n",
                             "memory/memory.limit_in_bytes": "1073741824\n"})
    assert read_cgroup_limits(root) == CgroupLimits(cpus=pytest.approx(1.5), memory_bytes=GIB)


def test_docker_v1_container_reads_its_own_hierarchies_at_the_mount_root(tmp_path: Path) -> None:
    """A container under Docker with cgroup v1 (as `make test-containers` runs the agents): its
    /proc/self/cgroup names the host's path (the engine's cgroup parent and the container id), which
    does not exist inside, where each hierarchy's root is the container's own cgroup."""
    root = _write(tmp_path / "cgroup", {"cpu/cpu.cfs_quota_us": "18000\n", "cpu/cpu.cfs_period_us": "100000\n",
                                        "cpuacct/cpuacct.usage": "0\n",
                                        "memory/memory.limit_in_bytes": "536870912\n",
                                        "unified/cgroup.procs": "1\n"})
    proc = _write(tmp_path, {"self-cgroup": "12:pids:/harmony-engine-x/3f2a\n5:memory:/harmony-engine-x/3f2a\n"
                                            "3:cpu:/harmony-engine-x/3f2a\n2:cpuacct:/harmony-engine-x/3f2a\n"
                                            "0::/system.slice/containerd.service\n"}) / "self-cgroup"
    assert read_cgroup_limits(root, proc) == CgroupLimits(cpus=pytest.approx(0.18), memory_bytes=512 << 20)


def test_no_cgroup_files_mean_no_limits(tmp_path: Path) -> None:
    assert read_cgroup_limits(tmp_path) == CgroupLimits()


def test_malformed_limit_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _write(tmp_path, {"cpu.max": "lots\n", "memory.max": "1073741824\n"})
    with caplog.at_level(logging.WARNING, logger="edge_agent.probe"):
        assert read_cgroup_limits(root) == CgroupLimits(cpus=None, memory_bytes=GIB)
    assert "cgroup CPU limit" in caplog.text and "using the host's cores" in caplog.text


@pytest.mark.parametrize(("limits", "expected"), [
    (CgroupLimits(), Resources(cores=8, cpus=8.0, memory_bytes=16 * GIB)),
    (CgroupLimits(cpus=2.0, memory_bytes=4 * GIB), Resources(cores=2, cpus=2.0, memory_bytes=4 * GIB)),
    (CgroupLimits(cpus=0.15, memory_bytes=GIB), Resources(cores=1, cpus=0.15, memory_bytes=GIB)),
    (CgroupLimits(cpus=1.4), Resources(cores=2, cpus=1.4, memory_bytes=16 * GIB)),
    # limits above the host's: the host's values
    (CgroupLimits(cpus=32.0, memory_bytes=9223372036854771712), Resources(cores=8, cpus=8.0, memory_bytes=16 * GIB)),
])
def test_effective_resources_take_the_smaller(limits: CgroupLimits, expected: Resources) -> None:
    assert effective_resources(8, 16 * GIB, limits) == expected


def test_hello_reports_the_container_limits(tmp_path: Path) -> None:
    """A Pi Zero 2 class container (docker/compose.yaml: cpus 0.15, mem_limit 1g)."""
    root = _write(tmp_path, {"cpu.max": "15000 100000\n", "memory.max": "1073741824\n"})
    hello = probe_hello(cgroup_root=root)
    assert hello.cores == 1
    assert hello.cpus == pytest.approx(0.15)
    assert hello.memory_bytes == min(GIB, psutil.virtual_memory().total)
    assert from_body("hello", to_body(hello)) == hello  # the schema carries the new field


def test_hello_without_limits_reports_the_host(tmp_path: Path) -> None:
    hello = probe_hello(cgroup_root=tmp_path)
    assert hello.cores == host_cores()
    assert hello.cpus == float(host_cores())
    assert hello.memory_bytes == psutil.virtual_memory().total
