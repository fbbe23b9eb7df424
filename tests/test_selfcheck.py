"""The agent's self-check (edge_agent/selfcheck.py, ``python -m edge_agent --self-check``) and its failure
paths on this x86 machine: a torch that dies by SIGILL at import (a stand-in ``torch`` package that
sends itself SIGILL, as an illegal instruction does), a torch whose CUDA library is missing, a broker
that is not there, a broker that refuses the login (a real mosquitto with a password file), too little
memory. And the ``hello`` field that carries it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.codec import decode, encode, make_envelope
from broker.errors import WireError
from broker.mosquitto import MosquittoConfig, MosquittoProcess, free_port, write_password_file
from broker.schemas import Hello, from_body
from edge_agent.selfcheck import MIB, SelfCheckReport, available_memory, memory, run_self_check

ROOT = Path(__file__).resolve().parents[1]
SIGILL_TORCH = "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n"
CUDA_TORCH = ('raise OSError("libcublasLt.so.13: cannot open shared object file: No such file or directory")\n')


def fake_torch(tmp_path: Path, body: str) -> str:
    pkg = tmp_path / "fake" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    return os.pathsep.join([str(tmp_path / "fake"), str(ROOT)])


def self_check_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "--self-check", "--device-id", "pi-01", *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.mark.slow
def test_a_torch_that_dies_by_sigill_is_reported_as_an_illegal_instruction(tmp_path):
    done = self_check_cli("--broker", f"127.0.0.1:{free_port()}", "--json",
                          env={"PYTHONPATH": fake_torch(tmp_path, SIGILL_TORCH), "QEMU_CPU": "cortex-a72"})
    assert done.returncode == 1, done.stderr
    report = SelfCheckReport.from_json(done.stdout)
    assert report.failure == "illegal_instruction" and report.cpu == "cortex-a72 (emulated by qemu-user)"
    assert not report.ok and report.torch_version is None
    text = report.message()
    assert "illegal instruction" in text and "SIGILL at import torch" in text and "cortex-a72" in text
    assert "--torch 2.9.1" in report.next_step


@pytest.mark.slow
def test_a_missing_cuda_library_is_named(tmp_path):
    done = self_check_cli("--broker", f"127.0.0.1:{free_port()}", env={"PYTHONPATH": fake_torch(tmp_path, CUDA_TORCH)})
    assert done.returncode == 1
    assert "FAIL torch: import torch failed: libcublasLt.so.13 missing" in done.stdout
    assert "failed: missing_library" in done.stdout and "CUDA builds" in done.stdout


def test_torch_and_model_pass_here_and_an_absent_broker_is_named():
    report = run_self_check(broker=("127.0.0.1", free_port()), device_id="pi-01", width=0.25)
    names = {c.name: c.ok for c in report.checks}
    assert names == {"torch": True, "model": True, "broker": False, "memory": True}, report.message()
    assert report.failure == "broker_unreachable" and "--broker" in report.next_step
    assert report.torch_version and report.peak_rss_bytes and report.peak_rss_bytes > 50 * MIB
    assert "cnn8 (width 0.25) at split depth 4" in report.message()


@pytest.mark.slow
def test_a_broker_that_refuses_the_login_is_named_and_a_good_login_passes(tmp_path):
    passwords = write_password_file(tmp_path / "passwd", {"pi-01": "right"})
    broker = MosquittoProcess(tmp_path, MosquittoConfig(port=0, password_file=passwords)).start()
    try:
        creds = tmp_path / "password"
        creds.write_text("pi-01:wrong\n")
        done = self_check_cli("--broker", f"127.0.0.1:{broker.port}", "--credentials", str(creds),
                              "--check-width", "0.25")
        assert done.returncode == 1
        assert "refused the login of pi-01" in done.stdout and "failed: broker_refused" in done.stdout
        assert "harmony fleet add pi-01" in done.stdout
        creds.write_text("pi-01:right\n")
        done = self_check_cli("--broker", f"127.0.0.1:{broker.port}", "--credentials", str(creds),
                              "--check-width", "0.25")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("self-check passed on ") and "logged in to 127.0.0.1" in done.stdout
    finally:
        broker.stop()


def test_too_little_memory_for_the_agents_peak_fails():
    report = SelfCheckReport(cpu="Cortex-A53", machine="aarch64", python="3.11", torch_version="2.9.1",
                             peak_rss_bytes=300 * MIB)
    memory(report, 400 * MIB, 700 * MIB)
    assert report.failure == "out_of_memory" and "400 MiB free for the agent, its peak 700 MiB" in report.message()
    fits = SelfCheckReport(cpu="Cortex-A72", machine="aarch64", python="3.11", peak_rss_bytes=300 * MIB)
    memory(fits, 900 * MIB, 700 * MIB)
    assert fits.ok


def test_hello_carries_the_self_check_and_old_hellos_stay_valid():
    base = {"agent_version": "0.1.0", "cores": 4, "freq_mhz": 1500.0, "memory_bytes": 1 << 30, "load": 0.1,
            "gflops": 1.0, "rtt_ms": 1.0, "uplink_bps": 0.0}
    old = from_body("hello", dict(base))  # an agent from before the field: the key is absent
    assert old.self_check is None
    report = SelfCheckReport(cpu="Cortex-A72", machine="aarch64", python="3.11", torch_version="2.9.1")
    summary = report.hello_summary()
    new = decode(encode(make_envelope(Hello(**base, self_check=summary), dev="pi-01", seq=1)))
    assert new.body.self_check == summary and new.body.self_check["torch"] == "2.9.1"
    with pytest.raises(WireError, match="self_check"):
        encode(make_envelope(Hello(**base, self_check={"checks": [1, 2]}), dev="pi-01", seq=2))


def test_report_round_trips_through_json():
    report = run_self_check(broker=None, device_id="x", width=0.25)
    assert report.ok, report.message()
    back = SelfCheckReport.from_json(report.to_json())
    assert back == report and json.loads(report.to_json())["ok"] is True


def test_free_memory_is_the_cgroup_limit_less_what_cannot_be_reclaimed(tmp_path):
    """A board's cgroup v1 usage counts its page cache (a flash writes hundreds of MiB of wheels): the
    inactive file pages are reclaimable and do not count against the agent."""
    cg = tmp_path / "memory" / "hboard-x"
    cg.mkdir(parents=True)
    (cg / "memory.limit_in_bytes").write_text(str(1024 * MIB))
    (cg / "memory.usage_in_bytes").write_text(str(900 * MIB))
    (cg / "memory.stat").write_text(f"cache {700 * MIB}\ntotal_inactive_file {600 * MIB}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/hboard-x\n0::/\n")
    assert available_memory(tmp_path, proc) == 724 * MIB  # 1024 - (900 - 600)
