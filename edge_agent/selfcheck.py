"""The agent's self-check: can this board run the agent? Run by ``harmony flash`` on the board after
installing (``python -m edge_agent --self-check ...`` / ``harmony agent --self-check``) before the service
is enabled, and by the agent itself at start (reported in its ``hello``).

Four checks, each named in the result:

- ``torch``: ``import torch`` — in a child process, so that a torch built for instructions this CPU lacks
  is seen for what it is: the child dies by SIGILL (an *illegal instruction*), the parent reports it;
  a missing shared library (a CUDA build without NVIDIA's libraries) is read from the child's error;
- ``model``: one forward and backward step of the device's model (``cnn8`` by default) at its split
  depth (the deepest allowed one, the largest on-device model, unless given), in the same child, which
  also reports its peak resident memory;
- ``broker``: a TLS connection and login to the broker as the device (MQTT v5 CONNACK);
- ``memory``: the memory free to the agent (the cgroup limit bounds it) against the peak to expect
  (the larger of the child's measured peak and ``--min-memory``).

The result names the CPU, the torch version, what failed (``failure``: ``illegal_instruction``,
``missing_library``, ``torch_error``, ``model_error``, ``out_of_memory``, ``broker_refused``,
``broker_unreachable``, ``tls``) and the command to try next. Nothing here imports torch in this
process, so the parent survives a torch that cannot run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import resource
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MIB = 2**20
TORCH_TIMEOUT_S = 3600.0
"""The child's limit: ``import torch`` takes ~10 s on a Pi 4, minutes on an emulated core under load."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class SelfCheckReport:
    """The self-check's result (``to_json``/``from_json`` carry it from the board to ``harmony flash``)."""

    cpu: str
    machine: str
    python: str
    torch_version: str | None = None
    checks: list[Check] = field(default_factory=list)
    failure: str | None = None
    next_step: str = ""
    peak_rss_bytes: int | None = None
    available_bytes: int | None = None
    forward_backward_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and all(c.ok for c in self.checks)

    def fail(self, kind: str, check: Check, next_step: str) -> None:
        self.checks.append(check)
        if self.failure is None:
            self.failure, self.next_step = kind, next_step

    def message(self) -> str:
        """Several lines: the verdict with CPU and torch, each check, and the next command when it failed."""
        torch_text = f"torch {self.torch_version}" if self.torch_version else "torch (not importable)"
        head = (f"self-check {'passed' if self.ok else 'FAILED'} on {self.cpu} ({self.machine}), Python "
                f"{self.python}, {torch_text}")
        lines = [head] + [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        if not self.ok:
            lines.append(f"  failed: {self.failure}; next: {self.next_step}")
        return "\n".join(lines)

    def hello_summary(self) -> dict[str, bool | int | float | str]:
        """The flat map the agent reports as ``hello.self_check``."""
        out: dict[str, bool | int | float | str] = {"ok": self.ok, "cpu": self.cpu[:200], "machine": self.machine}
        if self.torch_version:
            out["torch"] = self.torch_version
        if self.failure:
            out["failure"] = self.failure
        for c in self.checks:
            out[f"{c.name}.ok"] = c.ok
            out[f"{c.name}.detail"] = c.detail[:500]
        if self.peak_rss_bytes is not None:
            out["peak_rss_bytes"] = self.peak_rss_bytes
        if self.available_bytes is not None:
            out["available_bytes"] = self.available_bytes
        if self.forward_backward_s is not None:
            out["forward_backward_s"] = round(self.forward_backward_s, 3)
        return out

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok})

    @classmethod
    def from_json(cls, text: str) -> SelfCheckReport:
        doc = json.loads(text)
        doc.pop("ok", None)
        doc["checks"] = [Check(**c) for c in doc.get("checks", [])]
        return cls(**doc)


# ----------------------------------------------------------------------------------- the CPU
ARM_CORES = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57", (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76", (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD41): "Cortex-A78", (0x41, 0xD42): "Cortex-A78AE",
    (0x41, 0xD40): "Neoverse-V1", (0x41, 0xD49): "Neoverse-N2", (0x4E, 0x004): "NVIDIA Carmel",
}
"""(``CPU implementer``, ``CPU part``) of an aarch64 ``/proc/cpuinfo`` → the core's name."""


def cpu_name() -> str:
    """The CPU as the board names it: the Arm core (``/proc/cpuinfo`` part), an x86 model name, or, under
    qemu-user, the emulated model (``QEMU_CPU``; ``/proc/cpuinfo`` is then the host's)."""
    if os.environ.get("QEMU_CPU"):
        return f"{os.environ['QEMU_CPU']} (emulated by qemu-user)"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    part = re.search(r"^CPU part\s*:\s*(0x[0-9a-fA-F]+)", text, re.MULTILINE)
    implementer = re.search(r"^CPU implementer\s*:\s*(0x[0-9a-fA-F]+)", text, re.MULTILINE)
    if part and implementer:
        key = (int(implementer.group(1), 16), int(part.group(1), 16))
        return ARM_CORES.get(key, f"Arm core implementer {key[0]:#x} part {key[1]:#05x}")
    model = re.search(r"^(?:model name|Model)\s*:\s*(.+)$", text, re.MULTILINE)
    return model.group(1).strip() if model else platform.machine()


# ----------------------------------------------------------------------------------- memory
def available_memory() -> int:
    """Bytes this process may still use: free memory, bounded by its cgroup's limit minus its usage
    (v2 ``memory.max``/``memory.current``, v1 ``memory.limit_in_bytes``/``memory.usage_in_bytes``)."""
    import psutil

    free = int(psutil.virtual_memory().available)
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    paths = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2].strip().lstrip("/")
    candidates = []
    if "" in paths:
        candidates.append((root / paths[""] / "memory.max", root / paths[""] / "memory.current"))
    if "memory" in paths:
        base = root / "memory"
        candidates.append((base / paths["memory"] / "memory.limit_in_bytes",
                           base / paths["memory"] / "memory.usage_in_bytes"))
    for limit_file, usage_file in candidates:
        try:
            limit_text, usage = limit_file.read_text().strip(), int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit():
            free = min(free, max(0, int(limit_text) - usage))
        break
    return free


# ----------------------------------------------------------------------------------- torch and model
def model_step(family: str, width: float, depth: int | None, batch: int) -> dict[str, Any]:
    """One forward and backward step of ``family``'s on-device model at ``depth`` (None: the deepest allowed)
    on random inputs; imports torch. Returns the depth, the seconds, whether the gradients are finite."""
    import torch

    from harmony.models import build_model

    with torch.random.fork_rng():  # the agent's own random streams are left as they were
        torch.manual_seed(0)
        net = build_model(family, width=width)
        depth = depth or max(net.split_depths)
        client = net.client_model(depth)
        x = torch.randn(batch, *net.input_shape)
        t0 = time.perf_counter()
        features, logits = client(x)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.long)) + features.mean()
        loss.backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in client.parameters() if p.grad is not None)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "depth": depth,
            "forward_backward_s": time.perf_counter() - t0, "finite": finite}


def _child(args_json: str) -> None:
    """The child of :func:`torch_and_model`: ``imported VERSION`` once torch imports, then one JSON line."""
    args = json.loads(args_json)
    t0 = time.perf_counter()
    import torch

    print(f"imported {torch.__version__}", flush=True)
    import_s = time.perf_counter() - t0
    result = model_step(args["family"], args["width"], args["depth"], args["batch"])
    result.update(import_s=import_s, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(result), flush=True)


_MISSING_LIB = re.compile(r"(lib[\w.+-]+\.so[\w.]*)[^\n]*(cannot open shared object file|not found)")


def torch_and_model(report: SelfCheckReport, *, family: str = "cnn8", width: float = 1.0, depth: int | None = None,
                    batch: int = 4, python: str = sys.executable, timeout_s: float = TORCH_TIMEOUT_S) -> None:
    """The ``torch`` and ``model`` checks, in a child process (see the module docstring)."""
    args = json.dumps({"family": family, "width": width, "depth": depth, "batch": batch})
    try:
        done = subprocess.run([python, "-m", "edge_agent.selfcheck", args], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        report.fail("torch_error", Check("torch", False, f"import torch and one step took over {timeout_s:.0f} s"),
                    "check the board's load and storage, then run the self-check again")
        return
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    imported = re.search(r"^imported (\S+)", done.stdout, re.MULTILINE)
    if imported:
        report.torch_version = imported.group(1)
    if done.returncode < 0:
        sig = signal.Signals(-done.returncode)
        where = "at import torch" if not imported else "in the model's forward/backward step"
        if sig == signal.SIGILL:
            report.fail("illegal_instruction", Check(
                "torch", False, f"illegal instruction (the child died by SIGILL {where}): this torch uses "
                f"instructions {report.cpu} does not have"),
                "install a torch built for this CPU: flash again with `--torch 2.9.1` (the newest CPU-only PyPI "
                "build that runs on Armv8.0 cores such as Cortex-A53/A72), docs/flashing.md")
        elif sig == signal.SIGKILL:
            report.fail("out_of_memory", Check("torch", False, f"the child was killed (SIGKILL {where}): most "
                        "likely out of memory"), "free memory on the board (or give it swap), then flash again")
        else:
            report.fail("torch_error", Check("torch", False, f"the child died by {sig.name} {where}"),
                        "read the board's kernel log (dmesg) and try another torch with --torch")
        return
    if done.returncode != 0:
        err = done.stderr.strip()
        tail = (err.splitlines() or ["?"])[-1][:300]
        missing = _MISSING_LIB.search(err)
        if not imported and missing:
            report.fail("missing_library", Check("torch", False, f"import torch failed: {missing.group(1)} missing "
                        f"({tail})"), "this torch is a build whose libraries the board lacks (PyPI's aarch64 "
                        "2.11+ are CUDA builds): flash again with --torch naming a CPU build")
        elif not imported:
            kind = "out_of_memory" if "MemoryError" in err else "torch_error"
            report.fail(kind, Check("torch", False, f"import torch failed: {tail}"),
                        "reinstall the agent with `harmony flash ... --upgrade`, or pick another torch with --torch")
        else:
            kind = "out_of_memory" if "MemoryError" in err or "DefaultCPUAllocator" in err else "model_error"
            report.checks.append(Check("torch", True, f"import torch {report.torch_version}"))
            report.fail(kind, Check("model", False, f"{family} forward/backward failed: {tail}"),
                        "free memory on the board, or report the error with this torch version")
        return
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report.torch_version = result["torch"]
    cuda = f" (CUDA {result['cuda']})" if result.get("cuda") else " (CPU build)"
    report.checks.append(Check("torch", True, f"import torch {result['torch']}{cuda} in {result['import_s']:.1f} s"))
    report.peak_rss_bytes = max(int(result["peak_rss_bytes"]), usage.ru_maxrss * 1024)
    _model_result(report, result, family, width, batch)


def _model_result(report: SelfCheckReport, result: dict[str, Any], family: str, width: float, batch: int) -> None:
    report.forward_backward_s = float(result["forward_backward_s"])
    if not result["finite"]:
        report.fail("model_error", Check("model", False, f"{family} at depth {result['depth']}: non-finite gradients"),
                    "this torch computes wrong results on this CPU: try another with --torch")
        return
    peak = "" if report.peak_rss_bytes is None else f", peak {report.peak_rss_bytes / MIB:.0f} MiB"
    report.checks.append(Check("model", True, f"{family} (width {width}) at split depth {result['depth']}: forward "
                               f"and backward of {batch} samples in {report.forward_backward_s:.2f} s{peak}"))


def in_process_check(*, family: str = "cnn8", width: float = 1.0, depth: int | None = None,
                     batch: int = 4) -> SelfCheckReport:
    """The agent's own check at start (torch is already imported there: a torch that cannot run on this CPU
    never got this far): the model step here, memory against this process's peak so far. The broker part is
    the agent's own connection, which its ``hello`` proves."""
    report = SelfCheckReport(cpu=cpu_name(), machine=platform.machine(), python=platform.python_version())
    available = available_memory()
    try:
        result = model_step(family, width, depth, batch)
    except Exception as err:  # noqa: BLE001 - whatever torch raised is the finding
        report.fail("model_error", Check("model", False, f"{family} forward/backward failed: {err}"[:500]),
                    "report the error with this torch version")
        return report
    report.torch_version = result["torch"]
    report.checks.append(Check("torch", True, f"torch {result['torch']} imported"))
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _model_result(report, result, family, width, batch)
    memory(report, available + _rss_now(), 0)
    return report


def _rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# ----------------------------------------------------------------------------------- broker
def broker_login(report: SelfCheckReport, host: str, port: int, device_id: str, password: str | None,
                 cafile: Path | None = None, certfile: Path | None = None, keyfile: Path | None = None,
                 timeout_s: float = 60.0) -> None:
    """The ``broker`` check: TLS (when ``cafile``) and an MQTT v5 login as ``device_id``; disconnects at once."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"selfcheck-{device_id}", protocol=paho.MQTTv5)
    if password is not None:
        client.username_pw_set(device_id, password)
    where = f"{host}:{port}" + (" over TLS" if cafile else "")
    if cafile is not None:
        try:
            client.tls_set(ca_certs=str(cafile), certfile=None if certfile is None else str(certfile),
                           keyfile=None if keyfile is None else str(keyfile))
        except (OSError, ssl.SSLError, ValueError) as err:
            report.fail("tls", Check("broker", False, f"TLS files unusable: {err}"),
                        "flash again so the device's certificate and key are copied (harmony fleet add ID)")
            return
    answered = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        outcome["reason"] = reason
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=30)
    except ssl.SSLError as err:
        report.fail("tls", Check("broker", False, f"TLS handshake with {where} failed: {err}"),
                    "check that --broker names the host its certificate was made for and the CA is the stack's")
        return
    except OSError as err:
        report.fail("broker_unreachable", Check("broker", False, f"cannot connect to {where}: {err}"),
                    "check --broker (HOST:PORT as the board reaches it) and that the broker runs, then flash again")
        return
    client.loop_start()
    try:
        if not answered.wait(timeout_s):
            report.fail("broker_unreachable", Check("broker", False, f"no CONNACK from {where} in {timeout_s:.0f} s"),
                        "check --broker and the network between the board and the broker")
            return
        reason = outcome["reason"]
        if reason.is_failure:
            report.fail("broker_refused", Check("broker", False, f"{where} refused the login of {device_id}: {reason}"),
                        f"the broker does not know this password/certificate: `harmony fleet add {device_id}` on the "
                        "stack (then the broker reloads), and flash again")
            return
        report.checks.append(Check("broker", True, f"logged in to {where} as {device_id}"))
    finally:
        client.disconnect()
        client.loop_stop()


def memory(report: SelfCheckReport, available: int, min_bytes: int = 0) -> None:
    """The ``memory`` check: ``available`` against the larger of the measured peak and ``min_bytes``."""
    report.available_bytes = available
    need = max(report.peak_rss_bytes or 0, min_bytes)
    text = f"{available / MIB:.0f} MiB free for the agent, its peak {need / MIB:.0f} MiB"
    if available < need:
        report.fail("out_of_memory", Check("memory", False, text),
                    "free memory on the board (stop other services, add swap) or give the device a smaller "
                    "model (model.width, a shallower split depth)")
    else:
        report.checks.append(Check("memory", True, text))


def run_self_check(*, broker: tuple[str, int] | None, device_id: str, password: str | None = None,
                   cafile: Path | None = None, certfile: Path | None = None, keyfile: Path | None = None,
                   family: str = "cnn8", width: float = 1.0, depth: int | None = None, min_memory_bytes: int = 0,
                   torch_timeout_s: float = TORCH_TIMEOUT_S) -> SelfCheckReport:
    """Every check in order: memory free before anything runs, torch and the model (child process), the broker
    (skipped when ``broker`` is None), then memory against the measured peak."""
    report = SelfCheckReport(cpu=cpu_name(), machine=platform.machine(), python=platform.python_version())
    available = available_memory()
    t0 = time.perf_counter()
    torch_and_model(report, family=family, width=width, depth=depth, timeout_s=torch_timeout_s)
    log.debug("torch part of the self-check: %.1f s", time.perf_counter() - t0)
    if broker is not None:
        broker_login(report, broker[0], broker[1], device_id, password, cafile, certfile, keyfile)
    memory(report, available, min_memory_bytes)
    return report


if __name__ == "__main__":
    _child(sys.argv[1])
