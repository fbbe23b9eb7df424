"""Which torch runs on which board CPU: torch version × emulated Arm core → runs, or how it fails.

For each torch version, the aarch64 wheels of torch and its dependencies are downloaded as
``harmony flash`` would put them in a wheelhouse (``testbed.wheelhouse``) and unpacked once; then, for
each CPU model, Python 3.11 of the Debian bookworm arm64 board root (``testbed.rootfs``) runs under
qemu-user with ``QEMU_CPU=MODEL`` — which emulates that core's instruction set exactly, so an
instruction the core lacks ends the process with SIGILL as on the real board — and does what an agent
does first: ``import torch``, then three SGD steps of a small CNN (forward, backward, update).

    python benchmarks/board_torch_matrix.py                              # 2.8.0 2.9.1 2.10.0 x a53 a72 a76
    python benchmarks/board_torch_matrix.py --torch 2.9.1 --cpu cortex-a72

It prints a Markdown table (the one in benchmarks/RESULTS.md and docs/flashing.md) and, last, one
JSON object with every cell. PyPI's aarch64 torch 2.11 and newer are CUDA builds that do not import
without NVIDIA's libraries (docs/flashing.md); they are not run here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.rootfs import BOARD_PACKAGES, cache_dir, debian_root, ensure_binfmt  # noqa: E402
from testbed.wheelhouse import build_wheelhouse  # noqa: E402

CPUS = ("cortex-a53", "cortex-a72", "cortex-a76")
BOARDS = {"cortex-a53": "Pi Zero 2 W, Pi 3", "cortex-a72": "Pi 4", "cortex-a76": "Pi 5"}
VERSIONS = ("2.8.0", "2.9.1", "2.10.0")
TRIAL = r"""
import json, time
t0 = time.perf_counter()
import torch
print("imported", flush=True)
t1 = time.perf_counter()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
for _ in range(3):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
print(json.dumps({"torch": torch.__version__, "import_s": t1 - t0, "steps_s": time.perf_counter() - t1,
                  "loss": float(loss)}))
"""


def site_dir(version: str) -> Path:
    """torch ``version`` and its dependencies for aarch64, unpacked (made once)."""
    site = cache_dir() / "board-matrix" / f"torch-{version}"
    if (site / ".complete").exists():
        return site
    wheels = build_wheelhouse(machine="aarch64", torch_spec=version, project_wheel=False)
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    for so in site.rglob("*.so*"):
        so.chmod(0o755)
    (site / ".complete").write_text("\n".join(w.name for w in sorted(wheels.glob("*.whl"))) + "\n")
    return site


def trial(root: Path, site: Path, cpu: str, timeout_s: float) -> dict[str, object]:
    """Run the trial under qemu-user as ``cpu``; the cell: ``runs`` or what ended it."""
    env = {"PATH": "/usr/bin:/bin", "QEMU_CPU": cpu, "PYTHONPATH": str(site), "HOME": "/tmp",
           "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}
    cmd = ["qemu-aarch64-static", "-L", str(root), str(root / "usr/bin/python3.11"), "-c", TRIAL]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"outcome": f"no result within {timeout_s:.0f} s", "wall_s": timeout_s}
    wall = time.perf_counter() - t0
    imported = "imported" in done.stdout
    if done.returncode == 0:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return {"outcome": "runs", "wall_s": round(wall, 1), "import_s": round(result["import_s"], 1),
                "steps_s": round(result["steps_s"], 2)}
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        where = "in training" if imported else "at `import torch`"
        return {"outcome": f"**{name} {where}**", "wall_s": round(wall, 1)}
    tail = (done.stderr.strip().splitlines() or ["?"])[-1][:120]
    return {"outcome": f"exit {done.returncode}: {tail}", "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", nargs="+", default=list(VERSIONS), help="torch versions (aarch64 wheels from PyPI)")
    ap.add_argument("--cpu", nargs="+", default=list(CPUS), help="qemu CPU models")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    args = ap.parse_args()
    if shutil.which("qemu-aarch64-static") is None:
        raise SystemExit("qemu-aarch64-static not found: apt-get install qemu-user-static binfmt-support")
    ensure_binfmt("arm64")
    root = debian_root("arm64", BOARD_PACKAGES)
    cells: dict[str, dict[str, object]] = {}
    for version in args.torch:
        site = site_dir(version)
        for cpu in args.cpu:
            cell = trial(root, site, cpu, args.timeout)
            cells[f"{version}/{cpu}"] = cell
            print(f"torch {version} on {cpu}: {cell}", file=sys.stderr, flush=True)
    print("| torch (PyPI aarch64 wheel) | " + " | ".join(f"{c} ({BOARDS.get(c, '?')})" for c in args.cpu) + " |")
    print("| --- | " + " | ".join("---" for _ in args.cpu) + " |")
    for version in args.torch:
        row = []
        for cpu in args.cpu:
            cell = cells[f"{version}/{cpu}"]
            text = str(cell["outcome"])
            if text == "runs":
                text = f"runs (import {cell['import_s']} s, 3 steps {cell['steps_s']} s)"
            row.append(text)
        print(f"| {version} | " + " | ".join(row) + " |")
    print(json.dumps({"qemu": subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True,
                                             text=True).stdout.splitlines()[0], "host_cpus": os.cpu_count(),
                      "cells": cells}))


if __name__ == "__main__":
    main()
