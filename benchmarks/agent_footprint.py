"""What an edge agent costs a board: resident memory and installed size.

- **Memory** of one agent process hosting one cnn8 device (full width by default, at the deepest
  split depth, so the largest on-device model; HARMONY, which draws two batches per step), against a
  real local stack (mosquitto, redis-server, a Celery worker) on this machine's loopback:
  ``idle_rss_mib`` once it has registered (its ``hello`` is on the broker) and before any command;
  ``peak_rss_mib`` — the kernel's high-water mark (``VmHWM``) after a real session: one training
  round of Shard-2 Fashion-MNIST (1,200 samples, as a client of the paper's 50-client setting),
  then personalisation and the evaluation on the device; ``loaded_rss_mib`` after it.
- **Installed size** with the ``[agent]`` extra: a fresh venv (``python3 -m venv``) and
  ``pip install WHEEL[agent]`` of a wheel built as ``harmony flash`` builds it; the venv's size on
  disk broken down into torch (``torch/``, ``torchgen/``, ``functorch/`` and its dist-info), the
  other dependencies, this project, and pip/setuptools; the install's wall time; and that Celery
  and Redis are not in it. ``--install reuse`` (the smoke size) makes the venv see this
  environment's packages through a ``.pth`` file instead (torch is then not counted); ``none``
  skips it.

    python benchmarks/agent_footprint.py                     # full width, full install (~2 min)
    python benchmarks/agent_footprint.py --smoke             # tiny; what the test suite runs

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.client import BrokerClient  # noqa: E402
from harmony.config import validate_config  # noqa: E402
from orchestrator.engine import DistributedEngine  # noqa: E402
from orchestrator.registry import online_profiles  # noqa: E402
from testbed.flash import build_wheel  # noqa: E402
from testbed.stack import LocalStack  # noqa: E402

MIB = 2**20
TORCH_PARTS = ("torch", "torchgen", "functorch")


def config(smoke: bool, width: float) -> dict:
    if smoke:
        return {
            "name": "footprint-smoke", "seed": 0,
            "data": {"num_shards": 20, "shards_per_client": 2, "train_fraction": 0.2, "test_per_client": 20,
                     "rhos": [0.0, 0.8]},
            "model": {"family": "cnn8", "width": 0.25},
            "fleet": {"num_clients": 1, "split_depths": [4]},
            "train": {"algorithm": "harmony", "rounds": 1, "batch_size": 16, "local_steps": 2, "finetune_steps": 1},
            "eval": {"measure_latency_samples": 0},
        }
    return {
        "name": "footprint", "seed": 0,
        "data": {"num_shards": 100, "shards_per_client": 2, "test_per_client": 200, "rhos": [0.0, 0.4, 0.8]},
        "model": {"family": "cnn8", "width": width},
        "fleet": {"num_clients": 1, "split_depths": [4]},
        "train": {"algorithm": "harmony", "rounds": 1, "batch_size": 64, "local_steps": 10},
        "eval": {"measure_latency_samples": 20},
    }


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``/``VmHWM`` of a process in bytes (Linux ``/proc/PID/status``)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure_memory(cfg_doc: dict, torch_threads: int | None, settle_s: float = 2.0) -> dict:
    cfg = validate_config(cfg_doc)
    with tempfile.TemporaryDirectory(prefix="hsfl-footprint-") as tmp:
        stack = LocalStack(tmp)
        info = stack.start(agents=1, devices_per_agent=1, registry=False, torch_threads=torch_threads)
        try:
            pid = stack.pid("agent-0")
            watcher = BrokerClient(f"footprint-{uuid.uuid4().hex[:6]}", *info.mqtt, clean_start=True)
            watcher.connect()
            try:
                t0 = time.perf_counter()
                if not online_profiles(watcher, 1, timeout=180):
                    raise RuntimeError(f"the agent did not register; see {tmp}/agent-0.log")
                registered_s = time.perf_counter() - t0
            finally:
                watcher.close()
            time.sleep(settle_s)  # settled: the hello (and its micro-benchmarks) is out
            idle = proc_status(pid)
            samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append(psutil.Process(pid).memory_info().rss)
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            engine = DistributedEngine(cfg, mqtt=info.mqtt, redis_url=info.redis_url)
            try:
                results = engine.run()
            finally:
                engine.close()
            session_s = time.perf_counter() - t0
            stop.set()
            sampler.join()
            after = proc_status(pid)
        finally:
            stack.stop()
    return {"idle_rss_mib": round(idle["VmRSS"] / MIB, 1), "idle_hwm_mib": round(idle["VmHWM"] / MIB, 1),
            "peak_rss_mib": round(after["VmHWM"] / MIB, 1), "loaded_rss_mib": round(after["VmRSS"] / MIB, 1),
            "sampled_peak_rss_mib": round(max(samples, default=0) / MIB, 1), "registered_s": round(registered_s, 1),
            "session_s": round(session_s, 1), "accuracy_rho0": results["evaluation"]["accuracy"][0]}


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks, as ``du`` counts them)."""
    if not path.exists():
        return 0
    if path.is_file() or path.is_symlink():
        return path.lstat().st_blocks * 512
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*")) + path.lstat().st_blocks * 512


def measure_install(mode: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="hsfl-agent-venv-") as tmp:
        wheel = build_wheel(Path(tmp) / "wheel")
        venv = Path(tmp) / "venv"
        t0 = time.perf_counter()
        py = venv / "bin" / "python"
        if mode == "reuse":  # no pip of its own (ensurepip alone takes ~10 s here): this pip installs into it
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
            pip = [sys.executable, "-m", "pip", "--python", str(py)]
        else:  # as on a board
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
            pip = [str(py), "-m", "pip"]
        site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        if mode == "reuse":
            import sysconfig

            (site / "harmony-base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([*pip, "install", "-q", "--disable-pip-version-check", f"{wheel}[agent]"], check=True)
        install_s = time.perf_counter() - t0
        listing = subprocess.run([*pip, "list", "--format", "json", "--path", str(site)],
                                 check=True, capture_output=True, text=True).stdout
        installed = sorted(d["name"].lower() for d in json.loads(listing))
        total = du(venv)
        torch_bytes = sum(du(site / p) for p in TORCH_PARTS) + sum(du(p) for p in site.glob("torch-*.dist-info"))
        project = sum(du(site / p) for p in ("harmony", "broker", "edge_agent", "server", "orchestrator", "testbed"))
        project += sum(du(p) for p in site.glob("harmony_testbed-*.dist-info"))
        tooling = sum(du(site / p) for p in ("pip", "setuptools", "_distutils_hack"))
        tooling += sum(du(p) for p in site.glob("pip-*.dist-info")) + sum(du(p) for p in site.glob("setuptools-*"))
        return {"install": mode, "install_s": round(install_s, 1), "venv_mib": round(total / MIB, 1),
                "torch_mib": round(torch_bytes / MIB, 1), "project_mib": round(project / MIB, 1),
                "pip_setuptools_mib": round(tooling / MIB, 1),
                "other_deps_mib": round((total - torch_bytes - project - tooling) / MIB, 1),
                "distributions": installed,
                "celery_or_redis": sorted(d for d in installed if d in ("celery", "redis", "hiredis", "kombu"))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny session and a reusing install (the suite's size)")
    ap.add_argument("--width", type=float, default=1.0, help="cnn8 width multiplier (default 1: full width)")
    ap.add_argument("--install", choices=("full", "reuse", "none"), default=None,
                    help="installed-size measurement (default: full, reuse with --smoke)")
    ap.add_argument("--torch-threads", type=int, default=None, help="the agent's torch threads (default: torch's)")
    args = ap.parse_args(argv)
    install = args.install or ("reuse" if args.smoke else "full")
    result: dict = {"bench": "agent_footprint", "smoke": args.smoke, "width": 0.25 if args.smoke else args.width,
                    "machine": platform.machine(), "python": platform.python_version(),
                    "torch_threads": args.torch_threads or os.cpu_count()}
    result.update(measure_memory(config(args.smoke, args.width), args.torch_threads, 0.5 if args.smoke else 2.0))
    if install != "none":
        result.update(measure_install(install))
    for key in ("idle_rss_mib", "peak_rss_mib", "loaded_rss_mib", "venv_mib", "torch_mib", "install_s"):
        if key in result:
            print(f"{key:>16}: {result[key]}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
