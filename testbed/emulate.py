"""An emulated fleet of device classes with their limits enforced (``harmony fleet emulate``).

``--profile CLASS:N`` asks for N devices of a ``harmony/profiles.yaml`` class. Per class this module
decides how each limit is enforced on this host, and says so (:func:`plan_fleet`,
:meth:`ClassPlan.row`):

- **compute**: where root and the cgroup v1 ``cpu`` controller is writable, a CPU quota of the
  class's rate ÷ this host's measured single-thread training rate (:func:`host_training_flops`) on
  a short CFS period (20 ms), *and* pacing in the agent as a floor (``cgroup+pacing``, the
  default there; the quota then has 50 % headroom): a quota only throttles once a period's share
  is spent, so a step shorter than the period that follows a wait for the server runs at host
  speed (``benchmarks/emulation_accuracy.py`` measures it), while the pacing makes a step take
  its FLOPs ÷ the class's rate (a closed loop on the last steps' times) and the quota caps what
  a device can take of the host. The quota is sized from a start-up measurement of the host, so
  the agent raises it whenever it, not the class, holds a step up (a loaded host:
  ``edge_agent.emulation.QuotaGovernor``): it only caps. ``--compute cgroup`` is the quota alone,
  ``--compute pacing`` (the default without root) the pacing alone. A class faster than one host
  core (as measured at start-up) gets the pacing without a quota: it holds the class whenever the
  host is faster than measured, and the device runs at the host's speed otherwise (the table and
  the agent's log say so; with ``--compute cgroup`` it is not emulated at all).
- **uplink/downlink**: ``tc tbf`` in a network namespace of the device's own (a veth pair; tbf on
  the namespace side shapes the uplink, on the host side the downlink) where root and ``ip netns``
  work, else token buckets in the agent. The broker is reached through a TCP relay on the host
  end of the veth pair (``LinkRelay``): a broker bound to 127.0.0.1 is not reachable from a
  namespace, and only addresses of namespaces made here are listened on.
- **latency**: always in the agent (this kernel has no ``netem``).
- **memory**: the cgroup ``memory`` limit (and ``memsw``, so no swap softens it) where available,
  else not enforced. An agent killed by the out-of-memory killer is reported as that device's
  failure (its MQTT last will tells the orchestrator at once; :meth:`EmulatedFleet.failures`).
- **availability**: a class with on/off periods (``availability: {on_s, off_s}``) is power-cycled:
  each of its devices gets a process of its own, SIGKILLed when an off period begins (a board
  losing power: no goodbye, its last will says ``offline``) and started again when the next on
  period begins (a new process: a new ``hello.started_at``, so the round driver assigns it
  again). Periods count from the fleet's start and are checked every poll (about a second).
- **supervision**: an agent that ends on its own (a crash, ``kill -9``, the out-of-memory killer) is
  reported and started again by :meth:`EmulatedFleet.supervise` with the same command — in its
  namespace, joining its cgroups — after a back-off (1 s, doubling to 30 s while it keeps
  ending); a power-cycled device is not started during its class's off period. ``restart=False``
  (``--no-restart``) leaves it dead. ``RUN_DIR/fleet.json`` lists the agents (PIDs, states,
  restarts, namespaces, cgroups) for ``harmony fleet ps``.

Agents run with one torch thread each. An agent process hosts every device of its class when all
of the class's limits are enforced in the agent; a cgroup quota or a namespace is per process, so
then each device gets its own process (a throttled thread would hold the GIL of its neighbours).

Everything created here is named ``hemu-{tag}-…`` (cgroups, namespaces; veths ``hm{tag}{k}{h|n}``)
with a random tag per fleet, so parallel fleets never collide, and :meth:`EmulatedFleet.stop`
removes it all, also after a failed start.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harmony.profiles import DeviceProfile, UnknownProfileError, load_profiles, resolve_class

log = logging.getLogger(__name__)

CGROUP_V1 = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 20_000
MIN_QUOTA_US = 1_000  # the kernel's floor for cpu.cfs_quota_us
REPO_ROOT = Path(__file__).resolve().parent.parent


class EmulationError(ValueError):
    """A bad ``--profile`` or method option, or a host that cannot do what was asked."""


def parse_profile_option(text: str, profiles: Mapping[str, DeviceProfile] | None = None) -> tuple[str, int]:
    """``CLASS:N`` (``N`` devices, default 1) as (the yaml class name, N); hyphenated spellings work."""
    name, sep, count = text.partition(":")
    try:
        cls = resolve_class(name.strip(), profiles)
    except UnknownProfileError as err:
        raise EmulationError(f"--profile {text!r}: {err}") from None
    if not sep:
        return cls, 1
    if not count.strip().isdigit() or int(count) < 1:
        raise EmulationError(f"--profile {text!r}: expected CLASS:N with N a positive integer, e.g. pi4:10")
    return cls, int(count)


# ------------------------------------------------------------------------------------ the host
@dataclass(frozen=True)
class Host:
    """What this host can enforce with, and how fast one of its cores trains."""

    root: bool
    cpu_cgroup: bool
    memory_cgroup: bool
    netns: bool
    training_flops: float  # one thread's sustained training FLOP/s (cnn8), measured

    def describe(self) -> str:
        return (f"root {'yes' if self.root else 'no'}, cgroup cpu {'yes' if self.cpu_cgroup else 'no'}, "
                f"cgroup memory {'yes' if self.memory_cgroup else 'no'}, netns+tc {'yes' if self.netns else 'no'}, "
                f"one core trains at {self.training_flops / 1e9:.1f} GFLOP/s")


def _writable_cgroup(controller: str) -> bool:
    base = CGROUP_V1 / controller
    probe = base / f"hemu-probe-{secrets.token_hex(3)}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        return (probe / ("cpu.cfs_quota_us" if controller == "cpu" else "memory.limit_in_bytes")).exists()
    finally:
        probe.rmdir()


def _netns_works() -> bool:
    if not (shutil.which("ip") and shutil.which("tc")):
        return False
    name = f"hemu-probe-{secrets.token_hex(3)}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


def host_training_flops(repeats: int = 10) -> float:
    """FLOP/s of one thread training cnn8's front (depth 3, batch 16, half width): the yardstick a
    CPU quota is computed against. The best of ``repeats`` steps (a busy host makes some slow)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from harmony.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = build_model("cnn8", 0.5, 10, (1, 28, 28))
            client = net.client_model(3)
            x = torch.randn(16, 1, 28, 28)

            def step() -> None:
                client.zero_grad(set_to_none=True)
                client.exit_head(client.features(x)).square().mean().backward()

            step()  # warm-up
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                best = min(best, time.perf_counter() - t0)
        return flops / best
    finally:
        torch.set_num_threads(threads)


def detect_host(training_flops: float | None = None) -> Host:
    """This host's enforcement means (tried, not assumed) and its training rate."""
    root = os.geteuid() == 0
    return Host(root=root, cpu_cgroup=root and _writable_cgroup("cpu"),
                memory_cgroup=root and _writable_cgroup("memory"), netns=root and _netns_works(),
                training_flops=training_flops if training_flops is not None else host_training_flops())


# ------------------------------------------------------------------------------------ the plan
COMPUTE_METHODS = ("auto", "cgroup+pacing", "cgroup", "pacing")
QUOTA_HEADROOM = 1.5
"""With ``cgroup+pacing`` the quota is this much above the class's rate, so that the pacing floor
decides a step's time and the quota caps what the device may take of the host."""
LINK_METHODS = ("auto", "netns", "agent")


@dataclass(frozen=True)
class ClassPlan:
    """How one class's devices are emulated here."""

    profile: DeviceProfile
    devices: list[str]
    compute: str  # "cgroup+pacing" | "cgroup" | "pacing" | "host"
    link: str  # "netns" | "agent"
    memory: bool  # cgroup memory limit
    cpus: float | None  # the CPU quota per device (compute == "cgroup")
    note: str = ""
    beyond_host: bool = False  # the class is faster than one host core as measured at start-up

    @property
    def per_process(self) -> bool:
        """One device per agent process (a quota, a namespace or a power cycle is per process)."""
        return self.compute.startswith("cgroup") or self.link == "netns" or self.profile.availability is not None

    @property
    def agent_limits(self) -> list[str]:
        """What the agent enforces itself (``--emulate-limits``)."""
        limits = ["latency"]
        if self.compute.endswith("pacing"):
            limits.insert(0, "compute")
        if self.link == "agent":
            limits[-1:-1] = ["uplink", "downlink"]
        return limits

    def row(self) -> dict[str, str]:
        """The printed table's row: what enforces each limit."""
        p = self.profile
        rate = f"{p.compute_flops / 1e9:g} GFLOP/s"
        compute = {"cgroup+pacing": f"cgroup quota {self.cpus or 0:.3f} CPU, raised if it binds + agent pacing "
                                    f"({rate})",
                   "cgroup": f"cgroup quota {self.cpus or 0:.3f} CPU ({rate})",
                   "pacing": f"agent pacing ({rate}{'; beyond one host core' if self.beyond_host else ''})",
                   "host": "not emulated: host speed"}[self.compute]
        link = (f"tc tbf in a netns ({p.uplink_bps / 1e6:g}/{p.downlink / 1e6:g} Mbit/s up/down)"
                if self.link == "netns" else f"agent token bucket ({p.uplink_bps / 1e6:g}/{p.downlink / 1e6:g} "
                "Mbit/s up/down)")
        availability = "always on" if p.availability is None else (
            f"power-cycled: on {p.availability.on_s:g} s, off {p.availability.off_s:g} s")
        return {"class": p.name, "devices": str(len(self.devices)), "compute": compute, "uplink": link,
                "latency": f"in agent ({p.latency_ms:g} ms one-way)",
                "memory": f"cgroup {p.memory_bytes / 2**20:.0f} MiB" if self.memory else "not enforced",
                "availability": availability, "note": self.note}


def plan_fleet(requests: list[tuple[str, int]], host: Host, *, compute: str = "auto", link: str = "auto",
               memory: bool = True, profiles: Mapping[str, DeviceProfile] | None = None,
               id_prefix: str = "") -> list[ClassPlan]:
    """Each requested class's enforcement methods on ``host`` (module docstring). ``compute``/``link``
    force a method (``cgroup``/``pacing``, ``netns``/``agent``); one the host lacks is an error."""
    table = load_profiles() if profiles is None else profiles
    if compute not in COMPUTE_METHODS:
        raise EmulationError(f"--compute {compute!r}: choose from {', '.join(COMPUTE_METHODS)}")
    if link not in LINK_METHODS:
        raise EmulationError(f"--link {link!r}: choose from {', '.join(LINK_METHODS)}")
    if compute.startswith("cgroup") and not host.cpu_cgroup:
        raise EmulationError(f"--compute {compute}: this host has no writable cgroup v1 cpu controller (needs root); "
                             "use --compute pacing")
    if link == "netns" and not host.netns:
        raise EmulationError("--link netns: this host cannot create network namespaces with tc (needs root and "
                             "iproute2); use --link agent")
    if not requests:
        raise EmulationError("no devices: give --profile CLASS:N at least once, e.g. --profile pi4:2")
    seen: dict[str, int] = {}
    plans = []
    for name, count in requests:
        seen[name] = seen.get(name, 0) + count
    for name, count in seen.items():
        p = table[name]
        slug = name.replace("_", "-")
        devices = [f"{id_prefix}{slug}-{k}" for k in range(count)]
        method = compute if compute != "auto" else ("cgroup+pacing" if host.cpu_cgroup else "pacing")
        note = ""
        cpus = None
        if p.compute_flops >= host.training_flops:
            # a quota cannot help (it only slows down); the pacing still holds the class whenever the
            # host turns out faster than this start-up measurement, and costs nothing when it is not
            paced = method.endswith("pacing")
            note = (f"{name} ({p.compute_flops / 1e9:g} GFLOP/s) is faster than one core of this host as measured "
                    f"at start-up ({host.training_flops / 1e9:.1f} GFLOP/s): "
                    + ("paced without a quota; whenever the host is slower it runs at host speed, below its class "
                       "(the agents log `the host is too slow for class`)" if paced
                       else "not emulated (--compute cgroup): it runs at host speed, unthrottled"))
            method = "pacing" if paced else "host"
        elif method.startswith("cgroup"):
            headroom = QUOTA_HEADROOM if method == "cgroup+pacing" else 1.0
            cpus = max(headroom * p.compute_flops / host.training_flops, MIN_QUOTA_US / CFS_PERIOD_US)
        chosen_link = link if link != "auto" else ("netns" if host.netns else "agent")
        plans.append(ClassPlan(p, devices, method, chosen_link, memory and host.memory_cgroup, cpus, note,
                               beyond_host=p.compute_flops >= host.training_flops))
    return plans


# ------------------------------------------------------------------------------------ the relay
class LinkRelay:
    """TCP relay from ``listen`` (the host end of a namespace's veth) to the broker at ``target``."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(listen, reuse_port=False)
        self.server.settimeout(0.5)
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name=f"relay-{listen[0]}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError as err:
                log.warning("relay: cannot reach the broker at %s:%d: %s", *self.target, err)
                conn.close()
                continue
            for s in (conn, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
            self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        for s in self._conns:
            try:
                s.close()
            except OSError:
                pass
        self.thread.join(timeout=2)


# ------------------------------------------------------------------------------------ the fleet
def _run(argv: list[str]) -> None:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.strip() or out.stdout.strip()}")


def tbf_burst_bytes(rate_bps: float) -> int:
    """A tbf bucket small next to the 256 KiB link probe (≤ 2 % of it), yet above a jumbo segment."""
    return max(4096, min(int(rate_bps / 8 / 1000), 5000))


RESTART_DELAYS_S = (1.0, 30.0)
"""Back-off of the supervisor (``fleet emulate`` without ``--no-restart``): an agent that ended on its
own is started again after the first delay, doubled after every end up to the second."""
STABLE_S = 60.0
"""An agent that ran this long before it ended is restarted after the shortest delay again."""
STATE_FILE = "fleet.json"
"""What ``fleet emulate`` runs, in its run directory, for ``harmony fleet ps``."""


@dataclass
class _Process:
    name: str
    devices: list[str]
    plan: ClassPlan
    proc: subprocess.Popen[bytes]
    log: Path
    memory_cgroup: Path | None
    reported: bool = False  # ended, and it will not be started again (failed without a supervisor, or stopped)
    start: Callable[[], subprocess.Popen[bytes]] | None = None  # starts it again (a power cycle, a restart)
    powered_off: bool = False
    power_cycles: int = 0
    netns: str | None = None
    cgroups: list[Path] = field(default_factory=list)
    started: float = 0.0  # monotonic time of this process's start
    exit_seen: bool = False  # this process's end is counted (a failure recorded)
    restart_at: float | None = None  # monotonic time the supervisor starts it again
    restarts: int = 0
    delay_s: float = RESTART_DELAYS_S[0]

    @property
    def state(self) -> str:
        if self.powered_off:
            return "off"
        if self.proc.poll() is None:
            return "running"
        return "restarting" if self.restart_at is not None else "ended"


@dataclass
class Failure:
    """An agent process that ended on its own."""

    devices: list[str]
    device_class: str
    reason: str


@dataclass
class EmulatedFleet:
    """Starts the planned agents against the broker at ``broker`` and removes all it made on :meth:`stop`."""

    plans: list[ClassPlan]
    broker: tuple[str, int]
    run_dir: Path
    credentials: Path | None = None  # device_id:password lines (a broker with --auth)
    extra_agent_args: list[str] = field(default_factory=list)
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    _procs: list[_Process] = field(default_factory=list)
    _cgroups: list[Path] = field(default_factory=list)
    _netns: list[str] = field(default_factory=list)
    _veths: list[str] = field(default_factory=list)
    _relays: list[LinkRelay] = field(default_factory=list)
    _inner_relays: list[subprocess.Popen[str]] = field(default_factory=list)
    _failures: list[Failure] = field(default_factory=list)
    _started: float = 0.0
    restart: bool = True
    """Start an agent that ended on its own again, with back-off (:meth:`supervise`); ``--no-restart``: leave it."""

    @property
    def devices(self) -> list[str]:
        return [d for p in self.plans for d in p.devices]

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic()
        try:
            k = 0
            for plan in self.plans:
                groups = [[d] for d in plan.devices] if plan.per_process else [plan.devices]
                for devices in groups:
                    self._start_agent(plan, devices, k)
                    k += 1
        except BaseException:
            self.stop()
            raise
        self.write_state()

    # -- pieces ------------------------------------------------------------------------------
    def _cgroup(self, controller: str, name: str) -> Path:
        path = CGROUP_V1 / controller / f"hemu-{self.tag}-{name}"
        path.mkdir()
        self._cgroups.append(path)
        return path

    def _namespace(self, k: int, plan: ClassPlan) -> tuple[str, str]:
        """A namespace with a shaped veth to the host; returns (namespace, host-side address)."""
        ns = f"hemu-{self.tag}-{k}"
        host_if, ns_if = f"hm{self.tag}{k}h", f"hm{self.tag}{k}n"
        octet = int(self.tag, 16) % 200 + 20
        a, b = divmod(4 * k, 256)
        host_ip, ns_ip = f"10.{octet}.{a}.{b + 1}", f"10.{octet}.{a}.{b + 2}"
        _run(["ip", "netns", "add", ns])
        self._netns.append(ns)
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if])
        self._veths.append(host_if)
        _run(["ip", "link", "set", ns_if, "netns", ns])
        _run(["ip", "addr", "add", f"{host_ip}/30", "dev", host_if])
        _run(["ip", "link", "set", host_if, "up"])
        inside = ["ip", "netns", "exec", ns]
        _run([*inside, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if])
        _run([*inside, "ip", "link", "set", ns_if, "up"])
        _run([*inside, "ip", "link", "set", "lo", "up"])
        p = plan.profile
        # uplink: the namespace's egress; downlink: the host end's egress toward the namespace
        _run([*inside, "tc", "qdisc", "add", "dev", ns_if, "root", "tbf", "rate", f"{int(p.uplink_bps)}bit",
              "burst", str(tbf_burst_bytes(p.uplink_bps)), "latency", "500ms"])
        _run(["tc", "qdisc", "add", "dev", host_if, "root", "tbf", "rate", f"{int(p.downlink)}bit",
              "burst", str(tbf_burst_bytes(p.downlink)), "latency", "500ms"])
        return ns, host_ip

    def _relay_process(self, prefix: list[str], listen: str, target: str, ns: str) -> None:
        """Start ``python -m testbed.emulate relay LISTEN TARGET`` (under ``prefix``: in namespace ``ns``);
        return once it listens."""
        relay = subprocess.Popen([*prefix, sys.executable, "-m", "testbed.emulate", "relay", listen, target],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                 start_new_session=True, env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}"
                                                              f"{os.environ.get('PYTHONPATH', '')}"})
        self._inner_relays.append(relay)
        assert relay.stdout is not None
        ready = relay.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"the relay {listen} → {target} for namespace {ns} did not start: {ready}"
                               f"{relay.stdout.read()[-2000:]}")

    def _start_agent(self, plan: ClassPlan, devices: list[str], k: int) -> None:
        name = f"agent-{k}-{plan.profile.name}"
        host, port = self.broker
        prefix: list[str] = []
        ns = None
        if plan.link == "netns":
            ns, host_ip = self._namespace(k, plan)
            # a process of its own (not a thread of this one, whose GIL a busy host would make it wait for)
            self._relay_process([], f"{host_ip}:{port}", f"{self.broker[0]}:{port}", ns)
            # nsenter, not `ip netns exec`: that remounts /sys, and the agent could no longer read its cgroup limits
            prefix = ["nsenter", f"--net=/run/netns/{ns}"]
            host = host_ip
        if plan.link == "netns" and "--cafile" in self.extra_agent_args:
            # over TLS, a second relay on the namespace's own 127.0.0.1: the agent connects to an
            # address the broker's certificate names (TLS checks it), its bytes cross the shaped veth.
            # (Only then: the extra hop costs the 100 Mbit/s classes ~15 % of their probed uplink.)
            self._relay_process(prefix, f"127.0.0.1:{port}", f"{host_ip}:{port}", ns)
            host = "127.0.0.1"
        argv = [*prefix, sys.executable, "-m", "edge_agent", "--broker", f"{host}:{port}",
                "--device-class", plan.profile.name, "--emulate", "--emulate-limits", ",".join(plan.agent_limits)]
        for d in devices:
            argv += ["--device-id", d]
        if self.credentials is not None:
            argv += ["--credentials", str(self.credentials)]
        cpu_cg = mem_cg = None
        if plan.compute.startswith("cgroup"):
            assert plan.cpus is not None
            cpu_cg = self._cgroup("cpu", f"{k}")
            (cpu_cg / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (cpu_cg / "cpu.cfs_quota_us").write_text(str(max(MIN_QUOTA_US, round(plan.cpus * CFS_PERIOD_US))))
            # the agent joins it once its imports are done: a fleet of 0.06-CPU devices would take a
            # minute just to import torch, which is no part of what is emulated
            argv += ["--join-cgroup", str(cpu_cg)]
        argv += self.extra_agent_args
        if plan.memory:
            mem_cg = self._cgroup("memory", f"{k}")
            limit = str(plan.profile.memory_bytes * len(devices))
            (mem_cg / "memory.limit_in_bytes").write_text(limit)
            if (mem_cg / "memory.memsw.limit_in_bytes").exists():
                (mem_cg / "memory.memsw.limit_in_bytes").write_text(limit)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        log_path = self.run_dir / f"{name}.log"
        groups = [g for g in (mem_cg,) if g is not None]

        def join_cgroups() -> None:  # in the child, before exec: the agent starts inside its limits
            for g in groups:
                (g / "cgroup.procs").write_text(str(os.getpid()))

        def launch() -> subprocess.Popen[bytes]:
            with open(log_path, "ab") as handle:
                return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, cwd=self.run_dir, start_new_session=True, preexec_fn=join_cgroups)

        proc = launch()
        self._procs.append(_Process(name, devices, plan, proc, log_path, mem_cg, start=launch, netns=ns,
                                    cgroups=[g for g in (cpu_cg, mem_cg) if g is not None], started=time.monotonic()))
        log.info("%s: %s (pid %d)", name, " ".join(argv), proc.pid)

    # -- availability ------------------------------------------------------------------------
    def power_cycle(self, now: float | None = None) -> list[tuple[str, str]]:
        """Switch power-cycled devices off or on as their class's periods say at ``now``
        (monotonic; default: now). Returns ``(device, "off" | "on")`` for each switch made."""
        elapsed = (time.monotonic() if now is None else now) - self._started
        switched = []
        for p in self._procs:
            availability = p.plan.profile.availability
            if availability is None or p.reported:
                continue
            on = availability.is_on(elapsed)
            if not on and not p.powered_off:
                if p.proc.poll() is None:
                    os.kill(p.proc.pid, signal.SIGKILL)  # power lost: no goodbye, the last will fires
                    p.proc.wait(10)
                    p.exit_seen = True  # switched off, not failed
                p.powered_off = True
                p.restart_at = None  # a crashed device waiting for its restart comes back at the next on period
                switched += [(d, "off") for d in p.devices]
            elif on and p.powered_off:
                self._launch(p)
                p.powered_off = False
                p.power_cycles += 1
                switched += [(d, "on") for d in p.devices]
        for device, state in switched:
            log.info("device %s: power %s (availability of its class)", device, state)
        if switched:
            self.write_state()
        return switched

    def _launch(self, p: _Process) -> None:
        assert p.start is not None
        p.proc = p.start()
        p.started = time.monotonic()
        p.exit_seen = False
        p.restart_at = None

    def supervise(self, now: float | None = None) -> list[tuple[list[str], int]]:
        """Start again, inside their namespace and cgroups (the same command: ``nsenter`` into the
        namespace, ``--join-cgroup``, the memory cgroup joined before ``exec``), the agents that
        ended on their own once their back-off has passed; a device of a power-cycled class during
        its off period is left for its next on period instead. Returns ``(devices, new pid)`` per
        restart. Without :attr:`restart` nothing is restarted (the ends are failures only)."""
        self.failures()
        now = time.monotonic() if now is None else now
        restarted = []
        for p in self._procs:
            if p.restart_at is None or now < p.restart_at:
                continue
            availability = p.plan.profile.availability
            if availability is not None and not availability.is_on(now - self._started):
                p.restart_at, p.powered_off = None, True  # its class is off now: the power cycle brings it back
                continue
            self._launch(p)
            p.restarts += 1
            restarted.append((p.devices, p.proc.pid))
            log.info("devices %s (%s): started again (restart %d, pid %d)%s", ", ".join(p.devices),
                        p.plan.profile.name, p.restarts, p.proc.pid, f" in namespace {p.netns}" if p.netns else "")
        if restarted:
            self.write_state()
        return restarted

    def processes(self) -> list[dict[str, object]]:
        """Each agent process: its devices, class, pid, state, restarts, namespace, cgroups and log."""
        return [{"agent": p.name, "devices": p.devices, "class": p.plan.profile.name, "pid": p.proc.pid,
                 "state": p.state, "restarts": p.restarts, "power_cycles": p.power_cycles, "netns": p.netns,
                 "cgroups": [str(g) for g in p.cgroups], "log": str(p.log)} for p in self._procs]

    def write_state(self) -> None:
        """``RUN_DIR/fleet.json``: this fleet (its tag, broker, this process's pid) and :meth:`processes`,
        replaced atomically; what ``harmony fleet ps`` reads."""
        import json

        doc = {"tag": self.tag, "supervisor_pid": os.getpid(), "broker": f"{self.broker[0]}:{self.broker[1]}",
               "restart": self.restart, "updated": time.time(), "agents": self.processes()}
        tmp = self.run_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.run_dir / STATE_FILE)

    # -- watching ----------------------------------------------------------------------------
    def failures(self) -> list[Failure]:
        """Agent processes that ended since the start, each once, with why (an out-of-memory kill
        is named as such: its devices are gone, and their last will told the orchestrator)."""
        ended = False
        for p in self._procs:
            if p.reported or p.exit_seen or p.powered_off or p.proc.poll() is None:
                continue
            p.exit_seen = ended = True
            if self.restart:  # the supervisor starts it again after its back-off
                ran = time.monotonic() - p.started
                p.delay_s = RESTART_DELAYS_S[0] if ran >= STABLE_S or p.restarts == 0 else min(
                    RESTART_DELAYS_S[1], 2 * p.delay_s)
                p.restart_at = time.monotonic() + p.delay_s
            else:
                p.reported = True
            code = p.proc.returncode
            reason = f"exited with code {code}; see {p.log}"
            if p.memory_cgroup is not None and _oom_kills(p.memory_cgroup) > 0:
                reason = (f"killed by the out-of-memory killer at its cgroup limit of "
                          f"{p.plan.profile.memory_bytes * len(p.devices) / 2**20:.0f} MiB ({p.plan.profile.name})")
            elif code == -signal.SIGKILL:
                reason = f"killed (SIGKILL); see {p.log}"
            if p.restart_at is not None:
                reason += f"; starting it again in {p.delay_s:g} s"
            self._failures.append(Failure(p.devices, p.plan.profile.name, reason))
            # info: the caller reports it (``fleet emulate`` prints it once, from ``run_fleet``'s callback)
            log.info("devices %s (%s): %s", ", ".join(p.devices), p.plan.profile.name, reason)
        if ended and self._procs and self.run_dir.is_dir():
            self.write_state()
        return list(self._failures)

    def alive(self) -> int:
        """Agent processes running, switched off for now (a power-cycled device comes back) or waiting
        for their restart."""
        return sum(p.powered_off or p.restart_at is not None or p.proc.poll() is None for p in self._procs)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every agent (SIGINT, then SIGKILL), then remove relays, veths, namespaces and cgroups."""
        self.failures()  # what ended on its own before the stop
        for p in self._procs:
            p.restart_at = None
            if p.proc.poll() is None:
                p.reported = True  # stopped here: not a failure
                os.kill(p.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        for p in self._procs:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(p.proc.pid, signal.SIGKILL)
                p.proc.wait(5)
        for inner in self._inner_relays:
            if inner.poll() is None:
                inner.terminate()
            try:
                inner.wait(5)
            except subprocess.TimeoutExpired:
                inner.kill()
                inner.wait(5)
        self._inner_relays.clear()
        for relay in self._relays:
            relay.close()
        self._relays.clear()
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        self._veths.clear()
        for ns in self._netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._netns.clear()
        for cg in reversed(self._cgroups):
            for _ in range(50):  # a cgroup is removable once its last task has gone
                try:
                    cg.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                log.warning("could not remove cgroup %s", cg)
        self._cgroups.clear()
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)


def _oom_kills(cgroup: Path) -> int:
    try:
        for line in (cgroup / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except OSError:
        pass
    return 0


def leftovers(tag: str) -> list[str]:
    """Cgroups, namespaces and veths of fleet ``tag`` still present (for tests; empty after ``stop``)."""
    found = [str(p) for c in ("cpu", "memory") for p in (CGROUP_V1 / c).glob(f"hemu-{tag}-*")]
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [line.split()[0] for line in ns.splitlines() if line.startswith(f"hemu-{tag}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [w.split("@")[0] for w in links.split() if w.startswith(f"hm{tag}")]
    return found


def oversubscription(plans: list[ClassPlan], cores: int) -> str | None:
    """A warning when the devices, all computing at once, need more CPU than the host has."""
    need = 0.0
    for plan in plans:
        per_device = plan.cpus if plan.cpus is not None else (  # pacing: the host's time of the paced work
            1.0 if plan.beyond_host else 0.0)
        need += per_device * len(plan.devices)
    if need > cores:
        return (f"the CPU quotas add up to {need:.2f} CPUs on a {cores}-core host: devices computing at the same "
                "time get less than their class's rate")
    return None


def run_fleet(fleet: EmulatedFleet, *, duration_s: float | None = None, poll_s: float = 1.0,
              on_failure: Callable[[Failure], None] | None = None,
              on_start: Callable[[EmulatedFleet], None] | None = None,
              on_restart: Callable[[list[str], int], None] | None = None) -> list[Failure]:
    """Start ``fleet`` (then ``on_start``) and supervise it until ``duration_s`` passed, every agent
    ended for good, or SIGINT/SIGTERM; then stop it (removing what it made). Agents that end on their
    own are started again with back-off (:meth:`EmulatedFleet.supervise`; ``on_restart(devices, pid)``)
    unless ``fleet.restart`` is off. Returns the failures seen."""
    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    # an inherited "SIGINT ignored" (started in the background of a script) would make SIGINT a no-op
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    seen = 0
    try:
        fleet.start()
        if on_start is not None:
            on_start(fleet)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while deadline is None or time.monotonic() < deadline:
            time.sleep(poll_s)
            failures = fleet.failures()  # first: a device that crashed just before its off period is a failure
            fleet.power_cycle()
            for failure in failures[seen:]:
                if on_failure is not None:
                    on_failure(failure)
            seen = len(failures)
            for devices, pid in fleet.supervise():
                if on_restart is not None:
                    on_restart(devices, pid)
            if fleet.alive() == 0:
                break
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return fleet.failures()


def stack_login(info: object, devices: list[str], run_dir: Path) -> tuple[Path | None, list[str]]:
    """For a stack started with ``--auth``/``--tls`` (``info`` a ``testbed.stack.StackInfo``): register
    ``devices`` in its credential store (kept if they exist), make the broker reload its password
    file and ACL, and return the agents' credentials file (``device_id:password`` lines, 0600) and
    TLS flags (interfaces: ``--cafile``, ``--certfile``/``--keyfile`` per device); (None, []) when
    the stack has no authentication."""
    store_dir = getattr(info, "store", None)
    if store_dir is None:
        return None, []
    from testbed.credentials import CredentialStore

    tls = bool(getattr(info, "tls", False))
    store = CredentialStore(Path(store_dir))
    passwords = {d: store.add_device(d, tls=tls).password for d in devices}
    store.write_broker_files()
    pids = getattr(info, "pids", {})
    if "mosquitto" in pids:
        os.kill(pids["mosquitto"], signal.SIGHUP)  # mosquitto reloads its password file and ACL
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "credentials.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("".join(f"{d}:{p}\n" for d, p in passwords.items()))
    args: list[str] = []
    if tls:
        args = ["--cafile", str(store.ca_file), "--certfile", str(store.root / "devices/{device}/client.crt"),
                "--keyfile", str(store.root / "devices/{device}/client.key")]
    return path, args


def register_devices(stack_dir: Path, devices: list[str], *, add: bool = True) -> None:
    """Add (or remove) ``devices`` to the stack's ``stack.json`` device list, so that ``harmony run
    --stack`` counts the emulated devices as the stack's."""
    import json
    from dataclasses import asdict

    from testbed.stack import STACK_FILE, load_stack

    info = load_stack(stack_dir)
    info.devices = [d for d in info.devices if d not in devices] + (list(devices) if add else [])
    (Path(stack_dir) / STACK_FILE).write_text(json.dumps(asdict(info), indent=2))


def _relay_main(listen: str, target: str) -> None:
    """``python -m testbed.emulate relay HOST:PORT HOST:PORT``: the relay inside a namespace."""
    def address(text: str) -> tuple[str, int]:
        host, _, port = text.rpartition(":")
        return host, int(port)

    relay = LinkRelay(address(listen), address(target))
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: relay.close())
    try:
        relay.thread.join()
    except KeyboardInterrupt:
        relay.close()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "relay":
        _relay_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m testbed.emulate relay LISTEN_HOST:PORT TARGET_HOST:PORT")
