"""``python -m edge_agent --broker HOST:PORT --device-id ID [--device-id ID2 …] [--credentials FILE]
[--cafile CA.crt [--certfile client.crt --keyfile client.key]] [--data-dir DIR]
[--device-class CLASS [--emulate [--emulate-limits compute,uplink,downlink,latency]]] [--self-check [--json]]``.

``--self-check`` runs the agent's self-check (``edge_agent.selfcheck``: torch and one model step in a
child process, the TLS login to the broker, memory) instead of the agent, prints its verdict (``--json``:
one JSON object) and exits 0 when it passed, 1 when not. This module imports torch only once the agent
starts, so that a torch this CPU cannot run is reported by the self-check rather than killing it.

TLS is on when ``--cafile`` is given: the broker's certificate must be signed by that CA (and name
the host of ``--broker``); ``--certfile``/``--keyfile`` present the device's client certificate
(``harmony fleet add ID`` makes them, docs/security.md). ``--device-class``/``--emulate``:
docs/emulation.md."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from broker.topics import Topics
from edge_agent.emulation import LIMITS, DeviceLimits
from edge_agent.logs import LOG_LEVELS, configure_logging, parse_log_level

if TYPE_CHECKING:
    from broker.client import TlsSettings
    from edge_agent.agent import Credentials


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--broker: expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def read_passwords(path: Path, device_ids: list[str]) -> dict[str, str]:
    """Device id → password from a credentials file of ``device_id:password`` lines (or one bare password
    for every device); ``ValueError`` names a device without one."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    pairs = dict(ln.split(":", 1) for ln in lines if ":" in ln)
    bare = [ln for ln in lines if ":" not in ln]
    out = {}
    for dev in device_ids:
        password = pairs.get(dev, bare[0] if bare else None)
        if password is None:
            raise ValueError(f"--credentials {path}: no password for device {dev!r}")
        out[dev] = password
    return out


def read_credentials(path: Path | None, device_ids: list[str]) -> dict[str, Credentials]:
    """A credentials file holds ``device_id:password`` lines (or one bare password for every device)."""
    from edge_agent.agent import Credentials

    if path is None:
        return {}
    return {dev: Credentials(dev, password) for dev, password in read_passwords(path, device_ids).items()}


def agent_tls(cafile: Path | None, certfile: Path | None, keyfile: Path | None,
              device_ids: list[str] | None = None) -> TlsSettings | None:
    """The agent's TLS settings from its flags (None without ``--cafile``); ``ValueError`` names a
    missing file or a lone ``--certfile``/``--keyfile``. ``{device}`` in ``--certfile``/``--keyfile``
    stands for each hosted device's id (one process emulating several devices, each with its own
    certificate: ``--certfile DIR/devices/{device}/client.crt``)."""
    from broker.client import TlsSettings, tls_settings
    from edge_agent.agent import device_path

    for dev in device_ids or [""]:
        tls_settings(cafile, None if certfile is None else device_path(certfile, dev),
                     None if keyfile is None else device_path(keyfile, dev))
    return None if cafile is None else TlsSettings(cafile, certfile, keyfile)


def _log_level_arg(text: str) -> str:
    try:
        return parse_log_level(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="edge_agent", description="harmony edge agent")
    ap.add_argument("--broker", required=True, help="HOST:PORT of the MQTT broker")
    ap.add_argument("--device-id", action="append", required=True, help="device id (repeat to emulate several)")
    ap.add_argument("--credentials", type=Path, default=None, help="file of device_id:password lines")
    ap.add_argument("--cafile", type=Path, default=None, help="CA certificate of the broker: turns TLS on")
    ap.add_argument("--certfile", type=Path, default=None, help="the device's client certificate (with --cafile)")
    ap.add_argument("--keyfile", type=Path, default=None, help="the client certificate's key (with --certfile)")
    ap.add_argument("--topic-prefix", default="hsfl/v1")
    ap.add_argument("--cache-dir", default=None, help="blob cache directory (default: in memory)")
    ap.add_argument("--data-dir", default=None,
                    help="where the dataset files are on this host (default: the run config's data.data_dir, "
                         "else $HARMONY_DATA_DIR, else /usr/share/datasets)")
    ap.add_argument("--slowdown", type=float, default=1.0,
                    help="emulate devices this many times slower than the host: each compute phase is followed "
                         "by a sleep of (slowdown - 1) x its duration (default 1: host speed)")
    ap.add_argument("--device-class", default=None,
                    help="the harmony/profiles.yaml class these devices are (reported in hello); hyphenated "
                         "spellings work (pi-zero2, jetson-nano)")
    ap.add_argument("--emulate", action="store_true",
                    help="enforce the class's limits in the agent: compute pacing (a step takes at least its "
                         "FLOPs / the class's rate), uplink/downlink token buckets, link latency")
    ap.add_argument("--emulate-limits", default=",".join(LIMITS),
                    help=f"with --emulate: which limits the agent enforces, comma-separated from {', '.join(LIMITS)} "
                         "(default all; `harmony fleet emulate` leaves out what a cgroup or tc enforces)")
    ap.add_argument("--join-cgroup", type=Path, action="append", default=[],
                    help="a cgroup directory this process moves itself into once started (its imports done); "
                         "`harmony fleet emulate` passes the device's CPU-quota cgroup")
    ap.add_argument("--profiles", type=Path, default=None,
                    help="a profiles YAML adding or overriding classes (harmony/profiles.py)")
    ap.add_argument("--corrupt-features", action="store_true",
                    help="fault injection for tests: drop the last channel of every cut-layer feature tensor sent, "
                         "so the server's session fails on the shape")
    ap.add_argument("--log-level", type=_log_level_arg, default="INFO", help=f"one of {', '.join(LOG_LEVELS)}")
    ap.add_argument("--self-check", action="store_true",
                    help="check this board instead of running the agent: torch and one model step (in a child "
                         "process), the TLS login to the broker, memory; exit 0 when it passes")
    ap.add_argument("--json", action="store_true", help="with --self-check: print the result as one JSON object")
    ap.add_argument("--check-model", default="cnn8", help="with --self-check: the model family to step")
    ap.add_argument("--check-width", type=float, default=1.0, help="with --self-check: its width multiplier")
    ap.add_argument("--check-depth", type=int, default=None,
                    help="with --self-check: its split depth (default: the deepest allowed, the largest device model)")
    ap.add_argument("--min-memory-mib", type=float, default=0.0,
                    help="with --self-check: fail unless this much memory is free (the agent's expected peak)")
    args = ap.parse_args(argv)
    configure_logging(args.log_level)
    if args.self_check:
        raise SystemExit(self_check(args, ap))
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to the log
    # SIGINT is the clean stop. A process started in the background of a non-interactive shell (`cmd &`
    # in a script, a CI job, `harmony fleet emulate` started so) inherits SIGINT ignored, and Python
    # then leaves it ignored: the agent could only be killed. Take the default handler back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    host, port = parse_broker(args.broker)
    try:
        tls = agent_tls(args.cafile, args.certfile, args.keyfile, args.device_id)
        device_class, limits = device_limits(args.device_class, args.emulate, args.emulate_limits, args.profiles)
    except (ValueError, OSError) as err:
        ap.error(str(err))
    for cgroup in args.join_cgroup:
        try:
            (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")
        except OSError as err:
            ap.error(f"--join-cgroup {cgroup}: {err}")
    from edge_agent.agent import STOP_DUMP_S, Agent

    Agent(host, port, args.device_id, topics=Topics(args.topic_prefix),
          credentials=read_credentials(args.credentials, args.device_id), tls=tls, cache_dir=args.cache_dir,
          data_dir=args.data_dir, slowdown=args.slowdown, corrupt_features=args.corrupt_features,
          device_class=device_class, limits=limits).run(dump_after_stop_s=STOP_DUMP_S)


def self_check(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """``--self-check``: run :func:`edge_agent.selfcheck.run_self_check` for the first device, print, 0/1."""
    from edge_agent.selfcheck import run_self_check

    device = args.device_id[0]
    try:
        host, port = parse_broker(args.broker)
        password = None if args.credentials is None else read_passwords(args.credentials, [device])[device]
        for flag, path in (("--cafile", args.cafile), ("--certfile", args.certfile), ("--keyfile", args.keyfile)):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")
    except (ValueError, OSError) as err:
        ap.error(str(err))
    report = run_self_check(broker=(host, port), device_id=device, password=password, cafile=args.cafile,
                            certfile=args.certfile, keyfile=args.keyfile, family=args.check_model,
                            width=args.check_width, depth=args.check_depth,
                            min_memory_bytes=int(args.min_memory_mib * 2**20))
    print(report.to_json() if args.json else report.message(), flush=True)
    return 0 if report.ok else 1


def device_limits(device_class: str | None, emulate: bool, enforce: str, profiles: Path | None = None
                  ) -> tuple[str | None, DeviceLimits | None]:
    """``--device-class``/``--emulate``/``--emulate-limits`` as (the yaml class name, the limits the
    agent enforces or None). Raises ``ValueError`` naming the option."""
    from harmony.profiles import UnknownProfileError, load_profiles, resolve_class

    if device_class is None:
        if emulate:
            raise ValueError("--emulate needs --device-class CLASS (the class whose limits to enforce)")
        return None, None
    table = load_profiles(profiles)
    try:
        name = resolve_class(device_class, table)
    except UnknownProfileError as err:
        raise ValueError(f"--device-class: {err}") from None
    if not emulate:
        return name, None
    chosen = frozenset(x.strip() for x in enforce.split(",") if x.strip())
    return name, DeviceLimits(table[name], chosen)


if __name__ == "__main__":
    main()
