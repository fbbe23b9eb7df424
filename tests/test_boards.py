"""``harmony flash`` onto emulated Raspberry Pi 4s (``make test-boards``; deselected from the default run).

Each board is ``testbed.board``'s: the Debian bookworm arm64 root (debootstrap, cached) through an
overlay, its own sshd on a loopback port, every process run by qemu-user as a Cortex-A72, 1 GiB of
memory (cgroup). The agent is installed from an arm64 wheelhouse made here (``testbed.wheelhouse``:
PyPI's aarch64 wheels; PyTorch's CPU index is not reachable from this machine) into a venv on the board,
exactly as ``harmony flash --wheelhouse`` does it for a board without internet.

1. torch chosen from the board's probe (2.9.1 for an Armv8.0 core): the flash installs, the self-check
   passes on the board, the unit is installed; the agent, started as the unit says, registers over TLS
   with its own certificate and password, and trains a HARMONY round of a mixed fleet beside two x86
   emulated devices, then the evaluation — one stack (torch 2.13.0) and one board (torch 2.9.1).
2. ``--torch 2.10.0`` on the same kind of board: the self-check stops the flash with the illegal
   instruction message naming the CPU and the next command; no unit, no bundle.json, no agent running.

The emulated core is slow (~0.2 GFLOP/s, far less under load): the config is tiny (cnn8 at width 0.25,
the board at the shallowest split, 2 local steps of 8 samples) and every deadline long.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from harmony.config import validate_config
from orchestrator.engine import DistributedEngine
from server import state
from testbed.board import emulated_board
from testbed.cli import app
from testbed.flash import UNIT_NAME, unit_exec
from testbed.stack import LocalStack
from testbed.wheelhouse import build_wheelhouse

DEVICE = "pi4-01"
CONFIG = {"name": "boards", "seed": 0, "threads": 1,
          "data": {"num_shards": 30, "shards_per_client": 2, "train_fraction": 0.05, "test_per_client": 16,
                   "rhos": [0.0]},
          "model": {"family": "cnn8", "width": 0.25},
          "fleet": {"num_clients": 3, "split_depths": [2, 3, 2]},
          "train": {"algorithm": "harmony", "rounds": 1, "batch_size": 8, "local_steps": 2}}
LONG = 3600  # seconds: an emulated Cortex-A72 on a loaded 2-core host

pytestmark = [pytest.mark.boards, pytest.mark.slow, pytest.mark.timeout(3 * LONG),
              pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None or shutil.which("debootstrap") is None,
                                 reason="needs qemu-user-static, binfmt-support and debootstrap (make test-boards)")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A `harmony up --tls` stack (torch 2.13.0 on x86) with two x86 emulated devices, emu-0 and emu-1."""
    d = tmp_path_factory.mktemp("stack")
    local = LocalStack(d / "stack")
    info = local.start(agents=0, tls=True, worker_concurrency=3)
    try:
        local.add_agent(["emu-0", "emu-1"])
        yield {"info": info, "dir": d / "stack", "redis": state.connect(info.redis_url), "store": Path(info.store)}
    finally:
        local.stop()


def _flash(board, stack, config: Path, *extra: str, device: str = DEVICE) -> tuple[int, str]:
    argv = ["flash", *board.flash_args(), "--device-id", device, "--broker", f"127.0.0.1:{stack['info'].mqtt_port}",
            "--stack", str(stack["dir"]), "--config", str(config), "--client", "2", *extra]
    result = CliRunner().invoke(app, argv)
    return result.exit_code, " ".join(result.output.split())


def _on_board(board, command: str, timeout: float = LONG) -> subprocess.CompletedProcess[str]:
    return subprocess.run(board.ssh(command), capture_output=True, text=True, timeout=timeout)


def _wait_registered(stack, board, timeout: float = LONG) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        fields = {k.decode(): v.decode() for k, v in stack["redis"].hgetall(state.dev_key(DEVICE)).items()}
        if "profile" in fields and fields.get("status") not in (None, "offline"):
            return fields
        if time.monotonic() > deadline:
            log = _on_board(board, "tail -c 4000 /opt/harmony/agent.log", 120).stdout
            pytest.fail(f"{DEVICE} did not register in {timeout} s:\n{log}")
        time.sleep(2)


def test_a_pi4_is_flashed_self_checked_and_trains_beside_x86_devices(stack, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    wheelhouse = build_wheelhouse(machine="aarch64", torch_spec="2.9.1")
    with emulated_board("t-pi4-good", cpu="cortex-a72", memory="1g", directory=tmp_path / "board") as board:
        # --dry-run: the choice and why, from the board's probe; nothing changes
        code, out = _flash(board, stack, config, "--wheelhouse", str(wheelhouse), "--dry-run")
        assert code == 0, out
        assert "board: cortex-a72 (emulated by qemu-user) (aarch64), Python 3.11" in out
        assert "torch: torch==2.9.1 — cortex-a72 (emulated by qemu-user) is an Armv8.0 core" in out
        assert _on_board(board, "test -e /opt/harmony || echo absent").stdout.strip() == "absent"

        code, out = _flash(board, stack, config, "--wheelhouse", str(wheelhouse))
        assert code == 0, out
        assert "self-check passed on cortex-a72 (emulated by qemu-user) (aarch64), Python 3.11" in out
        assert "torch 2.9.1" in out and "ok broker: logged in to 127.0.0.1" in out
        assert "service: skipped (the board runs no systemd)" in out
        assert f"flashed {DEVICE}" in out
        unit = _on_board(board, f"cat /etc/systemd/system/{UNIT_NAME}").stdout
        argv, env = unit_exec(unit)
        start = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # in a subshell of its own, every descriptor away from the SSH channel, so that ssh returns at once
        _on_board(board, f"cd /opt/harmony && ({start} nohup {shlex.join(argv)} < /dev/null "
                         "> /opt/harmony/agent.log 2>&1 &)", 120)

        device = _wait_registered(stack, board)
        profile = json.loads(device["profile"])
        assert "refused" not in device, device
        assert profile["self_check"]["ok"] is True and profile["self_check"]["torch"].startswith("2.9.1")
        assert profile["self_check"]["cpu"] == "cortex-a72 (emulated by qemu-user)"
        broker_log = (stack["dir"] / "mosquitto.log").read_text()
        assert f"as {DEVICE} " in broker_log  # logged in with its own user on the TLS device listener

        info = stack["info"]
        user, password = info.orchestrator_login()
        engine = DistributedEngine(validate_config(CONFIG), tmp_path / "run", mqtt=info.service_mqtt,
                                   redis_url=info.redis_url, username=user, password=password,
                                   tls=info.service_tls("orchestrator"), devices_timeout_s=LONG, round_timeout_s=LONG)
        try:
            assert engine.device_ids == ["emu-0", "emu-1", DEVICE]
            record = engine.run_round(1)
            assert record.participants == 3 and not record.dropouts and not record.stragglers
            evaluations = engine.evaluate_clients(personalise=False)
        finally:
            engine.close()
        assert sorted(evaluations) == [0, 1, 2]  # the board's client 2 evaluated on the board, with the server's help
        assert 0.0 <= evaluations[2].scores[0].fixed.accuracy <= 1.0


def test_torch_2_10_on_a_cortex_a72_stops_at_the_self_check_and_enables_nothing(stack, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    wheelhouse = build_wheelhouse(machine="aarch64", torch_spec="2.10.0")
    with emulated_board("t-pi4-bad", cpu="cortex-a72", memory="1g", directory=tmp_path / "board") as board:
        code, out = _flash(board, stack, config, "--wheelhouse", str(wheelhouse), "--torch", "2.10.0", device="pi4-bad")
        assert code != 0, out
        assert "self-check failed on root@127.0.0.1 (cortex-a72 (emulated by qemu-user), torch not importable)" in out
        assert "illegal instruction (the child died by SIGILL at import torch)" in out
        assert "nothing was enabled" in out
        assert "Next: harmony flash root@127.0.0.1 --device-id pi4-bad" in out and "--torch 2.9.1" in out
        assert f"--ssh-port {board.ssh_port}" in out and f"--wheelhouse {wheelhouse}" in out
        # nothing left enabled: no unit, no enabled link, no bundle.json (the next flash installs again)
        left = _on_board(board, f"for f in /etc/systemd/system/{UNIT_NAME} "
                                f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME} /opt/harmony/bundle.json; "
                                "do test -e $f && echo present: $f; done; test -x /opt/harmony/venv/bin/python && "
                                "echo venv kept")
        assert left.stdout.strip() == "venv kept", left.stdout
        # and no agent runs in the board (every process of its cgroup: its sshd and this session's)
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in board.pids() if Path(f"/proc/{pid}").exists()]
        assert not any(b"edge_agent" in c and b"--self-check" not in c for c in cmdlines), cmdlines
        assert b"pi4-bad" not in b"".join(stack["redis"].smembers(state.devices_key()))
