"""``harmony flash USER@HOST --device-id ID``: from a fresh board to a registered device in one command.

The *bundle* is built here, in a staging directory, then copied over SSH (the system ``ssh`` and
``scp``) and installed by one POSIX ``sh`` script on the board:

- ``harmony_testbed-VERSION-py3-none-any.whl``: a wheel of this project (``pip wheel --no-deps``
  from a clean copy of the source tree), installed on the board with the ``[agent]`` extra only
  (torch, numpy, paho-mqtt, msgpack, psutil, pyyaml; no Celery, no Redis) into ``PREFIX/venv``;
- ``password`` (``device_id:password``), ``ca.crt``, ``client.crt``, ``client.key``: the device's
  own credentials from the credential store (:mod:`testbed.credentials`), mode 0600;
- ``DATASET.rows.npz``: the device's own data, only its client's rows under a run config
  (``--config CONFIG --client I``; :mod:`harmony.data.device_rows`), or nothing when the data is
  already on the board (``--board-data DIR``);
- ``harmony-agent.service``: a systemd unit whose ``ExecStart`` is the whole agent config (broker,
  device id, TLS files, data and cache directories) and which restarts the agent on failure;
- ``bundle.json``: what was installed, as content digests per component (agent, credentials, data,
  unit), written on the board last.

Before installing, the board is probed (``testbed.board_probe``: CPU core and its instruction-set
features, Python, a Jetson's L4T release, free memory and disk) and its torch chosen
(``choose_torch``: the CPU build that runs on that core, a Jetson's own JetPack torch, or ``--torch
SPEC``); ``--wheelhouse DIR`` (``testbed.wheelhouse``) installs from wheels made here, for a board with
no internet. After installing, the agent's self-check runs on the board (``python -m edge_agent
--self-check``: torch and one model step, the TLS login to the broker, memory); only when it passes are
the unit installed, ``bundle.json`` written and the service enabled and started. When it fails, the flash
stops with the board's CPU, the torch version, what failed and the command to try next, and leaves no
unit and no service enabled.

A second flash compares its digests with the board's ``bundle.json``: nothing changed, nothing is
copied or installed; changed credentials, data or unit are replaced and the service restarted; a
different agent (wheel) is refused unless ``--upgrade``, which replaces it in place in the same venv.
``--dry-run`` prints every step (reading the board's state, changing nothing). The service step is
``systemctl daemon-reload / enable / restart`` where the board runs systemd and the files live at
the real root; elsewhere (``--root DIR``, a container without systemd) it is skipped with a message
giving the command the unit would run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from harmony.profiles import UnknownProfileError, resolve_class

log = logging.getLogger(__name__)

DISTRIBUTION = "harmony-testbed"
UNIT_NAME = "harmony-agent.service"
DEFAULT_PREFIX = PurePosixPath("/opt/harmony")
COMPONENTS = ("agent", "credentials", "data", "unit")
MIN_PYTHON = (3, 10)
UNSUPPORTED_ARCH = {"armv6l": "a 32-bit ARMv6 OS", "armv7l": "a 32-bit ARM OS", "i686": "a 32-bit x86 OS"}
_SAFE_ARG = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FlashError(RuntimeError):
    """Flashing cannot go on; the message names the option or the board's state, and the fix."""


Say = Callable[[str], None]


# ----------------------------------------------------------------------------------- the target
@dataclass(frozen=True)
class SshTarget:
    """``USER@HOST`` reached with the system ``ssh``/``scp`` (key authentication, no prompts)."""

    user: str
    host: str
    port: int = 22
    identity: Path | None = None
    options: tuple[str, ...] = ()
    """Extra ``-o KEY=VALUE`` options (e.g. ``UserKnownHostsFile=…``)."""

    @classmethod
    def parse(cls, text: str, *, port: int = 22, identity: Path | None = None,
              options: tuple[str, ...] = ()) -> SshTarget:
        user, sep, host = text.partition("@")
        if not sep or not user or not host or any(c in text for c in " /\\'\""):
            raise FlashError(f"USER@HOST: expected e.g. pi@raspberrypi.local, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if identity is not None and not identity.is_file():
            raise FlashError(f"--identity {identity}: no such file (the SSH private key for {text})")
        for opt in options:
            if "=" not in opt:
                raise FlashError(f"--ssh-option {opt!r}: expected KEY=VALUE, e.g. StrictHostKeyChecking=accept-new")
        return cls(user, host, port, identity, tuple(options))

    def _common(self) -> list[str]:
        args = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
        if self.identity is not None:
            args += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        for opt in self.options:
            args += ["-o", opt]
        return args

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}"

    def ssh(self, remote: str) -> list[str]:
        """The argv that runs ``remote`` (one shell command line) on the board."""
        return ["ssh", "-p", str(self.port), *self._common(), self.login, remote]

    def scp(self, sources: list[Path], remote_dir: str) -> list[str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return ["scp", "-q", "-p", "-P", str(self.port), *self._common(), *map(str, sources),
                f"{self.user}@{host}:{remote_dir}/"]


# ----------------------------------------------------------------------------------- options
@dataclass
class FlashOptions:
    """What ``harmony flash`` was asked to do."""

    target: SshTarget
    device_id: str
    broker: str
    """``HOST:PORT`` of the MQTT broker as the board reaches it (the TLS listener when ``tls``)."""
    credentials_dir: Path
    tls: bool = True
    profile: str | None = None
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    client: int | None = None
    local_data_dir: str | None = None
    board_data: str | None = None
    root: PurePosixPath = PurePosixPath("/")
    prefix: PurePosixPath = DEFAULT_PREFIX
    python: str = "python3"
    pip_args: list[str] = field(default_factory=list)
    system_site_packages: bool = False
    site_packages: list[str] = field(default_factory=list)
    """Directories already on the board whose packages the agent's venv should see (a ``.pth``
    file): pip then installs only what they lack. For a torch installed outside the venv."""
    run_as: str | None = None
    service: str = "auto"
    wheel: Path | None = None
    upgrade: bool = False
    dry_run: bool = False
    torch: str | None = None
    """``--torch SPEC``: the torch to install, instead of the one chosen from the board's probe."""
    wheelhouse: Path | None = None
    """``--wheelhouse DIR``: install every wheel from this directory (copied to the board), no index."""

    def check(self) -> None:
        """Clear errors for bad input, before anything is built or touched."""
        if not _DEVICE_ID.match(self.device_id):
            raise FlashError(f"--device-id {self.device_id!r}: use 1-64 of A-Z a-z 0-9 _ -")
        host, sep, port = self.broker.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FlashError(f"--broker {self.broker!r}: expected HOST:PORT as the board reaches the broker, "
                             "e.g. --broker 192.168.1.10:8883")
        if self.service not in ("auto", "systemd", "none"):
            raise FlashError(f"--service {self.service!r}: one of auto, systemd, none")
        if (self.config is None) != (self.client is None):
            raise FlashError("--config and --client go together: the run config whose partition the board's "
                             "data is cut from, and the client index this device serves")
        if self.config is not None and self.board_data is not None:
            raise FlashError("give --config/--client (copy the device's rows) or --board-data DIR (data already "
                             "on the board), not both")
        if self.config is not None and not self.config.is_file():
            raise FlashError(f"--config {self.config}: no such file")
        if self.client is not None and self.client < 0:
            raise FlashError(f"--client {self.client}: a client index is >= 0")
        if self.wheel is not None and not (self.wheel.is_file() and self.wheel.suffix == ".whl"):
            raise FlashError(f"--wheel {self.wheel}: not a .whl file")
        if self.wheelhouse is not None and not any(self.wheelhouse.glob("torch-*.whl")):
            raise FlashError(f"--wheelhouse {self.wheelhouse}: no torch-*.whl there; make one with `python -c "
                             "\"from testbed.wheelhouse import build_wheelhouse; print(build_wheelhouse(machine="
                             "'aarch64', torch_spec='2.9.1'))\"` (docs/flashing.md)")
        if self.torch is not None:
            from testbed.wheelhouse import WheelhouseError, torch_requirement

            try:
                torch_requirement(self.torch)
            except WheelhouseError as err:
                raise FlashError(f"--torch {self.torch!r}: {err}") from None
        if not self.root.is_absolute() or not self.prefix.is_absolute():
            raise FlashError(f"--root {self.root} / --prefix {self.prefix}: absolute paths on the board")
        for path in (str(self.root), str(self.prefix), self.python, *(self.site_packages or ()),
                     *([self.board_data] if self.board_data else [])):
            if not _SAFE_ARG.match(path):
                raise FlashError(f"{path!r}: board paths may hold only A-Z a-z 0-9 _ @ + = : , . / -")
        if self.profile is not None:
            try:
                resolve_class(self.profile)
            except UnknownProfileError as err:
                raise FlashError(f"--profile {self.profile!r}: {err}") from None

    # where things go on the board
    @property
    def home(self) -> PurePosixPath:
        """``PREFIX`` as seen on the board (under ``--root``)."""
        return _under(self.root, self.prefix)

    @property
    def unit_path(self) -> PurePosixPath:
        return _under(self.root, PurePosixPath("/etc/systemd/system") / UNIT_NAME)


def _under(root: PurePosixPath, path: PurePosixPath) -> PurePosixPath:
    return root / path.relative_to("/")


# ----------------------------------------------------------------------------------- the bundle
@dataclass
class Bundle:
    """The staged files (flat, in ``staging``) and their component digests."""

    staging: Path
    wheel: Path
    agent_version: str
    files: dict[str, list[str]]
    """Component → the staged file names it consists of."""
    digests: dict[str, str]
    unit_text: str
    data_dir_on_board: str | None
    notes: list[str] = field(default_factory=list)
    wheelhouse: list[Path] = field(default_factory=list)
    """``--wheelhouse``'s wheels (without this project's), copied to the board with the agent."""
    torch: Any = None
    """The :class:`testbed.board_probe.TorchChoice` (set once the board is probed)."""

    def choose(self, choice: Any) -> None:
        """Set the torch choice; it is part of the agent component (another torch reinstalls)."""
        self.torch = choice
        key = json.dumps([choice.requirement, choice.index_url, choice.system_site_packages,
                          sorted(w.name for w in self.wheelhouse)])
        self.digests["agent"] = hashlib.sha256((zip_digest(self.wheel) + key).encode()).hexdigest()

    def manifest(self, opts: FlashOptions) -> dict[str, Any]:
        return {"device_id": opts.device_id, "agent_version": self.agent_version, "wheel": self.wheel.name,
                "broker": opts.broker, "tls": opts.tls, "profile": opts.profile, "components": self.digests}


def project_root() -> Path:
    """The source tree this ``harmony`` runs from (a wheel is built from it)."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or f'name = "{DISTRIBUTION}"' not in pyproject.read_text():
        raise FlashError(f"no {DISTRIBUTION} source tree at {root} to build the agent wheel from; pass a wheel "
                         "with --wheel FILE (pip wheel --no-deps .)")
    return root


def build_wheel(out_dir: Path, source: Path | None = None) -> Path:
    """A wheel of the project (no dependencies), built from a clean copy of ``source``'s package
    directories, ``pyproject.toml`` and ``README.md`` (so nothing untracked or stale leaks in)."""
    source = source or project_root()
    with tempfile.TemporaryDirectory(prefix="harmony-wheel-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(source / name, tree / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for package in ("harmony", "broker", "edge_agent", "server", "orchestrator", "testbed"):
            shutil.copytree(source / package, tree / package, ignore=ignore)
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
               "-w", str(out_dir), str(tree)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise FlashError(f"building the agent wheel failed ({shlex.join(cmd)}):\n{done.stderr[-2000:]}")
    wheels = sorted(out_dir.glob("harmony_testbed-*.whl"))
    if len(wheels) != 1:
        raise FlashError(f"expected one harmony_testbed wheel in {out_dir}, found {[w.name for w in wheels]}")
    return wheels[0]


def zip_digest(path: Path) -> str:
    """sha256 over a zip's member names and contents (not its timestamps): equal for equal content."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha256(z.read(name)).digest())
    return h.hexdigest()


def wheel_version(path: Path) -> str:
    """The version in a wheel's ``METADATA``."""
    with zipfile.ZipFile(path) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise FlashError(f"{path}: a wheel without .dist-info/METADATA")
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    raise FlashError(f"{path}: no Version in its METADATA")


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0")
        h.update(hashlib.sha256(zip_digest(p).encode() if p.suffix in (".npz", ".whl") else p.read_bytes()).digest())
    return h.hexdigest()


def systemd_quote(arg: str) -> str:
    """One ``ExecStart`` word: plain where safe, else double-quoted; ``%`` doubled (a specifier)."""
    arg = arg.replace("%", "%%")
    return arg if _SAFE_ARG.match(arg) else '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def agent_command(opts: FlashOptions, data_dir: str | None) -> list[str]:
    """The agent's command line on the board (the unit's ``ExecStart``)."""
    home = opts.home
    argv = [str(home / "venv/bin/python"), "-m", "edge_agent", "--broker", opts.broker, "--device-id", opts.device_id,
            "--credentials", str(home / "credentials/password"), "--cache-dir", str(home / "cache")]
    if opts.tls:
        argv += ["--cafile", str(home / "credentials/ca.crt"), "--certfile", str(home / "credentials/client.crt"),
                 "--keyfile", str(home / "credentials/client.key")]
    if data_dir is not None:
        argv += ["--data-dir", data_dir]
    if opts.profile is not None:
        argv += ["--device-class", resolve_class(opts.profile)]
    return argv


def unit_text(opts: FlashOptions, argv: list[str], user: str) -> str:
    """The systemd unit: the agent as ``user``, restarted on failure, after the network is up."""
    return "\n".join([
        "[Unit]",
        f"Description=harmony edge agent (device {opts.device_id})",
        "Wants=network-online.target",
        "After=network-online.target",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"WorkingDirectory={opts.home}",
        "Environment=PYTHONUNBUFFERED=1",
        "ExecStart=" + " ".join(systemd_quote(a) for a in argv),
        "Restart=on-failure",
        "RestartSec=5",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=full",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def unit_exec(text: str) -> tuple[list[str], dict[str, str]]:
    """``(argv, environment)`` of a unit's ``ExecStart=`` and ``Environment=`` lines: the agent
    exactly as systemd would start it (for a board without systemd, and for tests)."""
    argv: list[str] | None = None
    env: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "ExecStart":
            argv = [w.replace("%%", "%") for w in shlex.split(value)]
        elif key == "Environment":
            for item in shlex.split(value):
                k, _, v = item.partition("=")
                env[k] = v
    if argv is None:
        raise FlashError("the unit has no ExecStart= line")
    return argv, env


def build_bundle(opts: FlashOptions, staging: Path, user: str, say: Say) -> Bundle:
    """Stage every file of the bundle in ``staging`` (flat) and compute the component digests."""
    from testbed.credentials import CredentialStore

    files: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    notes: list[str] = []
    # the credentials
    store = CredentialStore(opts.credentials_dir)
    try:
        creds = store.device(opts.device_id)
    except (KeyError, FileNotFoundError, ValueError) as err:  # CredentialError names `harmony fleet add`
        raise FlashError(f"{err} (then let the broker read its new password file and ACL)") from None
    password = staging / "password"
    password.write_text(f"{opts.device_id}:{creds.password}\n")
    password.chmod(0o600)
    files["credentials"].append(password.name)
    if opts.tls:
        wanted = {"ca.crt": creds.ca_file, "client.crt": creds.cert_file, "client.key": creds.key_file}
        missing = [name for name, path in wanted.items() if path is None or not Path(path).is_file()]
        if missing:
            raise FlashError(f"device {opts.device_id!r} has no {', '.join(missing)} in {opts.credentials_dir}: "
                             f"create its certificate with `harmony fleet add {opts.device_id} --dir "
                             f"{opts.credentials_dir}` (TLS on), or flash with --no-tls")
        for name, path in wanted.items():
            assert path is not None
            shutil.copyfile(path, staging / name)
            (staging / name).chmod(0o600 if name.endswith(".key") else 0o644)
            files["credentials"].append(name)
    say(f"credentials: device {opts.device_id} from {opts.credentials_dir}"
        + (" (password, CA certificate, client certificate and key)" if opts.tls else " (password; TLS off)"))
    # the agent
    if opts.wheel is not None:
        wheel = staging / opts.wheel.name
        shutil.copy2(opts.wheel, wheel)
        say(f"agent: using the wheel {opts.wheel}")
    else:
        t0 = time.perf_counter()
        wheel = build_wheel(staging)
        say(f"agent: built {wheel.name} from {project_root()} ({time.perf_counter() - t0:.1f} s)")
    version = wheel_version(wheel)
    files["agent"].append(wheel.name)
    wheelhouse = []
    if opts.wheelhouse is not None:
        wheelhouse = sorted(w for w in opts.wheelhouse.glob("*.whl") if not w.name.startswith("harmony_testbed-"))
        say(f"wheelhouse: {len(wheelhouse)} wheels from {opts.wheelhouse} "
            f"({sum(w.stat().st_size for w in wheelhouse) / 2**20:.0f} MiB), installed with --no-index")
    # the data
    data_dir: str | None = None
    if opts.config is not None:
        assert opts.client is not None
        rows_file = _stage_rows(opts, staging)
        files["data"].append(rows_file.name)
        data_dir = str(opts.home / "data")
        say(f"data: client {opts.client} of {opts.config} only, {rows_file.stat().st_size / 2**20:.1f} MiB "
            f"({rows_file.name})")
    elif opts.board_data is not None:
        data_dir = opts.board_data
        say(f"data: already on the board in {opts.board_data} (nothing copied)")
    else:
        notes.append("no --config/--client or --board-data: the agent looks for the dataset where the run config "
                     "says, else $HARMONY_DATA_DIR, else /usr/share/datasets on the board")
    # the unit (the whole agent config is its ExecStart)
    argv = agent_command(opts, data_dir)
    text = unit_text(opts, argv, user)
    (staging / UNIT_NAME).write_text(text)
    files["unit"].append(UNIT_NAME)
    say(f"unit: {UNIT_NAME} (as {user}, Restart=on-failure): ExecStart={' '.join(systemd_quote(a) for a in argv)}")
    digests = {"agent": zip_digest(wheel)}
    for component in ("credentials", "data", "unit"):
        digests[component] = _digest_files([staging / n for n in files[component]]) if files[component] else ""
    return Bundle(staging, wheel, version, files, digests, text, data_dir, notes, wheelhouse)


def _stage_rows(opts: FlashOptions, staging: Path) -> Path:
    from harmony.config import ConfigError, load_config
    from harmony.data.datasets import cut_client_rows
    from harmony.data.device_rows import device_rows_path, write_device_rows
    from harmony.experiment import Experiment

    assert opts.config is not None and opts.client is not None
    try:
        cfg = load_config(opts.config, opts.overrides)
    except ConfigError as err:
        raise FlashError(f"--config {opts.config}: {err}") from None
    if opts.client >= cfg.fleet.num_clients:
        raise FlashError(f"--client {opts.client}: {opts.config} has fleet.num_clients = {cfg.fleet.num_clients} "
                         f"(clients 0..{cfg.fleet.num_clients - 1})")
    experiment = Experiment.plan(cfg, data_dir=opts.local_data_dir)
    share = experiment.shares[opts.client]
    import numpy as np

    rows = cut_client_rows(cfg.data.dataset, opts.local_data_dir if opts.local_data_dir is not None
                           else cfg.data.data_dir, opts.client, share.device_train_rows(),
                           np.concatenate([share.test.id_pool, share.test.ood_pool]),
                           origin=f"client {opts.client} of {opts.config.name}",
                           share_sha256=hashlib.sha256(share.to_bytes()).hexdigest())
    path = device_rows_path(staging, rows.dataset)
    write_device_rows(path, rows)
    path.chmod(0o600)
    return path


# ----------------------------------------------------------------------------------- the board
@dataclass
class BoardState:
    """What a read-only look at the board found."""

    reachable: bool
    uid: int | None = None
    arch: str = ""
    python: tuple[int, int] | None = None
    systemd: bool = False
    installed: dict[str, Any] | None = None
    agent_active: bool | None = None
    error: str = ""
    facts: Any = None
    """:class:`testbed.board_probe.BoardFacts` (None where the board has no Python)."""


def probe_board(opts: FlashOptions) -> BoardState:
    """Read the board's user id, architecture, Python, systemd and installed ``bundle.json``."""
    from testbed.board_probe import PROBE_SCRIPT

    py = shlex.quote(opts.python)
    probe = base64.b64encode(PROBE_SCRIPT.encode()).decode()
    script = "; ".join([
        'echo "uid=$(id -u)"', 'echo "arch=$(uname -m)"',
        f'if command -v {py} >/dev/null 2>&1; then {py} -c '
        '"import sys; print(\'python=%d.%d\' % sys.version_info[:2])"; '
        f"printf probe=; HARMONY_PROBE_DIR={shlex.quote(str(opts.home))} {py} -c "
        f'"import base64; exec(base64.b64decode(\'{probe}\'))" 2>/dev/null || echo; else echo python=none; fi',
        'if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then echo systemd=yes; '
        f'echo "active=$(systemctl is-active {UNIT_NAME} 2>/dev/null || true)"; else echo systemd=no; fi',
        "echo ---",
        f"cat {shlex.quote(str(opts.home / 'bundle.json'))} 2>/dev/null || true",
    ])
    done = subprocess.run(opts.target.ssh(script), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return BoardState(False, error=(done.stderr.strip() or f"ssh exited with {done.returncode}")[-1000:])
    head, _, tail = done.stdout.partition("---\n")
    facts = dict(line.split("=", 1) for line in head.splitlines() if "=" in line)
    state = BoardState(True, uid=int(facts.get("uid", "-1")), arch=facts.get("arch", ""),
                       systemd=facts.get("systemd") == "yes")
    if facts.get("python", "none") != "none":
        major, minor = facts["python"].split(".")
        state.python = (int(major), int(minor))
    if "active" in facts:
        state.agent_active = facts["active"] == "active"
    if facts.get("probe"):
        from testbed.board_probe import ProbeError, parse_probe

        try:
            state.facts = parse_probe(facts["probe"])
        except ProbeError as err:
            log.warning("%s", err)
    if tail.strip():
        try:
            state.installed = json.loads(tail)
        except json.JSONDecodeError:
            state.installed = {"unreadable": tail[:200]}
    return state


# ----------------------------------------------------------------------------------- the plan
@dataclass
class FlashReport:
    """What a flash did (or, with ``--dry-run``, would do)."""

    changed: list[str]
    """Components replaced on the board (empty: it was up to date)."""
    steps: list[str]
    unit_text: str
    agent_version: str
    service: str
    """``systemd`` (enabled and started) or ``none`` (skipped; see ``start_command``)."""
    start_command: list[str]
    dry_run: bool


def install_script(opts: FlashOptions, bundle: Bundle, incoming: str, changed: list[str], user: str) -> list[str]:
    """The board's install steps, one POSIX shell command each, for the ``changed`` components — all but
    the unit and ``bundle.json``, which :func:`finish_script` installs once the self-check passed."""
    home, q = opts.home, shlex.quote
    h = q(str(home))
    inc = q(incoming)
    lines = ["set -eu", "umask 022",
             f"mkdir -p {h}/credentials {h}/data {h}/cache {h}/wheels {q(str(opts.unit_path.parent))}"]
    if "credentials" in changed:
        for name in bundle.files["credentials"]:
            mode = "600" if name in ("password", "client.key") else "644"
            lines.append(f"install -m {mode} {inc}/{name} {h}/credentials/{name}")
    if "data" in changed:
        lines.append(f"rm -f {h}/data/*.rows.npz")
        for name in bundle.files["data"]:
            lines.append(f"install -m 600 {inc}/{name} {h}/data/{name}")
    if "agent" in changed:
        wheel = f"{h}/wheels/{q(bundle.wheel.name)}"
        pip = f"{h}/venv/bin/python -m pip install --no-input --disable-pip-version-check -q"
        extra = " ".join(q(a) for a in opts.pip_args)
        if bundle.wheelhouse:
            extra = f"--no-index --find-links {h}/wheelhouse {extra}".strip()
            lines.append(f"rm -rf {h}/wheelhouse && mkdir -p {h}/wheelhouse")
            lines.append(f"mv {' '.join(f'{inc}/{q(w.name)}' for w in bundle.wheelhouse)} {h}/wheelhouse/")
        pip = f"{pip} {extra}" if extra else pip
        lines.append(f"find {h}/wheels -name '*.whl' ! -name {q(bundle.wheel.name)} -delete")
        lines.append(f"install -m 644 {inc}/{q(bundle.wheel.name)} {wheel}")
        choice = bundle.torch
        flags = " --system-site-packages" if (opts.system_site_packages or (choice and choice.system_site_packages)) \
            else ""
        venv = f"{q(opts.python)} -m venv{flags} {h}/venv"
        if opts.site_packages:
            site = f'"$({h}/venv/bin/python -c \'import sysconfig; print(sysconfig.get_paths()["purelib"])\')"'
            venv += f" && printf '%s\\n' {' '.join(q(s) for s in opts.site_packages)} > {site}/harmony-base.pth"
        lines.append(f"[ -x {h}/venv/bin/python ] || {venv}")
        # torch first, from where the choice says (its index, or the wheelhouse): the agent extra then
        # finds it satisfied; an existing venv gets the chosen torch even when another one is in range
        if choice is not None and choice.requirement:
            index = "" if bundle.wheelhouse or not choice.index_url else f"--index-url {q(choice.index_url)} "
            lines.append(f"{pip} {index}{q(choice.requirement)}")
        # the project replaced even at an equal version, then its dependencies brought in line (pip
        # installs only what is missing or of another version)
        lines.append(f"{pip} --force-reinstall --no-deps {wheel} && {pip} {wheel}'[agent]'")
        lines.append(f"{h}/venv/bin/python -c 'from importlib import metadata; "
                     f"print(\"installed harmony-testbed\", metadata.version(\"harmony-testbed\"), "
                     f"\"torch\", metadata.version(\"torch\"))'")
    if user != "root":
        lines.append(f"chown -R {q(user)} {h}/credentials {h}/data {h}/cache")
    return lines


def finish_script(opts: FlashOptions, bundle: Bundle, incoming: str, changed: list[str]) -> list[str]:
    """After the self-check passed: the unit (when changed) and ``bundle.json``; the upload removed."""
    q = shlex.quote
    lines = ["set -eu", "umask 022"]
    if "unit" in changed:
        lines.append(f"install -m 644 {q(incoming)}/{UNIT_NAME} {q(str(opts.unit_path))}")
    lines.append(f"install -m 644 {q(incoming)}/bundle.json {q(str(opts.home / 'bundle.json'))}")
    lines.append(f"rm -rf {q(incoming)}")
    return lines


def self_check_command(opts: FlashOptions) -> str:
    """The agent's self-check as the board runs it after installing (``edge_agent.selfcheck``), JSON out."""
    from testbed.footprint import AGENT_FOOTPRINT

    home, q = opts.home, shlex.quote
    argv = [str(home / "venv/bin/python"), "-m", "edge_agent", "--self-check", "--json", "--broker", opts.broker,
            "--device-id", opts.device_id, "--credentials", str(home / "credentials/password")]
    if opts.tls:
        argv += ["--cafile", str(home / "credentials/ca.crt"), "--certfile", str(home / "credentials/client.crt"),
                 "--keyfile", str(home / "credentials/client.key")]
    family, width = "cnn8", 1.0
    if opts.config is not None:
        from harmony.config import ConfigError, load_config

        try:
            cfg = load_config(opts.config, opts.overrides)
            family, width = cfg.model.family, cfg.model.width
        except ConfigError:
            pass
    argv += ["--check-model", family, "--check-width", str(width)]
    if family == "cnn8" and width == 1.0:  # the agent's measured peak is for exactly this model
        argv += ["--min-memory-mib", f"{AGENT_FOOTPRINT.peak_rss_bytes / 2**20:.0f}"]
    return " ".join(q(a) for a in argv)


_FLAG_DEFAULTS: dict[str, Any] = {"tls": True, "root": PurePosixPath("/"), "prefix": DEFAULT_PREFIX,
                                  "python": "python3", "service": "auto"}


def flash_command(opts: FlashOptions, *, upgrade: bool | None = None, torch: str | None = None) -> str:
    """The ``harmony flash`` command line of ``opts`` — every option the user gave — with ``--upgrade``
    and ``--torch`` set as asked: what a message tells the user to run next."""
    t = opts.target
    argv = ["harmony", "flash", t.login, "--device-id", opts.device_id, "--broker", opts.broker]
    if t.port != 22:
        argv += ["--ssh-port", str(t.port)]
    if t.identity is not None:
        argv += ["--identity", str(t.identity)]
    for option in t.options:
        argv += ["--ssh-option", option]
    argv += ["--credentials-dir", str(opts.credentials_dir)]
    if not opts.tls:
        argv.append("--no-tls")
    if opts.profile:
        argv += ["--profile", opts.profile]
    if opts.config is not None:
        argv += ["--config", str(opts.config), "--client", str(opts.client)]
        for item in opts.overrides:
            argv += ["--set", item]
    if opts.local_data_dir:
        argv += ["--data-dir", opts.local_data_dir]
    if opts.board_data:
        argv += ["--board-data", opts.board_data]
    for name, flag in (("root", "--root"), ("prefix", "--prefix"), ("python", "--python"), ("service", "--service")):
        if getattr(opts, name) != _FLAG_DEFAULTS[name]:
            argv += [flag, str(getattr(opts, name))]
    if opts.pip_args:
        argv += ["--pip-args", shlex.join(opts.pip_args)]
    if opts.system_site_packages:
        argv.append("--system-site-packages")
    for site in opts.site_packages:
        argv += ["--site-packages", site]
    if opts.run_as:
        argv += ["--run-as", opts.run_as]
    if opts.wheel is not None:
        argv += ["--wheel", str(opts.wheel)]
    if opts.wheelhouse is not None:
        argv += ["--wheelhouse", str(opts.wheelhouse)]
    torch = torch if torch is not None else opts.torch
    if torch:
        argv += ["--torch", torch]
    if upgrade if upgrade is not None else opts.upgrade:
        argv.append("--upgrade")
    return shlex.join(argv)


def flash(opts: FlashOptions, say: Say | None = None) -> FlashReport:
    """Flash the board ``opts.target`` (see the module docstring). Raises :class:`FlashError`."""
    say = say or (lambda text: log.info("%s", text))
    opts.check()
    steps: list[str] = []
    prefix = "would " if opts.dry_run else ""

    def step(text: str) -> None:
        steps.append(text)
        say(("[dry-run] " if opts.dry_run else "") + text)

    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            raise FlashError(f"`{tool}` is not installed here (Debian: apt-get install openssh-client)")
    user = opts.run_as or opts.target.user
    with tempfile.TemporaryDirectory(prefix="harmony-bundle-") as tmp:
        staging = Path(tmp)
        bundle = build_bundle(opts, staging, user, say)  # first: a missing credential fails before any SSH
        for note in bundle.notes:
            say(f"note: {note}")
        _footprint_warning(opts, say)
        step(f"read the board's state: {shlex.join(opts.target.ssh('…'))}")
        board = probe_board(opts)
        if not board.reachable:
            if not opts.dry_run:
                raise FlashError(f"cannot reach {opts.target.login} port {opts.target.port} over SSH: {board.error}. "
                                 "Check the address, that sshd runs there and that your key is in the board's "
                                 "~/.ssh/authorized_keys (ssh-copy-id), then try again")
            say(f"[dry-run] {opts.target.login} is not reachable ({board.error}); showing the steps for a fresh "
                "board")
        else:
            _check_board(opts, board)
        _choose_torch(opts, board, bundle, say)
        # system paths as a user other than root: through sudo (assumed so for an unreachable board)
        sudo = str(opts.root) == "/" and (board.uid != 0 if board.reachable else opts.target.user != "root")
        s = "sudo -n " if sudo else ""
        installed = board.installed if board.reachable else None
        changed = _changed(opts, bundle, installed)
        service = _service_kind(opts, board)
        argv, _ = unit_exec(bundle.unit_text)
        if not changed:
            if opts.upgrade:
                step(f"--upgrade: nothing changed — {opts.target.login} already runs this exact bundle (agent "
                     f"{bundle.agent_version}, device {opts.device_id}, {bundle.torch.requirement or 'its own torch'})")
            else:
                step(f"board {opts.target.login} already has this bundle (agent {bundle.agent_version}, device "
                     f"{opts.device_id}): nothing to copy or install")
            if service == "systemd" and board.agent_active is False:
                _remote(opts, f"{s}systemctl start {UNIT_NAME}", f"{prefix}start the service (it was not running)",
                        step)
            return FlashReport([], steps, bundle.unit_text, bundle.agent_version, service, argv, opts.dry_run)
        (staging / "bundle.json").write_text(json.dumps(bundle.manifest(opts), indent=1, sort_keys=True) + "\n")
        incoming = str(_under(opts.root, PurePosixPath("/tmp")) / f"harmony-flash-{opts.device_id}-{int(time.time())}")
        script = install_script(opts, bundle, incoming, changed, user)
        finish = finish_script(opts, bundle, incoming, changed)
        (staging / "install.sh").write_text("\n".join(script) + "\n")
        (staging / "finish.sh").write_text("\n".join(finish) + "\n")
        uploads = [staging / n for n in sorted({n for c in changed for n in bundle.files[c]}
                                                | {"bundle.json", "install.sh", "finish.sh"})]
        if "agent" in changed:
            uploads += bundle.wheelhouse
        step(f"{prefix}replace on the board: {', '.join(changed)}")
        _remote(opts, f"mkdir -p -m 700 {shlex.quote(incoming)}", f"{prefix}make the upload directory {incoming}",
                step)
        _run(opts, opts.target.scp(uploads, incoming),
             f"{prefix}copy {len(uploads)} files ({', '.join(p.name for p in uploads[:6])}"
             f"{', …' if len(uploads) > 6 else ''}) to {opts.target.login}:{incoming}", step, timeout=3600)
        for line in script[2:]:
            step(f"{prefix}run on the board: {line}")
        _remote(opts, f"{s}sh {shlex.quote(incoming + '/install.sh')}",
                f"{prefix}run the install script ({len(script)} commands above, as "
                f"{'root via sudo' if sudo else opts.target.user})", step, timeout=3600)
        _self_check(opts, board, bundle, service, s, incoming, step)
        for line in finish[2:]:
            step(f"{prefix}run on the board: {line}")
        _remote(opts, f"{s}sh {shlex.quote(incoming + '/finish.sh')}", f"{prefix}install the unit and bundle.json",
                step)
        if service == "systemd":
            _remote(opts, f"{s}systemctl daemon-reload && {s}systemctl enable {UNIT_NAME} && "
                    f"{s}systemctl restart {UNIT_NAME}", f"{prefix}enable and (re)start {UNIT_NAME}", step)
        else:
            why = (f"--root {opts.root} is not the board's real root" if str(opts.root) != "/" else
                   "the board runs no systemd" if opts.service == "auto" else "--service none")
            step(f"service: skipped ({why}); start the agent as the unit would: {shlex.join(argv)}")
        return FlashReport(changed, steps, bundle.unit_text, bundle.agent_version, service, argv, opts.dry_run)


def _choose_torch(opts: FlashOptions, board: BoardState, bundle: Bundle, say: Say) -> None:
    """Pick the board's torch from its probe (or ``--torch``), say which and why; part of the agent digest."""
    from testbed.board_probe import BoardFacts, TorchChoice, choose_torch

    facts = board.facts
    if facts is None:
        if opts.torch is None and board.reachable:
            raise FlashError(f"{opts.target.login}: the board's probe printed nothing ({opts.python} could not run "
                             "it); name the torch with --torch SPEC")
        facts = BoardFacts(machine=board.arch or "unknown")
    if facts is not None and board.reachable:
        say(f"board: {facts.describe()}")
    if facts.machine not in ("aarch64", "x86_64") and opts.torch is None:
        choice = TorchChoice(None, None, False, "unknown until the board can be probed")
    else:
        try:
            choice = choose_torch(facts, override=opts.torch, wheelhouse=opts.wheelhouse is not None)
        except ValueError as err:
            raise FlashError(str(err)) from None
    if opts.wheelhouse is not None and choice.requirement:
        version = choice.requirement.split("==", 1)[-1].split("+", 1)[0] if "==" in choice.requirement else None
        have = sorted(w.name for w in bundle.wheelhouse if w.name.startswith("torch-"))
        if version and not any(n.startswith(f"torch-{version}") for n in have):
            raise FlashError(f"--wheelhouse {opts.wheelhouse} has {', '.join(have)} but the board needs "
                             f"{choice.requirement} ({choice.reason}); add it to the wheelhouse or name one it has "
                             "with --torch")
    bundle.choose(choice)
    say(choice.describe())


def _self_check(opts: FlashOptions, board: BoardState, bundle: Bundle, service: str, sudo: str, incoming: str,
                step: Say) -> None:
    """Run the agent's self-check on the board; on failure, leave nothing enabled and raise with the next command."""
    from edge_agent.selfcheck import SelfCheckReport
    from testbed.board_probe import ARMV80_TORCH

    command = self_check_command(opts)
    step(f"{'would ' if opts.dry_run else ''}run the agent's self-check on the board: {command}")
    if opts.dry_run:
        return
    done = subprocess.run(opts.target.ssh(f"{sudo}{command}"), capture_output=True, text=True, timeout=7200)
    lines = done.stdout.strip().splitlines()
    try:
        report = SelfCheckReport.from_json(lines[-1])
    except (IndexError, ValueError, TypeError):
        report = None
    if report is not None and report.ok and done.returncode == 0:
        for line in report.message().splitlines():
            step(line.strip())
        return
    # nothing left enabled: no unit, no bundle.json (the next flash installs again), the upload removed
    q = shlex.quote
    cleanup = [f"rm -rf {q(incoming)}", f"rm -f {q(str(opts.home / 'bundle.json'))}"]
    if service == "systemd":
        cleanup.insert(0, f"{{ {sudo}systemctl disable --now {UNIT_NAME} 2>/dev/null || true; }}")
    cleanup.append(f"rm -f {q(str(opts.unit_path))}")
    subprocess.run(opts.target.ssh(f"{sudo}sh -c {q('; '.join(cleanup))}"), capture_output=True, text=True,
                   timeout=300)
    if report is None:
        output = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise FlashError(f"the self-check could not run on {opts.target.login} (exit {done.returncode}):\n{output}\n"
                         "nothing was enabled; the agent's venv stays for the next try")
    if report.failure == "illegal_instruction":
        next_command = flash_command(opts, torch=ARMV80_TORCH)
    elif report.failure == "broker_refused":
        next_command = f"harmony fleet add {opts.device_id} (on the stack), then {flash_command(opts)}"
    else:
        next_command = f"{report.next_step}; then {flash_command(opts)}"
    failed = next((c for c in report.checks if not c.ok), None)
    raise FlashError(
        f"self-check failed on {opts.target.login} ({report.cpu}, torch {report.torch_version or 'not importable'}): "
        f"{failed.name + ': ' + failed.detail if failed else report.failure}\n{report.message()}\n"
        f"nothing was enabled (no unit installed, no service started). Next: {next_command}")


def _check_board(opts: FlashOptions, board: BoardState) -> None:
    if board.arch in UNSUPPORTED_ARCH:
        raise FlashError(f"{opts.target.login} runs {UNSUPPORTED_ARCH[board.arch]} ({board.arch}): torch has no "
                         "wheels for it; install a 64-bit OS (Raspberry Pi OS 64-bit, aarch64) and flash again")
    if board.python is None:
        raise FlashError(f"{opts.target.login} has no {opts.python}: install it (apt-get install python3 "
                         "python3-venv) or name the interpreter with --python")
    if board.python < MIN_PYTHON:
        raise FlashError(f"{opts.target.login}: {opts.python} is {board.python[0]}.{board.python[1]}, the agent needs "
                         f">= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} (Raspberry Pi OS bookworm has 3.11); name another with "
                         "--python")
    if opts.service == "systemd" and not board.systemd:
        raise FlashError(f"--service systemd: {opts.target.login} runs no systemd (no /run/systemd/system); use "
                         "--service none and start the agent yourself")


def _changed(opts: FlashOptions, bundle: Bundle, installed: dict[str, Any] | None) -> list[str]:
    """The components to replace; refuses a different agent without ``--upgrade``."""
    if installed is None:
        return list(COMPONENTS)
    old = installed.get("components") or {}
    changed = [c for c in COMPONENTS if old.get(c) != bundle.digests[c]]
    other_device = installed.get("device_id") not in (None, opts.device_id)
    if ("agent" in changed or other_device) and not opts.upgrade:
        what = (f"device {installed.get('device_id')}" if other_device else
                f"agent {installed.get('agent_version', '?')} ({installed.get('wheel', '?')})")
        raise FlashError(f"{opts.target.login} already runs {what}; this bundle is agent {bundle.agent_version} for "
                         f"device {opts.device_id}: replace it in place with `{flash_command(opts, upgrade=True)}` "
                         "(nothing was changed)")
    if other_device:
        return list(COMPONENTS)
    return changed


def _service_kind(opts: FlashOptions, board: BoardState) -> str:
    if opts.service == "none" or str(opts.root) != "/":
        return "none"
    if opts.service == "systemd":
        return "systemd"
    return "systemd" if (board.systemd or not board.reachable) else "none"


def _footprint_warning(opts: FlashOptions, say: Say) -> None:
    if opts.profile is None:
        return
    from testbed.footprint import footprint_warning

    warning = footprint_warning(resolve_class(opts.profile))
    if warning:
        say(f"warning: {warning}")


def _remote(opts: FlashOptions, command: str, what: str, step: Say, timeout: float = 300) -> None:
    _run(opts, opts.target.ssh(command), what, step, timeout)


def _run(opts: FlashOptions, argv: list[str], what: str, step: Say, timeout: float = 300) -> None:
    step(f"{what}: {shlex.join(argv)}")
    if opts.dry_run:
        return
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-3000:]
        raise FlashError(f"{what} failed on {opts.target.login} (exit {done.returncode}):\n{output}")
    for line in done.stdout.splitlines():
        if line.strip():
            log.info("board: %s", line)
