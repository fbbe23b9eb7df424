"""``harmony flash`` against a real sshd: from a bare "board" (a scratch directory as its root, reached
as root@127.0.0.1 on a free port with a throwaway key) to a registered, authenticated device of a
real `harmony up --tls` stack (mosquitto with its TLS device listener, client certificates, the
per-device ACL and client ids tied to user names; the orchestrator's registry process recording
into redis-server), the device added with `harmony fleet add ID --stack DIR`.

The sshd (Debian ``openssh-server``) runs in the foreground (``-D -f CONFIG``) with its own host
key, an authorized key made here, ``PermitRootLogin prohibit-password``, ``UsePAM no`` and
``StrictModes no``, and is stopped by its PID. The board has no systemd: the flash says it skips
the service, and the test starts the agent exactly as the unit's ``ExecStart`` says (its
``Environment`` and ``WorkingDirectory``, a bare PATH).

Honest shortcut: a full ``pip install WHEEL[agent]`` into a fresh venv takes ~55 s here (torch
alone is 760 MiB; ``benchmarks/agent_footprint.py`` measures it, RESULTS §8). The board's venv is
therefore made with ``--site-packages BASE``: BASE is a directory of symlinks to this machine's
installed dependencies **without** this project, Celery, Kombu or Redis, and pip still installs the
project wheel with the ``[agent]`` extra into the venv (it finds the dependencies satisfied).

One flow, in order: a fresh flash of an *older* agent (0.0.9) → its agent connects over TLS and is
refused by the orchestrator naming ``--upgrade`` (its Redis hash); the same flash again changes nothing; a newer agent
without ``--upgrade`` is refused and changes nothing; ``--dry-run --upgrade`` prints the steps and
changes nothing; ``--upgrade`` replaces the agent in the same venv → the restarted agent registers
with the orchestrator's version, and a training round over TLS with an emulated second device gives
the board the client whose rows it holds (``hello.data_share``) and the local engine's weights bit for
bit; flashing again is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from broker.mosquitto import free_port
from harmony.config import validate_config
from harmony.data.device_rows import read_device_rows
from harmony.engine import LocalEngine
from harmony.experiment import Experiment
from harmony.version import installed_version
from orchestrator.engine import DistributedEngine
from server import state
from testbed.cli import app
from testbed.flash import UNIT_NAME, build_wheel, unit_exec
from testbed.stack import LocalStack
from tests.runtime_fixtures import same_weights

ROOT = Path(__file__).resolve().parents[1]
SSHD = Path("/usr/sbin/sshd")
DEVICE = "pi-01"
OLD = "0.0.9"
CONFIG = {"name": "flash", "seed": 0, "threads": 1,
          "data": {"num_shards": 20, "shards_per_client": 2, "train_fraction": 0.1, "test_per_client": 20,
                   "rhos": [0.0, 0.8]},
          "model": {"family": "cnn8", "width": 0.25},
          "fleet": {"num_clients": 2, "split_depths": [2, 3]},
          "train": {"rounds": 1, "batch_size": 16, "local_steps": 2}}
EXCLUDED = ("celery", "kombu", "billiard", "vine", "amqp", "redis", "hiredis", "harmony_testbed", "__editable__")

pytestmark = pytest.mark.skipif(not SSHD.is_file() or shutil.which("ssh") is None,
                                reason="needs openssh-server and openssh-client (make system-deps)")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real sshd on a free loopback port accepting a throwaway key for root."""
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no",
        "Subsystem sftp /usr/lib/openssh/sftp-server", ""]))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege-separation dir (Debian: the unit makes it)
    check = subprocess.run([str(SSHD), "-t", "-f", str(d / "sshd_config")], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"sshd cannot run here: {check.stderr.strip()}")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "wb"))
    deadline = time.monotonic() + 10
    while subprocess.run(["ssh", "-p", str(port), "-o", "BatchMode=yes", "-i", str(d / "client_key"), "-o",
                          f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=accept-new",
                          "root@127.0.0.1", "true"], capture_output=True).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, (d / "sshd.log").read_text()
        time.sleep(0.1)
    try:
        yield {"port": port, "key": d / "client_key", "known_hosts": d / "known_hosts"}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A `harmony up --tls` stack without agents (mosquitto with its TLS device listener requiring
    client certificates, the per-device ACL and client ids tied to user names; redis-server with its
    ACL; a Celery worker; the orchestrator's registry process). Device pi-01 is not in its credential
    store: the first `harmony flash --stack DIR` creates its credentials (the broker reloads)."""
    d = tmp_path_factory.mktemp("fleet")
    stack = LocalStack(d / "stack")
    info = stack.start(agents=0, tls=True, worker_concurrency=2)
    try:
        stack.add_agent(["emu-0"])  # a second device (emulated, the whole dataset) for the training round
        yield {"dir": Path(info.store), "tls_port": info.mqtt_port, "redis": state.connect(info.redis_url),
               "log": d / "stack" / "mosquitto.log", "info": info, "stack": d / "stack"}
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def base_site(tmp_path_factory):
    """This environment's installed dependencies, as symlinks, without this project, Celery or Redis."""
    d = tmp_path_factory.mktemp("base-site")
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower()
        if entry.suffix == ".pth" or any(name.startswith(x) for x in EXCLUDED):
            continue
        (d / entry.name).symlink_to(entry)
    return d


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """This project's wheel, and the same code labelled as an older release (0.0.9)."""
    d = tmp_path_factory.mktemp("wheels")
    old_src = d / "old-src"
    old_src.mkdir()
    for name in ("README.md", "harmony", "broker", "edge_agent", "server", "orchestrator", "testbed"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, old_src / name)
    text = (ROOT / "pyproject.toml").read_text()
    (old_src / "pyproject.toml").write_text(text.replace(f'version = "{installed_version()}"', f'version = "{OLD}"', 1))
    return {"old": build_wheel(d / "old", old_src), "new": build_wheel(d / "new")}


def _flash(sshd, fleet, board: Path, *extra: str, device: str = DEVICE, stack: bool = False) -> tuple[int, str]:
    store = ["--stack", str(fleet["stack"])] if stack else ["--credentials-dir", str(fleet["dir"])]
    argv = ["flash", "root@127.0.0.1", "--device-id", device, "--broker", f"127.0.0.1:{fleet['tls_port']}",
            *store, "--root", str(board), "--ssh-port", str(sshd["port"]),
            "--identity", str(sshd["key"]), "--ssh-option", f"UserKnownHostsFile={sshd['known_hosts']}",
            "--ssh-option", "StrictHostKeyChecking=accept-new", "--python", sys._base_executable,
            "--site-packages", str(fleet["base_site"]), *extra]
    result = CliRunner().invoke(app, argv)
    return result.exit_code, " ".join(result.output.split())  # error messages are wrapped at the terminal width


def _start_as_unit(unit: Path, log: Path) -> subprocess.Popen:
    argv, env = unit_exec(unit.read_text())
    workdir = next(line.split("=", 1)[1] for line in unit.read_text().splitlines()
                   if line.startswith("WorkingDirectory="))
    return subprocess.Popen(argv, cwd=workdir, env={"PATH": "/usr/bin:/bin", "HOME": str(log.parent), **env},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait_registered(fleet, version: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> dict:
    """The device's hash in Redis once the stack's orchestrator recorded its hello of ``version``
    and its status (the registry process's view: profile, status, refused)."""
    r = fleet["redis"]
    deadline = time.monotonic() + timeout
    while True:
        fields = {k.decode(): v.decode() for k, v in r.hgetall(state.dev_key(DEVICE)).items()}
        profile = json.loads(fields.get("profile", "{}"))
        if profile.get("agent_version") == version and fields.get("status") not in (None, "offline"):
            return fields
        assert proc.poll() is None, f"the agent exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no hello of agent {version}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.mark.slow
def test_flash_brings_a_bare_board_to_a_registered_tls_device_and_upgrades_it(sshd, fleet, base_site, wheels,
                                                                               tmp_path):
    fleet["base_site"] = base_site
    board = tmp_path / "board"
    board.mkdir()
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    data = ["--config", str(cfg_path), "--client", "1"]
    home = board / "opt" / "harmony"
    unit = board / "etc" / "systemd" / "system" / UNIT_NAME

    # 0. a dry run for a device the store does not know yet shows the steps and creates nothing
    device_dir = fleet["dir"] / "devices" / DEVICE
    passwd_before = (fleet["dir"] / "mosquitto.passwd").read_bytes()
    code, out = _flash(sshd, fleet, board, "--wheel", str(wheels["old"]), *data, "--dry-run", stack=True)
    assert code == 0, out
    assert f"would create credentials for {DEVICE}" in out and "dry run: nothing was changed" in out
    assert not device_dir.exists() and (fleet["dir"] / "mosquitto.passwd").read_bytes() == passwd_before
    assert list(board.iterdir()) == []

    # 1. one command: a fresh board gets its new credentials (the stack's broker reloads), the older
    # agent, its own rows and the unit
    code, out = _flash(sshd, fleet, board, "--wheel", str(wheels["old"]), *data, stack=True)
    assert code == 0, out
    assert f"created credentials for {DEVICE}" in out and "reloaded its password file" in out
    assert (device_dir / "client.crt").is_file() and DEVICE.encode() in (fleet["dir"] / "mosquitto.passwd").read_bytes()
    assert "service: skipped" in out and "start the agent as the unit would" in out
    assert "self-check passed on " in out and "ok broker: logged in to 127.0.0.1" in out
    venv_python = home / "venv" / "bin" / "python"
    inode = venv_python.resolve().stat().st_ino, (home / "venv").stat().st_ino
    version = subprocess.run([str(venv_python), "-c", "from importlib import metadata; print(metadata.version("
                              "'harmony-testbed'))"], capture_output=True, text=True, cwd=tmp_path)
    assert version.stdout.strip() == OLD, version.stderr
    no_server = subprocess.run([str(venv_python), "-c", "import celery"], capture_output=True, text=True,
                               cwd=tmp_path)
    assert no_server.returncode != 0 and "No module named 'celery'" in no_server.stderr
    for name, mode in (("password", 0o600), ("client.key", 0o600), ("client.crt", 0o644), ("ca.crt", 0o644)):
        assert (home / "credentials" / name).stat().st_mode & 0o777 == mode, name
    assert (home / "credentials" / "password").read_text().startswith(f"{DEVICE}:")
    rows = read_device_rows(home / "data" / "fashion_mnist.rows.npz")
    share = Experiment.plan(validate_config(CONFIG)).shares[1]
    assert rows.client == 1 and np.array_equal(rows.train_index, share.train_indices)
    assert np.array_equal(rows.test_index, np.unique(np.concatenate([share.test.id_pool, share.test.ood_pool])))
    text = unit.read_text()
    assert "Restart=on-failure" in text and "WantedBy=multi-user.target" in text
    argv, _ = unit_exec(text)
    assert argv[:3] == [str(venv_python), "-m", "edge_agent"]
    assert argv[argv.index("--broker") + 1] == f"127.0.0.1:{fleet['tls_port']}" and "--cafile" in argv
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    manifest = json.loads((home / "bundle.json").read_text())
    assert manifest["agent_version"] == OLD and manifest["device_id"] == DEVICE

    # the agent, started as the unit starts it, connects over TLS with its certificate; the
    # orchestrator's registry refuses it for its version, naming the fix
    log = tmp_path / "agent.log"
    agent = _start_as_unit(unit, log)
    try:
        device = _wait_registered(fleet, OLD, agent, log)
        # its hello names the share its data file holds: a run gives it exactly client 1
        assert json.loads(device["profile"])["data_share"] == hashlib.sha256(share.to_bytes()).hexdigest()
        assert "--upgrade" in device.get("refused", "") and f"runs agent {OLD}" in device["refused"]
        # logged in on the TLS device listener as its own user (its client id is its user name there)
        broker_log = fleet["log"].read_text()
        assert f"on port {fleet['tls_port']}." in broker_log and f"as {DEVICE} " in broker_log, broker_log[-2000:]

        # 2. the same flash again: nothing copied, nothing installed
        before = (home / "bundle.json").stat().st_mtime_ns
        code, out = _flash(sshd, fleet, board, "--wheel", str(wheels["old"]), *data)
        assert code == 0, out
        assert "already has this bundle" in out and "up to date" in out
        assert "run the install script" not in out and " scp " not in out
        assert (home / "bundle.json").stat().st_mtime_ns == before

        # 3. a newer agent without --upgrade: refused, naming the fix; nothing changed
        code, out = _flash(sshd, fleet, board, *data)
        assert code != 0
        assert f"already runs agent {OLD}" in out and "--upgrade" in out and "nothing was changed" in out
        # the command it suggests is the user's own, every option kept, plus --upgrade
        suggested = out.split("replace it in place with `", 1)[1].split("`", 1)[0]
        for option in (f"--ssh-port {sshd['port']}", f"--identity {sshd['key']}", f"--root {board}",
                       f"--config {cfg_path} --client 1", f"--site-packages {base_site}", "--upgrade"):
            assert option in suggested, (option, suggested)
        assert (home / "bundle.json").stat().st_mtime_ns == before

        # 4. --dry-run --upgrade prints every step and changes nothing
        code, out = _flash(sshd, fleet, board, "--wheel", str(wheels["new"]), *data, "--upgrade", "--dry-run")
        assert code == 0, out
        assert "[dry-run] would run the install script" in out and "--force-reinstall" in out
        assert "dry run: nothing was changed" in out
        assert (home / "bundle.json").stat().st_mtime_ns == before
    finally:
        _stop(agent)

    # 5. --upgrade replaces the agent in place (the same venv); restarted, it registers
    code, out = _flash(sshd, fleet, board, "--wheel", str(wheels["new"]), *data, "--upgrade")
    assert code == 0, out
    assert f"flashed {DEVICE} (agent {installed_version()}): agent" in out
    assert (venv_python.resolve().stat().st_ino, (home / "venv").stat().st_ino) == inode
    assert json.loads((home / "bundle.json").read_text())["agent_version"] == installed_version()
    agent = _start_as_unit(unit, log)
    try:
        device = _wait_registered(fleet, installed_version(), agent, log)
        assert "refused" not in device  # admitted: the orchestrator's own version
        assert DEVICE.encode() in fleet["redis"].smembers(state.devices_key())

        # a training round over TLS: the board trains client 1 from its own rows only (its data
        # file's share), the emulated device client 0; the weights are the local engine's bit for bit
        info = fleet["info"]
        cfg = validate_config(CONFIG)
        user, password = info.orchestrator_login()
        engine = DistributedEngine(cfg, mqtt=info.service_mqtt, redis_url=info.redis_url, username=user,
                                   password=password, tls=info.service_tls("orchestrator"), devices_timeout_s=60,
                                   round_timeout_s=120)
        try:
            assert engine.device_ids == ["emu-0", DEVICE]
            record = engine.run_round(1)
            assert record.participants == 2 and not record.dropouts and not record.stragglers
            local = LocalEngine(cfg)
            local.run_round(1)
            assert same_weights(local.model_state(), engine.model_state())
        finally:
            engine.close()
    finally:
        _stop(agent)

    # 6. and again: idempotent (the same code, the wheel built anew by the flash itself); with --upgrade
    # it says that nothing changed
    code, out = _flash(sshd, fleet, board, *data)
    assert code == 0 and "already has this bundle" in out, out
    code, out = _flash(sshd, fleet, board, *data, "--upgrade")
    assert code == 0 and "--upgrade: nothing changed" in out and "already runs this exact bundle" in out, out


def test_bad_input_names_the_option_and_touches_nothing(sshd, fleet, base_site, tmp_path):
    fleet["base_site"] = base_site
    board = tmp_path / "board"
    board.mkdir()
    passwd = (fleet["dir"] / "mosquitto.passwd").read_bytes()
    code, out = _flash(sshd, fleet, board, "--client", "1", device="unknown-7")
    assert code != 0 and "--config and --client go together" in out
    # a device the store does not know gets no credentials from a command that fails on its options
    assert not (fleet["dir"] / "devices" / "unknown-7").exists()
    assert (fleet["dir"] / "mosquitto.passwd").read_bytes() == passwd
    code, out = _flash(sshd, fleet, board, "--service", "upstart")
    assert code != 0 and "--service 'upstart'" in out
    runner = CliRunner()
    result = runner.invoke(app, ["flash", "pi-at-nowhere", "--device-id", DEVICE, "--broker", "h:1"])
    assert result.exit_code != 0 and "USER@HOST" in result.output
    result = runner.invoke(app, ["flash", "root@127.0.0.1", "--device-id", DEVICE, "--broker", "nohost"])
    assert result.exit_code != 0 and "--broker 'nohost'" in result.output
    assert list(board.iterdir()) == []
