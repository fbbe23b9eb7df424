"""testbed/board_probe.py: reading a board's probe, and the torch each kind of board gets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testbed.board_probe import (
    ARMV80_TORCH,
    PINNED_TORCH,
    PROBE_SCRIPT,
    PYTORCH_CPU_INDEX,
    ProbeError,
    choose_torch,
    hwcap_features,
    parse_cpuinfo,
    parse_l4t,
    parse_probe,
)

PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

processor\t: 1
Features\t: fp asimd evtstrm crc32 cpuid
CPU part\t: 0xd08
"""
PI5_CPUINFO = PI4_CPUINFO.replace("0xd08", "0xd0b").replace(
    "fp asimd evtstrm crc32 cpuid", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
    "lrcpc dcpop asimddp")
ORIN_CPUINFO = PI5_CPUINFO.replace("0xd0b", "0xd42")
# AT_HWCAP as qemu-user 7.2 reports it for these models (read from /proc/self/auxv under QEMU_CPU=...)
QEMU_A72_HWCAP = 0x8FB
QEMU_A76_HWCAP = 0x119FFB


def test_cpuinfo_names_the_core_and_its_features():
    assert parse_cpuinfo(PI4_CPUINFO) == ("Cortex-A72", frozenset({"fp", "asimd", "evtstrm", "crc32", "cpuid"}))
    assert parse_cpuinfo(ORIN_CPUINFO)[0] == "Cortex-A78AE"
    assert parse_cpuinfo("model name : AMD EPYC\n") == (None, frozenset())


def test_hwcap_bits_decode_to_linux_feature_names():
    assert hwcap_features(QEMU_A72_HWCAP) == {"fp", "asimd", "aes", "pmull", "sha1", "sha2", "crc32", "cpuid"}
    assert {"atomics", "fphp", "asimdhp", "asimdrdm", "lrcpc", "dcpop", "asimddp"} <= hwcap_features(QEMU_A76_HWCAP)


def test_l4t_release_line():
    assert parse_l4t("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64") == "35.4.1"
    assert parse_l4t("garbage") is None


def test_a_pi4_gets_the_newest_pypi_torch_that_runs_on_armv8_0():
    facts = parse_probe({"machine": "aarch64", "python": "3.11", "cpuinfo": PI4_CPUINFO, "mem_available": 3 << 30,
                         "disk_free": 20 << 30})
    assert facts.cpu == "Cortex-A72" and facts.python == (3, 11)
    choice = choose_torch(facts)
    assert choice.requirement == f"torch=={ARMV80_TORCH}" and choice.index_url is None
    assert "Armv8.0" in choice.reason and "SIGILL" in choice.reason and "atomics" in choice.reason
    assert "Cortex-A72 (aarch64), Python 3.11, 3072 MiB free memory" in facts.describe()


def test_an_emulated_board_is_read_from_its_hwcaps_not_the_hosts_cpuinfo():
    host = "processor : 0\nvendor_id : AuthenticAMD\nmodel name : AMD EPYC\nflags : fpu avx2\n"
    a72 = parse_probe({"machine": "aarch64", "python": "3.11", "cpuinfo": host, "hwcap": QEMU_A72_HWCAP,
                       "qemu_cpu": "cortex-a72"})
    assert a72.cpu == "cortex-a72 (emulated by qemu-user)" and "atomics" not in a72.features
    assert choose_torch(a72).requirement == f"torch=={ARMV80_TORCH}"
    a76 = parse_probe({"machine": "aarch64", "python": "3.11", "cpuinfo": host, "hwcap": QEMU_A76_HWCAP,
                       "qemu_cpu": "cortex-a76"})
    choice = choose_torch(a76)
    assert choice.requirement == f"torch=={PINNED_TORCH}" and choice.index_url == PYTORCH_CPU_INDEX


def test_a_pi5_gets_the_servers_torch_from_the_cpu_index_or_the_wheelhouse():
    facts = parse_probe({"machine": "aarch64", "python": "3.11", "cpuinfo": PI5_CPUINFO})
    assert choose_torch(facts).index_url == PYTORCH_CPU_INDEX
    assert "CUDA build" in choose_torch(facts).reason
    assert choose_torch(facts, wheelhouse=True).index_url is None


def test_a_jetson_keeps_jetpacks_torch_when_in_range_else_runs_on_the_cpu():
    line = "# R35 (release), REVISION: 4.1, GCID: 1, BOARD: t186ref"
    jetson = parse_probe({"machine": "aarch64", "python": "3.10", "cpuinfo": ORIN_CPUINFO, "l4t": line,
                          "system_torch": "2.8.0a0+nv24.08"})
    choice = choose_torch(jetson)
    assert choice.requirement is None and choice.system_site_packages and "JetPack" in choice.reason
    old = parse_probe({"machine": "aarch64", "python": "3.10", "cpuinfo": ORIN_CPUINFO, "l4t": line,
                       "system_torch": "2.1.0a0+nv23.10"})
    choice = choose_torch(old)
    assert not choice.system_site_packages and choice.requirement == f"torch=={PINNED_TORCH}"
    assert "outside the supported range" in choice.reason


def test_x86_gets_the_cpu_build_of_the_pinned_version():
    choice = choose_torch(parse_probe({"machine": "x86_64", "python": "3.11", "cpuinfo": "model name : AMD EPYC\n"}))
    assert choice.requirement == f"torch=={PINNED_TORCH}" and choice.index_url == PYTORCH_CPU_INDEX


def test_override_wins_is_range_checked_and_warns_on_armv8_0():
    pi4 = parse_probe({"machine": "aarch64", "python": "3.11", "cpuinfo": PI4_CPUINFO})
    choice = choose_torch(pi4, override="2.10.0")
    assert choice.requirement == "torch==2.10.0" and "--torch 2.10.0" in choice.reason and "SIGILL" in choice.reason
    with pytest.raises(ValueError, match="--torch 2.7.1: the agent supports torch 2.8 to 2.13"):
        choose_torch(pi4, override="2.7.1")


def test_the_cgroup_limit_bounds_free_memory():
    facts = parse_probe({"machine": "aarch64", "mem_available": 8 << 30, "cgroup_memory_limit": 1 << 30})
    assert facts.mem_available == 1 << 30


@pytest.mark.parametrize("bad", ["not json", "[]", '{"python": "3.11"}'])
def test_unreadable_probe_output_is_an_error_naming_the_probe(bad):
    with pytest.raises(ProbeError, match="board probe"):
        parse_probe(bad)


def test_the_probe_script_runs_here_and_parses():
    out = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    facts = parse_probe(out.stdout)
    assert facts.python == sys.version_info[:2] and facts.disk_free and facts.mem_available
    assert json.loads(out.stdout)["machine"] == facts.machine
