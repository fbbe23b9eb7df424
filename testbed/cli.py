"""The ``harmony`` command line: ``run`` one experiment, ``compare`` algorithms over seeds."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edge_agent.logs import LOG_LEVELS, parse_log_level
from harmony.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="harmony-testbed: hybrid split federated learning on mixed edge hardware.")
console = Console(stderr=True)
out_console = Console()

ConfigArg = Annotated[Path, typer.Argument(help="experiment config (YAML)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config key: KEY=VALUE (repeatable)")]


class RoundProgress:
    """A rich progress bar over the sessions of every round, showing loss and accuracy; one bar
    per run when a sweep's events carry ``run`` (``harmony compare --jobs`` runs several at once)."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), console=console, transient=False,
        )
        self.tasks: dict[Any, Any] = {}

    def __enter__(self) -> RoundProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, event: str, **f: Any) -> None:
        key = f.get("run")
        label = f"{key} " if key else ""
        task = self.tasks.get(key)
        if event == "run_start":
            self.tasks.pop(key, None)
        elif event == "run_done" and task is not None:
            self.bar.update(task, description=f"{label}done")
        elif event == "run_failed":
            console.print(f"[red]{key} failed:[/red] {f['error']}")
        elif event == "round_start":
            if task is None:
                task = self.tasks[key] = self.bar.add_task(label, total=0, metrics="")
            # sessions: those counted so far, this try's, and as many for each round still to come
            # (a retry or a round with fewer devices changes the total, never below what was counted)
            counted = next(t.completed for t in self.bar.tasks if t.id == task)
            self.bar.update(task, total=counted + f["sessions"] * (1 + f["rounds"] - f["round"]),
                            description=f"{label}round {f['round']}/{f['rounds']}"
                                        + (f" try {f['attempt'] + 1}" if f.get("attempt") else ""))
        elif event in ("session_done", "session_late", "session_dropped") and task is not None:
            self.bar.advance(task)
        # round_retry: the engine's warning says it (once, through logging)
        elif event == "round_end" and task is not None:
            r = f["record"]
            left_out = len(r.stragglers) + len(r.dropouts)
            self.bar.update(task, metrics=(
                f"loss {r.train_loss_exit:.3f}/{r.train_loss_server:.3f} "
                f"acc {100 * r.train_acc_exit:.1f}/{100 * r.train_acc_server:.1f}% (exit/server)"
                + (f", {left_out} left out" if left_out else "")))
        elif event == "evaluate_start" and task is not None:
            self.bar.update(task, description=f"{label}evaluating")


def _load(config: Path, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None


def _broker_address(broker: str) -> tuple[str, int]:
    """``--broker HOST:PORT`` as (host, port); an empty host is loopback."""
    host, sep, port = broker.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--broker {broker!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    return host or "127.0.0.1", int(port)


def _broker_login(username: str | None, password: str | None, credentials: Path | None
                  ) -> tuple[str | None, str | None]:
    """(user, password) from ``--username``/``--password`` or ``--credentials FILE`` (``user:password``)."""
    from broker.client import read_login

    if credentials is not None:
        if username is not None or password is not None:
            raise ValueError("give --credentials FILE or --username/--password, not both")
        if not credentials.is_file():
            raise ValueError(f"--credentials {credentials}: no such file")
        return read_login(credentials)
    if password is not None and username is None:
        raise ValueError("--password needs --username")
    return username, password


def _redis_with_password(url: str) -> str:
    """``redis://USER@host…`` (a user, no password) gets its password from ``HARMONY_REDIS_PASSWORD``, so
    that the password need not be on the command line (docker/compose.yaml's driver)."""
    import os

    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    password = os.environ.get("HARMONY_REDIS_PASSWORD")
    if sep and at and ":" not in userinfo and password:
        return f"{scheme}://{userinfo}:{password}@{host}"
    return url


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2) from None


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("runs/latest"),
    resume: Annotated[bool, typer.Option("--resume", help="continue from the checkpoint in --out")] = False,
    runtime: Annotated[str, typer.Option("--runtime", help="local (in-process) or distributed (MQTT, Celery, "
                                          "Redis)")] = "local",
    stack_dir: Annotated[Path, typer.Option("--stack", help="run directory of a `harmony up` stack (distributed; "
                                            "started and stopped for this run if none runs there)")] = Path(
        "runs/stack"),
    broker: Annotated[str | None, typer.Option("--broker", help="distributed over an existing fleet: MQTT "
                                               "HOST:PORT (with --redis; instead of --stack)")] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL of that fleet's Celery workers, "
                                              "e.g. redis://host:6379/0, redis://harmony:PASSWORD@host:6379/0 "
                                              "(redis://harmony@host…: the password from "
                                              "$HARMONY_REDIS_PASSWORD)")] = None,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix", help="MQTT topic prefix of the fleet")] = "hsfl/v1",
    username: Annotated[str | None, typer.Option("--username", help="broker user name (with --broker)")] = None,
    password: Annotated[str | None, typer.Option("--password", envvar="HARMONY_MQTT_PASSWORD", show_envvar=True,
                                                 help="broker password (with --broker; prefer the environment "
                                                 "variable or --credentials)")] = None,
    credentials: Annotated[Path | None, typer.Option("--credentials", help="file with the broker login as "
                                                     "user:password (with --broker)")] = None,
    cafile: Annotated[Path | None, typer.Option("--cafile", help="CA of the broker's certificate: TLS on "
                                                "(with --broker)")] = None,
    certfile: Annotated[Path | None, typer.Option("--certfile", help="client certificate the broker asks for "
                                                  "(its service listener: DIR/services/orchestrator.crt)")] = None,
    keyfile: Annotated[Path | None, typer.Option("--keyfile", help="the client certificate's key")] = None,
    devices_timeout: Annotated[float, typer.Option("--devices-timeout", min=1, help="seconds to wait for "
                                                   "fleet.num_clients devices to register")] = 120.0,
    round_timeout: Annotated[float, typer.Option("--round-timeout", min=1, help="deadline of one round, "
                                                 "seconds")] = 900.0,
) -> None:
    """Run one experiment; writes OUT/results.json, rounds.csv, evaluation.csv, checkpoint.pt."""
    from harmony.engine import LocalEngine

    if runtime not in ("local", "distributed"):
        _fail(ValueError(f"--runtime {runtime!r}: expected local or distributed"))
    fleet = None
    if broker is not None or redis is not None:
        if runtime != "distributed":
            _fail(ValueError("--broker/--redis drive a distributed run; add --runtime distributed"))
        if broker is None or redis is None:
            _fail(ValueError("--broker and --redis go together: the MQTT broker and the Redis of the same fleet"))
        try:
            mqtt = _broker_address(broker)
            login = _broker_login(username, password, credentials)
            from broker.client import tls_settings

            tls = tls_settings(cafile, certfile, keyfile)
        except ValueError as err:
            _fail(err)
        fleet = {"mqtt": mqtt, "redis_url": _redis_with_password(redis), "topic_prefix": topic_prefix,
                 "login": login, "tls": tls,
                 "devices_timeout_s": devices_timeout, "round_timeout_s": round_timeout}
    elif any(v is not None for v in (username, password, credentials, cafile, certfile, keyfile)):
        _fail(ValueError("--username/--password/--credentials/--cafile/--certfile/--keyfile go with --broker "
                         "(a `harmony up` stack's own credentials are found in --stack)"))
    cfg = _load(config, set_)
    from testbed.monitor.runlog import RunEventLog

    try:
        with RoundProgress() as bar:
            events = RunEventLog(out, bar, resume=resume)  # OUT/events.jsonl, for `harmony monitor --run-dir`
            try:
                if runtime == "local":
                    engine = LocalEngine(cfg, out, events)
                    events.begin(engine, resume)
                    results = engine.run(resume=resume)
                else:
                    results = _run_distributed(cfg, out, events, stack_dir, resume, fleet,
                                               (devices_timeout, round_timeout))
            except BaseException as err:
                events.end("failed", f"{type(err).__name__}: {err}")
                raise
            events.end("done")
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        _fail(err)
    ev = results["evaluation"]
    table = Table(title=f"{results['algorithm']} on {cfg.data.dataset} (seed {cfg.seed})")
    table.add_column("metric")
    for rho in ev["rho"]:
        table.add_column(f"ρ={rho:g}", justify="right")
    headline = ev.get("tau_policy", "oracle")
    table.add_row(f"accuracy % ({headline} τ)", *(f"{a:.2f}" for a in ev["accuracy"]))
    table.add_row(f"accuracy % (τ={ev['fixed_tau']:g})", *(f"{a:.2f}" for a in ev["accuracy_fixed_tau"]))
    table.add_row("offload probability", *(f"{p:.3f}" for p in ev["offload_probability"]))
    for name, policy in ev.get("policies", {}).items():  # the thresholds a device chose itself (design §14)
        if name not in (headline, "fixed"):
            table.add_row(f"accuracy % (τ={name})", *(f"{a:.2f}" for a in policy["accuracy"]))
            table.add_row("  offload probability", *(f"{p:.3f}" for p in policy["offload_probability"]))
    table.add_row("modelled latency ms", *(f"{v:.2f}" for v in ev["latency_ms"]))
    table.add_row("measured latency ms", *(f"{v:.2f}" for v in ev["measured_latency_ms"]))
    out_console.print(table)
    console.print(f"results: {out / 'results.json'}")


@app.command()
def compare(
    config: ConfigArg,
    algorithms: Annotated[str, typer.Option("--algorithms", help="comma-separated algorithm names")] = (
        "splitfed,multi-exit,splitgp(lambda=0.2),splitgp(lambda=1)"
    ),
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="seeds per algorithm")] = 1,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("runs/compare"),
    plots: Annotated[bool, typer.Option("--plots", help="also write report.html and its PNGs "
                                        "(harmony report)")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="reuse finished runs in OUT, continue interrupted ones "
                                         "from their checkpoints")] = False,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="runs at once, each in its own process; each run "
                                      "gets `threads` = cores / JOBS unless the config sets threads (the "
                                      "thread count is part of a run's config: it changes the bits)")] = 1,
) -> None:
    """Compare algorithms over seeds: the paper-style table, and OUT/compare.json."""
    from harmony.algorithms import parse_algorithm, split_algorithm_list
    from testbed.compare import compare as run_compare

    cfg = _load(config, set_)
    names = split_algorithm_list(algorithms)
    try:
        for name in names:
            parse_algorithm(name)
    except ValueError as err:
        _fail(err)
    try:
        with RoundProgress() as progress:
            doc = run_compare(cfg, names, seeds, out, progress, resume=resume, jobs=jobs)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    out_console.print(compare_table(doc, f"{cfg.data.dataset}, {cfg.fleet.num_clients} clients, "
                                         f"{cfg.model.family}, {seeds} seed(s)"))
    console.print(f"written: {out / 'compare.json'}")
    if plots:
        from testbed.report import write_report

        for p in write_report(out):
            console.print(f"wrote {p}")


def compare_table(doc: dict[str, Any], title: str) -> Table:
    """Accuracy ± 95% CI, offload probability and modelled latency per ρ per algorithm; then, per
    τ policy other than the headline one, its accuracy and offload probability (docs/design.md §14)."""
    headline = doc["rows"][0].get("tau_policy", "oracle") if doc["rows"] else "oracle"
    table = Table(title=f"Test accuracy (%, {headline} τ) and modelled latency (ms)\n{title}")
    table.add_column("algorithm", no_wrap=True)
    table.add_column("", no_wrap=True)
    for rho in doc["rho"]:
        table.add_column(f"ρ={rho:g}", justify="right", no_wrap=True)
    with_ci = len(doc.get("seeds", [])) > 1

    def cells(means: list[float], cis: list[float]) -> list[str]:
        return [f"{a:.2f}±{c:.2f}" if with_ci else f"{a:.2f}" for a, c in zip(means, cis, strict=True)]

    for row in doc["rows"]:
        table.add_row(row["algorithm"], "acc", *cells(row["accuracy"], row["ci95"]))
        if "offload_probability" in row:
            table.add_row("", "offload", *(f"{v:.2f}" for v in row["offload_probability"]))
        policies = {n: p for n, p in row.get("policies", {}).items() if n != headline}
        table.add_row("", "ms", *(f"{v:.2f}" for v in row["latency_ms"]), end_section=not policies)
        for k, (name, p) in enumerate(policies.items()):
            table.add_row("", f"acc τ={name}", *cells(p["accuracy"], p["ci95"]))
            table.add_row("", "offload", *(f"{v:.2f}" for v in p["offload_probability"]),
                          end_section=k == len(policies) - 1)
    return table


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a `harmony compare --out` directory (compare.json) or a "
                                            "`harmony run --out` directory (results.json)")],
    tsne: Annotated[str | None, typer.Option("--tsne", help="algorithms for t-SNE panels of a comparison "
                                             "(comma-separated)")] = None,
    rho: Annotated[float, typer.Option("--rho", help="OOD ratio of the t-SNE test queries and of the "
                                       "per-device latency plot (the nearest evaluated one)")] = 0.8,
) -> None:
    """Write RUN_DIR/report.html and its PNG plots beside it (docs/reporting.md): accuracy vs ρ,
    accuracy–latency, t-SNE, split depths, per-device latency, per-round accuracy, session timeline."""
    from harmony.algorithms import split_algorithm_list
    from testbed.report import write_report

    try:
        paths = write_report(run_dir, split_algorithm_list(tsne) if tsne else None, rho)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    for p in paths:
        out_console.print(f"wrote {p}")


@app.command()
def show(path: Annotated[Path, typer.Argument(help="a compare.json")]) -> None:
    """Print the table of an existing compare.json."""
    doc = json.loads(path.read_text())
    out_console.print(compare_table(doc, str(path)))


def _begin(progress: Any, engine: Any, resume: bool) -> None:
    """Record the run's plan in its event log (when ``progress`` is a ``RunEventLog``)."""
    begin = getattr(progress, "begin", None)
    if begin is not None:
        begin(engine, resume)


def _run_distributed(cfg: Any, out: Path, progress: Any, stack_dir: Path, resume: bool,
                     fleet: dict[str, Any] | None = None, timeouts: tuple[float, float] = (120.0, 900.0)
                     ) -> dict[str, Any]:
    """Run over ``fleet`` (an existing broker and Redis), the stack in ``stack_dir``, or a fresh one;
    ``timeouts``: (``--devices-timeout``, ``--round-timeout``), on every path."""
    import math

    from broker.topics import Topics
    from orchestrator.engine import DistributedEngine
    from testbed.stack import LocalStack, load_stack, redact_url, stack_running

    if fleet is not None:
        import redis

        try:
            user, password = fleet["login"]
            engine = DistributedEngine(cfg, out, progress, mqtt=fleet["mqtt"], redis_url=fleet["redis_url"],
                                       topics=Topics(fleet["topic_prefix"]), username=user, password=password,
                                       tls=fleet["tls"],
                                       devices_timeout_s=fleet["devices_timeout_s"],
                                       round_timeout_s=fleet["round_timeout_s"])
            try:
                _begin(progress, engine, resume)
                return engine.run(resume=resume)
            finally:
                engine.close()
        except redis.exceptions.AuthenticationError as err:
            raise RuntimeError(f"--redis {redact_url(fleet['redis_url'])}: {err}; give the Redis user and password "
                               "in the URL, redis://harmony:PASSWORD@HOST:PORT/0") from err
        except redis.exceptions.ResponseError as err:
            if "NOAUTH" not in str(err) and "WRONGPASS" not in str(err):
                raise
            raise RuntimeError(f"--redis {redact_url(fleet['redis_url'])}: {err}; give the Redis user and password "
                               "in the URL, redis://harmony:PASSWORD@HOST:PORT/0") from err
        except redis.exceptions.ConnectionError as err:
            raise RuntimeError(f"--redis {redact_url(fleet['redis_url'])}: {err}; is the fleet's Redis running "
                               "there?") from err
    own = None
    if stack_running(stack_dir):
        # any device online on the stack serves (its agents, `fleet emulate`, flashed boards): the run
        # waits up to --devices-timeout for fleet.num_clients of them (docs/design.md, "One stack")
        info = load_stack(stack_dir)
        n = cfg.fleet.num_clients
        console.print(f"waiting up to {timeouts[0]:g} s for {n} device(s) online on the stack in {stack_dir}")
        threads = info.worker_concurrency
        if threads is not None and threads < n:
            console.print(f"[yellow]warning:[/yellow] the stack's worker runs {threads} session threads and a round "
                          f"has up to {n} sessions: the devices will train in waves (see queued_s in "
                          f"{out / 'events.jsonl'}); restart the stack with `harmony up --concurrency {n}`",
                          soft_wrap=True)
    else:
        own = LocalStack(stack_dir)
        agents = math.ceil(cfg.fleet.num_clients / 4)
        console.print(f"starting a local stack in {stack_dir} ({agents} agent process(es))")
        info = own.start(agents=agents, devices_per_agent=4, auth=True)
    if info.store is None:
        _warn_open(stack_dir, info)
    try:
        user, password = info.orchestrator_login()
        engine = DistributedEngine(cfg, out, progress, mqtt=info.service_mqtt, redis_url=info.redis_url,
                                   username=user, password=password, tls=info.service_tls("orchestrator"),
                                   devices_timeout_s=timeouts[0], round_timeout_s=timeouts[1],
                                   known_devices=info.known_devices())
        try:
            _begin(progress, engine, resume)
            return engine.run(resume=resume)
        finally:
            engine.close()
    finally:
        if own is not None:
            own.stop()


@app.command()
def monitor(
    web: Annotated[bool, typer.Option("--web", help="serve the live dashboard and /metrics instead of the "
                                      "terminal view")] = False,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="port of the dashboard (--web)")] = 8765,
    host: Annotated[str, typer.Option("--host", help="address the dashboard listens on (--web; 0.0.0.0: every "
                                      "interface)")] = "127.0.0.1",
    stack_dir: Annotated[Path | None, typer.Option("--stack", help="run directory of a `harmony up` stack to "
                                                   "watch (default runs/stack)")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="a `harmony run --out DIR` directory to watch "
                                                 "(its events.jsonl)")] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL of a fleet to watch, e.g. "
                                              "redis://harmony:PASSWORD@host:6379/0 (redis://harmony@host…: the "
                                              "password from $HARMONY_REDIS_PASSWORD)")] = None,
) -> None:
    """Watch a run live: the fleet, the current round, accuracy and loss per round, the event log."""
    import signal

    from testbed.monitor.sources import RedisSource, RunDirSource
    from testbed.monitor.state import MonitorState

    # Ctrl-C (SIGINT) stops it, also when started in the background of a script (`harmony monitor --web &`),
    # which starts it with SIGINT ignored, a disposition Python keeps: take the default handler back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    given = [name for name, value in (("--stack", stack_dir), ("--run-dir", run_dir), ("--redis", redis))
             if value is not None]
    if len(given) > 1:
        _fail(ValueError(f"{' and '.join(given)}: watch one source, a stack, a run directory or a Redis URL"))
    if run_dir is not None:
        state = MonitorState(f"run-dir {run_dir}")
        source: Any = RunDirSource(run_dir, state)
    else:
        broker: tuple[str, int] | None = None
        if redis is not None:
            url = _redis_with_password(redis)
            name = redis
        else:
            from testbed.stack import load_stack, redact_url

            stack_dir = stack_dir or Path("runs/stack")
            try:
                info = load_stack(stack_dir)
                url, broker = info.redis_url_for("monitor"), info.mqtt  # the read-only Redis user
            except (FileNotFoundError, ValueError, KeyError) as err:
                _fail(ValueError(f"--stack: {err}; or watch a run directory (--run-dir DIR) or a Redis (--redis URL)"))
            name = redact_url(url)
        state = MonitorState(f"redis {name}")
        source = RedisSource(url, state, broker=broker)
    source.start()
    try:
        if web:
            try:
                from testbed.monitor.web import DashboardServer
            except ImportError as err:
                _fail(RuntimeError(f"{err}: the dashboard needs the monitor extra, `pip install "
                                   "'harmony-testbed[monitor]'`"))
            try:
                server = DashboardServer(state, host, port).start()
            except RuntimeError as err:
                _fail(err)
            console.print(f"dashboard on {server.url} (Prometheus: {server.url}metrics); Ctrl-C stops it")
            server.wait()
        else:
            from testbed.monitor.terminal import run_live

            run_live(state, out_console)
    finally:
        source.stop()


def _log_level_option(value: str) -> str:
    try:
        return parse_log_level(value)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


@app.command()
def agent(
    broker: Annotated[str, typer.Option("--broker", help="MQTT broker HOST:PORT")],
    device_id: Annotated[list[str], typer.Option("--device-id", help="device id (repeat to emulate several "
                                                 "devices in this process)")],
    credentials: Annotated[Path | None, typer.Option("--credentials", help="file of device_id:password lines")] = None,
    cafile: Annotated[Path | None, typer.Option("--cafile", help="CA certificate of the broker: turns TLS on")] = None,
    certfile: Annotated[Path | None, typer.Option("--certfile", help="the device's client certificate "
                                                  "({device} stands for each device id)")] = None,
    keyfile: Annotated[Path | None, typer.Option("--keyfile", help="the client certificate's key")] = None,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix")] = "hsfl/v1",
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help="blob cache directory")] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="where the dataset files are on this host "
                                                 "(default: the run's data.data_dir, else $HARMONY_DATA_DIR, "
                                                 "else /usr/share/datasets)")] = None,
    slowdown: Annotated[float, typer.Option("--slowdown", min=1.0, help="emulate devices this many times "
                                            "slower than this host (each compute phase is followed by a "
                                            "sleep of slowdown - 1 times its duration)")] = 1.0,
    log_level: Annotated[str, typer.Option("--log-level", callback=_log_level_option,
                                           help=f"one of {', '.join(LOG_LEVELS)}")] = "INFO",
    device_class: Annotated[str | None, typer.Option("--device-class", help="the profiles.yaml class of these "
                                                     "devices, reported in hello (pi4, pi-zero2, jetson-nano, ...)")
                            ] = None,
    emulate: Annotated[bool, typer.Option("--emulate", help="enforce the class's compute, link and latency "
                                          "limits in the agent (docs/emulation.md)")] = False,
    emulate_limits: Annotated[str | None, typer.Option("--emulate-limits", help="with --emulate: the limits the "
                                                       "agent enforces, from compute,uplink,downlink,latency")] = None,
    self_check: Annotated[bool, typer.Option("--self-check", help="check this board instead: torch and one model "
                                             "step, the TLS login to the broker, memory; exit 0 when it passes")
                          ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="with --self-check: one JSON object")] = False,
    check_model: Annotated[str, typer.Option("--check-model", help="with --self-check: model family")] = "cnn8",
    check_width: Annotated[float, typer.Option("--check-width", help="with --self-check: width multiplier")] = 1.0,
    check_depth: Annotated[int | None, typer.Option("--check-depth", help="with --self-check: split depth "
                                                    "(default: the deepest allowed)")] = None,
    min_memory_mib: Annotated[float, typer.Option("--min-memory-mib", help="with --self-check: the memory the "
                                                  "agent needs free")] = 0.0,
) -> None:
    """Run the edge agent: register, then train, personalise and evaluate on command (or, with
    --self-check, check that this board can)."""
    from edge_agent.__main__ import main as agent_main

    argv = ["--broker", broker, "--topic-prefix", topic_prefix, "--log-level", log_level]
    for d in device_id:
        argv += ["--device-id", d]
    if credentials is not None:
        argv += ["--credentials", str(credentials)]
    for flag, path in (("--cafile", cafile), ("--certfile", certfile), ("--keyfile", keyfile)):
        if path is not None:
            argv += [flag, str(path)]
    if cache_dir is not None:
        argv += ["--cache-dir", cache_dir]
    if data_dir is not None:
        argv += ["--data-dir", data_dir]
    if slowdown != 1.0:
        argv += ["--slowdown", str(slowdown)]
    if device_class is not None:
        argv += ["--device-class", device_class]
    if emulate:
        argv += ["--emulate"]
    if emulate_limits is not None:
        argv += ["--emulate-limits", emulate_limits]
    if self_check:
        argv += ["--self-check", "--check-model", check_model, "--check-width", str(check_width),
                 "--min-memory-mib", str(min_memory_mib)] + (["--json"] if json_out else [])
        if check_depth is not None:
            argv += ["--check-depth", str(check_depth)]
    try:
        agent_main(argv)
    except ValueError as err:
        _fail(err)


@app.command()
def up(
    agents: Annotated[int, typer.Option("--agents", min=0, help="agent processes to start")] = 2,
    devices_per_agent: Annotated[int, typer.Option("--devices-per-agent", min=1,
                                                   help="emulated devices each agent hosts")] = 5,
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", min=1, help="session threads of the Celery worker: how many devices train at once "
        "(default: 32, or one per emulated device where that is more; threads start only when needed)")] = None,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="where PIDs and logs go")] = Path("runs/stack"),
    auth: Annotated[bool, typer.Option("--auth", help="broker passwords and a per-device ACL (the default; "
                                       "credentials in RUN_DIR/credentials)")] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="an open broker: anonymous clients, no ACL — anyone "
                                           "on it can speak for any device (docs/security.md)")] = False,
    torch_threads: Annotated[int | None, typer.Option("--torch-threads", min=1, help="torch threads of the worker "
                                                      "and agent processes (default: one per core each)")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="TLS on the broker (MQTT v5), client certificates for the "
                                      "devices (docs/security.md)")] = False,
    profile: Annotated[str, typer.Option("--profile", help="development, or production: refuses plaintext "
                                         "listeners (needs --tls)")] = "development",
) -> None:
    """Start a local stack: mosquitto, redis-server, a Celery worker, the orchestrator, N agents.
    Per-device authentication and ACLs are on unless --insecure."""
    from testbed.stack import LocalStack, stack_running

    if stack_running(run_dir):
        _fail(RuntimeError(f"a stack already runs from {run_dir}; `harmony down --run-dir {run_dir}` first"))
    try:
        if insecure and (auth or tls):
            raise ValueError("--insecure turns authentication off; it does not go with --auth or --tls")
        if profile == "production" and not tls:
            raise ValueError("--profile production refuses plaintext listeners: add --tls")
        info = LocalStack(run_dir).start(agents=agents, devices_per_agent=devices_per_agent,
                                         worker_concurrency=concurrency, auth=not insecure,
                                         torch_threads=torch_threads, tls=tls, profile=profile)
    except (RuntimeError, OSError, ValueError) as err:
        _fail(err)
    out_console.print(f"mqtt 127.0.0.1:{info.mqtt_port}{' (TLS)' if info.tls else ''}  "
                      f"redis {info.redis_url_redacted}  devices {len(info.devices)}")
    out_console.print(f"processes {info.pids}; logs in {run_dir}")
    if info.store is not None:
        out_console.print(f"broker authentication on (services: 127.0.0.1:{info.service_port}, TLS with client "
                          f"certificates); credentials in {info.store}")
    else:
        _warn_open(run_dir, info)


def _warn_open(run_dir: Path, info: Any) -> None:
    """The warning every command prints over a stack started with ``--insecure``."""
    console.print(f"[yellow]warning:[/yellow] the stack in {run_dir} is open (started with --insecure): anyone who "
                  f"reaches 127.0.0.1:{info.mqtt_port} can publish as any device or stop one; restart it without "
                  "--insecure for per-device authentication", soft_wrap=True)


@app.command()
def down(run_dir: Annotated[Path, typer.Option("--run-dir", help="the `harmony up` run directory")] = Path(
        "runs/stack")) -> None:
    """Stop exactly the processes `harmony up` recorded in RUN_DIR/stack.json."""
    from testbed.stack import stop_stack

    try:
        stopped = stop_stack(run_dir)
    except FileNotFoundError as err:
        _fail(err)
    out_console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def flash(
    target: Annotated[str, typer.Argument(metavar="USER@HOST", help="the board, reached over SSH with a key")],
    device_id: Annotated[str, typer.Option("--device-id", help="the device id (credentials from the store; "
                                           "created there, as `harmony fleet add ID` does, when it has none)")],
    broker: Annotated[str, typer.Option("--broker", help="MQTT broker HOST:PORT as the board reaches it "
                                        "(the TLS listener, e.g. 192.168.1.10:8883)")],
    profile: Annotated[str | None, typer.Option("--profile", help="the board's device class (harmony/profiles.yaml; "
                                                "pi4, pi-zero2, jetson-nano, ...)")] = None,
    credentials_dir: Annotated[Path | None, typer.Option("--credentials-dir", help="the credential store "
                                                         "(`harmony certs --dir`)")] = None,
    stack_dir: Annotated[Path | None, typer.Option("--stack", help="a running `harmony up --auth/--tls` stack: "
                                                   "its store, and its broker reloads a new device's password")]
    = None,
    tls: Annotated[bool, typer.Option("--tls/--no-tls", help="connect over TLS with the device's client "
                                      "certificate")] = True,
    config: Annotated[Path | None, typer.Option("--config", help="run config whose partition the device's own "
                                                "data is cut from (with --client)")] = None,
    client: Annotated[int | None, typer.Option("--client", help="the client index this device serves under "
                                               "--config: only its rows are copied")] = None,
    set_: SetOpt = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="where the dataset files are here, to cut "
                                                 "the device's rows from")] = None,
    board_data: Annotated[str | None, typer.Option("--board-data", help="the dataset is already on the board in "
                                                   "this directory (nothing copied)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print every step, change nothing")] = False,
    upgrade: Annotated[bool, typer.Option("--upgrade", help="replace an installed agent in place")] = False,
    root: Annotated[str, typer.Option("--root", help="place the board's files under this directory (a "
                                      "scratch board; the service is then not enabled)")] = "/",
    prefix: Annotated[str, typer.Option("--prefix", help="install directory on the board")] = "/opt/harmony",
    ssh_port: Annotated[int, typer.Option("--ssh-port", min=1, max=65535)] = 22,
    identity: Annotated[Path | None, typer.Option("--identity", help="SSH private key")] = None,
    ssh_option: Annotated[list[str] | None, typer.Option("--ssh-option", help="extra ssh -o KEY=VALUE "
                                                         "(repeatable)")] = None,
    python: Annotated[str, typer.Option("--python", help="the board's Python 3.10+ interpreter")] = "python3",
    pip_args: Annotated[str, typer.Option("--pip-args", help="extra pip arguments on the board, e.g. "
                                          "'--find-links /media/wheels' or an --index-url")] = "",
    system_site_packages: Annotated[bool, typer.Option(
        "--system-site-packages", help="the agent venv also sees the board's system packages (a Jetson's NVIDIA "
        "torch)")] = False,
    site_packages: Annotated[list[str] | None, typer.Option("--site-packages", help="a directory of packages "
                                                            "already on the board for the venv to use (repeatable)")]
    = None,
    run_as: Annotated[str | None, typer.Option("--run-as", help="the user the agent runs as (default: the SSH "
                                               "user)")] = None,
    service: Annotated[str, typer.Option("--service", help="auto (systemd where it runs), systemd, none")] = "auto",
    wheel: Annotated[Path | None, typer.Option("--wheel", help="install this wheel instead of building one")] = None,
    torch: Annotated[str | None, typer.Option("--torch", help="the torch to install (e.g. 2.9.1), instead of the one "
                                              "chosen from the board's CPU (see --dry-run)")] = None,
    wheelhouse: Annotated[Path | None, typer.Option("--wheelhouse", help="install every wheel from this directory "
                                                    "(made here for the board's platform; no internet on the "
                                                    "board)")] = None,
) -> None:
    """Flash an agent onto a board over SSH: the project wheel with its agent extra in a venv, the device's credentials,
    its own data and a systemd unit; idempotent (docs/flashing.md)."""
    import shlex
    from pathlib import PurePosixPath

    from testbed.flash import FlashError, FlashOptions, SshTarget
    from testbed.flash import flash as run_flash

    info = _auth_stack(stack_dir)
    if info is not None:
        if credentials_dir is not None and credentials_dir.resolve() != Path(info.store).resolve():
            _fail(ValueError(f"--credentials-dir {credentials_dir} and --stack {stack_dir} (store {info.store}) "
                             "disagree: give one of them"))
        credentials_dir = Path(info.store)
    store_dir = credentials_dir or _default_credentials_dir()
    scratch = None
    try:
        opts = FlashOptions(
            target=SshTarget.parse(target, port=ssh_port, identity=identity, options=tuple(ssh_option or ())),
            device_id=device_id, broker=broker, credentials_dir=store_dir,
            tls=tls, profile=profile, config=config, overrides=list(set_ or []), client=client,
            local_data_dir=data_dir, board_data=board_data, root=PurePosixPath(root), prefix=PurePosixPath(prefix),
            python=python, pip_args=shlex.split(pip_args), system_site_packages=system_site_packages,
            site_packages=list(site_packages or []), run_as=run_as, service=service, wheel=wheel, upgrade=upgrade,
            dry_run=dry_run, torch=torch, wheelhouse=wheelhouse)
        opts.check()  # bad options fail before any credential is created
        if not _has_credentials(store_dir, device_id):
            if dry_run:  # show the steps with the credentials a real run would create, in a copy of the store
                scratch = tempfile.TemporaryDirectory(prefix="harmony-flash-dry-")
                copy = Path(scratch.name) / "store"
                if store_dir.is_dir():
                    shutil.copytree(store_dir, copy)
                _add_device(copy, device_id, tls)
                out_console.print(f"would create credentials for {device_id} in {store_dir} (harmony fleet add "
                                  f"{device_id}) and update the broker files", markup=False)
                opts = dataclasses.replace(opts, credentials_dir=copy)
            else:
                _add_device(store_dir, device_id, tls)
                folder = _store(store_dir).device_dir(device_id)
                out_console.print(f"created credentials for {device_id} in {folder}; broker files updated in "
                                  f"{store_dir}", markup=False)
                if info is not None:
                    _reload_broker(info, stack_dir, f"{device_id} may connect")
                else:
                    out_console.print("the broker must reload its password file and ACL (SIGHUP mosquitto, or "
                                      "restart the broker container) before the board can log in", markup=False)
        report = run_flash(opts, say=lambda text: out_console.print(text, markup=False, highlight=False,
                                                                    soft_wrap=True))
    except (FlashError, OSError, ValueError) as err:
        _fail(err)
    finally:
        if scratch is not None:
            scratch.cleanup()
    if dry_run:
        out_console.print("dry run: nothing was changed", markup=False)
    elif report.changed:
        out_console.print(f"flashed {device_id} (agent {report.agent_version}): {', '.join(report.changed)}",
                          markup=False)
    else:
        out_console.print(f"{device_id} is up to date (agent {report.agent_version})", markup=False)


def _default_credentials_dir() -> Path:
    return Path("credentials")  # as `harmony certs` and `harmony fleet add` default


def _has_credentials(store_dir: Path, device_id: str) -> bool:
    from testbed.credentials import CredentialError, CredentialStore

    try:
        CredentialStore(store_dir).device(device_id)
    except (CredentialError, FileNotFoundError):
        return False
    return True


def _store(store_dir: Path) -> Any:
    from testbed.credentials import CredentialStore

    return CredentialStore(store_dir)


def _add_device(store_dir: Path, device_id: str, tls: bool, rotate: bool = False) -> Any:
    """The device's credentials (``DeviceCredentials``) in the store, and the broker's password file
    and ACL rewritten: the work of ``harmony fleet add`` and of ``harmony flash`` for a new device."""
    store = _store(store_dir)
    creds = store.add_device(device_id, tls=tls, rotate=rotate)
    store.write_broker_files()
    return creds


board_app = typer.Typer(no_args_is_help=True, help="emulated arm64 boards on this machine (qemu-user, an sshd "
                        "of their own): up, down, list")
app.add_typer(board_app, name="board")


@board_app.command("up")
def board_up_cmd(
    name: Annotated[str, typer.Option("--name", help="the board's name")] = "pi4",
    cpu: Annotated[str, typer.Option("--cpu", help="qemu CPU model: cortex-a72 (Pi 4), cortex-a53 (Pi Zero 2 W, "
                                     "Pi 3), cortex-a76 (Pi 5)")] = "cortex-a72",
    memory: Annotated[str, typer.Option("--memory", help="memory limit (cgroup), e.g. 512m, 1g")] = "1g",
) -> None:
    """Start an emulated arm64 board: a Debian bookworm arm64 root run as CPU --cpu, its sshd on a loopback
    port with key login, a memory limit; prints how to reach and flash it."""
    from testbed.board import BoardError, board_up

    try:
        board = board_up(name, cpu=cpu, memory=memory)
    except BoardError as err:
        _fail(err)
    out_console.print(board.describe(), markup=False, soft_wrap=True)
    out_console.print("flash it with: harmony flash " + " ".join(board.flash_args())
                      + " --device-id ID --broker 127.0.0.1:PORT ...", markup=False, soft_wrap=True)


@board_app.command("down")
def board_down_cmd(name: Annotated[str, typer.Argument(help="the board's name")]) -> None:
    """Stop an emulated board (every process in it, by PID); its files stay for the next `board up`."""
    from testbed.board import BoardError, board_down

    try:
        board = board_down(name)
    except BoardError as err:
        _fail(err)
    out_console.print(f"board {board.name} is down", markup=False)


@board_app.command("list")
def board_list_cmd() -> None:
    """The emulated boards on this machine, up or down."""
    from testbed.board import list_boards

    boards = list_boards()
    for board in boards:
        out_console.print(board.describe(), markup=False, soft_wrap=True)
    if not boards:
        out_console.print("no boards (harmony board up --cpu cortex-a72 --memory 1g)", markup=False)


fleet_app = typer.Typer(no_args_is_help=True, help="the devices of a run: their split depths and why")
app.add_typer(fleet_app, name="fleet")

StoreOpt = Annotated[Path, typer.Option("--dir", help="the credential store (docs/security.md)")]


@app.command()
def certs(
    store_dir: StoreOpt = Path("credentials"),
    host: Annotated[list[str] | None, typer.Option("--host", help="a name or IP address the devices reach the "
                                                   "broker by (repeatable; 127.0.0.1 and localhost always)")] = None,
    device: Annotated[list[str] | None, typer.Option("--device", help="also make this device's credentials "
                                                     "(repeatable; as `harmony fleet add`)")] = None,
) -> None:
    """Make the fleet's CA, the broker's certificate and the broker's password and ACL files."""
    from testbed.credentials import CredentialError, CredentialStore

    store = CredentialStore(store_dir)
    try:
        ca = store.ensure_ca()
        cert, key = store.broker_certificate(list(host or []))
        for name in ("server", "orchestrator"):  # what the broker's service listener asks for
            store.service_certificate(name)
        for d in device or []:
            store.add_device(d, tls=True)
        passwd, acl = store.write_broker_files()
        store.write_service_env()
    except CredentialError as err:
        _fail(err)
    out_console.print(f"CA {ca}\nbroker certificate {cert} (key {key})\nbroker files {passwd}, {acl}, "
                      f"{store.redis_acl_file}\ndevices: {', '.join(store.devices()) or 'none yet'}")


@fleet_app.command("add")
def fleet_add(
    device_id: Annotated[str, typer.Argument(help="the device id (its broker user name and certificate CN)")],
    store_dir: StoreOpt = Path("credentials"),
    tls: Annotated[bool, typer.Option("--tls/--no-tls", help="also a client certificate signed by the store's "
                                      "CA")] = True,
    rotate: Annotated[bool, typer.Option("--rotate", help="replace the device's password and certificate")] = False,
    stack_dir: Annotated[Path | None, typer.Option("--stack", help="add the device to this running `harmony up "
                                                   "--auth/--tls` stack (its store; its broker reloads)")] = None,
) -> None:
    """Create a device's credentials (password, and a client certificate with TLS) in the store."""
    from testbed.credentials import CredentialError

    info = _auth_stack(stack_dir)
    if info is not None:
        assert info.store is not None
        store_dir, tls = Path(info.store), info.tls
    try:
        creds = _add_device(store_dir, device_id, tls, rotate=rotate)
    except CredentialError as err:
        _fail(err)
    folder = _store(store_dir).device_dir(device_id)
    files = ", ".join(p.name for p in (folder / "password", creds.ca_file, creds.cert_file, creds.key_file)
                      if p is not None)
    out_console.print(f"device {device_id}: {folder} ({files}); broker files updated in {store_dir}")
    _reload_broker(info, stack_dir, f"the device may connect to 127.0.0.1:{info.mqtt_port}" if info else "")


@fleet_app.command("remove")
def fleet_remove(
    device_id: Annotated[str, typer.Argument(help="the device id")],
    store_dir: StoreOpt = Path("credentials"),
    stack_dir: Annotated[Path | None, typer.Option("--stack", help="remove it from this running `harmony up "
                                                   "--auth/--tls` stack (its broker reloads)")] = None,
) -> None:
    """Withdraw a device's credentials: its password leaves the broker's password file (docs/security.md)."""
    from testbed.credentials import CredentialError, CredentialStore

    info = _auth_stack(stack_dir)
    if info is not None:
        assert info.store is not None
        store_dir = Path(info.store)
    store = CredentialStore(store_dir)
    try:
        store.remove_device(device_id)
        store.write_broker_files()
    except CredentialError as err:
        _fail(err)
    out_console.print(f"device {device_id} removed from {store_dir}; broker files updated")
    _reload_broker(info, stack_dir, "its connection is refused from its next connect")


def _auth_stack(stack_dir: Path | None) -> Any:
    """The ``StackInfo`` of the ``harmony up --auth/--tls`` stack in ``stack_dir`` (None without one)."""
    from testbed.stack import load_stack

    if stack_dir is None:
        return None
    try:
        info = load_stack(stack_dir)
    except FileNotFoundError as err:
        _fail(err)
    if info.store is None:
        _fail(ValueError(f"the stack in {stack_dir} runs without authentication; start it with "
                         "`harmony up --auth` or `--tls`"))
    return info


def _reload_broker(info: Any, stack_dir: Path | None, then: str) -> None:
    """SIGHUP the stack's mosquitto, which reloads its password file and ACL."""
    import os
    import signal

    from testbed.stack import stack_running

    if info is not None and stack_dir is not None and stack_running(stack_dir):
        os.kill(info.pids["mosquitto"], signal.SIGHUP)
        out_console.print(f"the broker of {stack_dir} reloaded its password file: {then}")


@fleet_app.command("plan")
def fleet_plan(
    config: ConfigArg,
    set_: SetOpt = None,
    broker: Annotated[str | None, typer.Option("--broker", help="decide from the hello of the devices online at "
                                               "this MQTT HOST:PORT (default: from the config's profiles)")] = None,
    stack_dir: Annotated[Path | None, typer.Option("--stack", help="decide from the devices of this `harmony up` "
                                                   "stack (its broker and login)")] = None,
    username: Annotated[str | None, typer.Option("--username", help="broker user name (with --broker)")] = None,
    password: Annotated[str | None, typer.Option("--password", envvar="HARMONY_MQTT_PASSWORD",
                                                 help="broker password (with --broker)")] = None,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix", help="MQTT topic prefix of the fleet")] = "hsfl/v1",
    wait: Annotated[float, typer.Option("--wait", min=0, help="seconds to wait for fleet.num_clients devices "
                                        "to be online")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per device instead of the table")] = False,
) -> None:
    """Print each device's profile, its split depth and the constraint that decided it."""
    from harmony.experiment import Experiment

    cfg = _load(config, set_)
    if broker is not None and stack_dir is not None:
        _fail(ValueError("give --broker or --stack, not both"))
    refused: dict[str, str] = {}
    try:
        experiment = Experiment.plan(cfg)
        if broker is not None or stack_dir is not None:
            decisions, refused = _measured_decisions(experiment, broker, stack_dir, username, password,
                                                     topic_prefix, wait)
        elif experiment.decisions is not None:
            decisions = experiment.decisions
        else:
            source = "fleet.split_depths" if cfg.fleet.split_depths is not None else (
                "fleet.depth_distribution" if cfg.fleet.depth_distribution is not None else "the default pattern")
            if cfg.fleet.assignment == "measured":
                _fail(ValueError("fleet.assignment: measured without fleet.profiles decides from the devices' "
                                 "hello: add --stack DIR or --broker HOST:PORT"))
            decisions = None
            rows = [{"device": f"client {i}", "depth": d, "reason": f"depth {d}: from {source}"}
                    for i, d in enumerate(experiment.depths)]
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError, OSError) as err:
        _fail(err)
    if decisions is not None:
        rows = [d.as_dict() for d in decisions]
    memory = _footprint_warnings(experiment, rows, measured=broker is not None or stack_dir is not None) \
        if decisions is not None else [None] * len(rows)
    if as_json:  # one object per device: its decision (with "warning" where the agent will not fit)
        for row, warning in zip(rows, memory, strict=True):
            typer.echo(json.dumps(row if warning is None else {**row, "warning": warning}))
        for dev, why in refused.items():
            typer.echo(json.dumps({"device": dev, "depth": None, "refused": why}))
        return
    table = Table(title=f"split depths for {cfg.model.family} (batch {cfg.train.batch_size}, "
                        f"step budget {cfg.fleet.step_budget_s:g} s)")
    for column in ("device", "profile", "depth", "decided by"):
        table.add_column(column)
    for row in rows:
        profile = "" if "compute_flops" not in row else (
            f"{row['compute_flops'] / 1e9:.2f} GFLOP/s, {row['available_memory_bytes'] / 2**20:.0f} MiB, "
            f"{row['uplink_bps'] / 1e6:.1f} Mbit/s ({row['source']})")
        table.add_row(row["device"], profile, str(row["depth"]), row["reason"])
    out_console.print(table)
    for why in refused.values():
        out_console.print(f"warning: refused {why}", markup=False, highlight=False, soft_wrap=True)
    for warning in memory:
        if warning is not None:
            out_console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)


def _footprint_warnings(experiment: Any, rows: list[dict[str, Any]], measured: bool) -> list[str | None]:
    """Per row, a warning when that device cannot hold the agent's peak memory for the model it would
    train (testbed/footprint.py) — by its profile's agent budget, or by the memory its ``hello``
    reported — else None."""
    from harmony.profiles import load_profiles
    from testbed.footprint import budget_bytes, memory_warning

    out = []
    profiles = load_profiles()
    cfg = experiment.cfg
    for i, row in enumerate(rows):
        # the peak of the model this device would train: its family and width at its depth
        step = int(row["memory_bytes"])
        model = f"{cfg.model.family} width {cfg.model.width:g} at depth {row['depth']}, batch {cfg.train.batch_size}"
        if measured:
            warning = memory_warning(row["device"], int(row["available_memory_bytes"]), "memory reported in its hello",
                                     step_bytes=step, model=model)
        else:
            name = experiment.profiles[i]
            warning = memory_warning(f"{row['device']} ({name})", budget_bytes(profiles[name]),
                                     "agent memory budget" if profiles[name].agent_memory_bytes else "memory",
                                     step_bytes=step, model=model)
        out.append(warning)
    return out


@fleet_app.command("emulate")
def fleet_emulate(
    profile: Annotated[list[str], typer.Option("--profile", help="CLASS:N — N emulated devices of a "
                                               "harmony/profiles.yaml class (repeatable; pi4:10, pi-zero2:5, "
                                               "jetson-nano:5)")],
    broker: Annotated[str | None, typer.Option("--broker", help="MQTT HOST:PORT of a running fleet (default: the "
                                               "stack in --stack, started if none runs there)")] = None,
    stack_dir: Annotated[Path, typer.Option("--stack", help="run directory of a `harmony up` stack")] = Path(
        "runs/stack"),
    compute: Annotated[str, typer.Option("--compute", help="auto (a cgroup quota where root, else pacing), "
                                         "cgroup or pacing")] = "auto",
    link: Annotated[str, typer.Option("--link", help="auto (tc tbf in a netns where root, else the agent's token "
                                      "bucket), netns or agent")] = "auto",
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="the class's memory as a cgroup limit where "
                                         "available")] = True,
    id_prefix: Annotated[str, typer.Option("--id-prefix", help="prefix of the device ids (CLASS-K by default)")] = "",
    duration: Annotated[float | None, typer.Option("--duration", min=0, help="stop after this many seconds "
                                                   "(default: until Ctrl-C)")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="when this command starts the stack: start it with TLS "
                                      "(`harmony up --tls`); a running --tls stack is used over TLS anyway")] = False,
    profiles_file: Annotated[Path | None, typer.Option("--profiles", help="a profiles YAML adding or overriding "
                                                       "classes (e.g. one with availability periods)")] = None,
    restart: Annotated[bool, typer.Option("--restart/--no-restart", help="start an agent that crashed or was "
                                          "killed again, inside its namespace and cgroups, with back-off (1 s "
                                          "doubling to 30 s); --no-restart leaves it dead, to study dropouts")] = True,
) -> None:
    """Run an emulated fleet whose devices are held to their class's compute, link, memory and availability;
    a device whose agent crashes or is killed is started again (see `harmony fleet ps`)."""
    from harmony.profiles import ProfileError, load_profiles
    from testbed.emulate import (
        EmulatedFleet,
        EmulationError,
        detect_host,
        oversubscription,
        parse_profile_option,
        plan_fleet,
        register_devices,
        run_fleet,
        stack_login,
    )
    from testbed.stack import SESSION_THREADS, LocalStack, load_stack, stack_running

    try:
        table = load_profiles(profiles_file)
        requests = [parse_profile_option(p, table) for p in profile]
        mqtt = _broker_address(broker) if broker is not None else None
        credentials, agent_args = None, []
        host = detect_host()
        plans = plan_fleet(requests, host, compute=compute, link=link, memory=memory, id_prefix=id_prefix,
                           profiles=table)
    except (EmulationError, ProfileError, ValueError, OSError) as err:
        _fail(err)
    if mqtt is None:
        if not stack_running(stack_dir):
            console.print(f"starting a local stack in {stack_dir} (stop it with `harmony down --run-dir {stack_dir}`)")
            LocalStack(stack_dir).start(agents=0, worker_concurrency=max(SESSION_THREADS, sum(len(p.devices)
                                                                                              for p in plans)),
                                        tls=tls, auth=True)
        info = load_stack(stack_dir)
        mqtt = info.mqtt
        # a stack with --auth/--tls: the devices get their credentials in its store (and TLS flags)
        credentials, agent_args = stack_login(info, [d for p in plans for d in p.devices], stack_dir / "emulate")
    table = Table(title=f"emulated fleet against {mqtt[0]}:{mqtt[1]} — host: {host.describe()}")
    rows = [p.row() for p in plans]
    columns = ("class", "devices", "compute", "uplink", "latency", "memory", "availability")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    out_console.print(table)
    for row in rows:
        if row["note"]:
            console.print(f"[yellow]note:[/yellow] {row['note']}")
    warning = oversubscription(plans, os.cpu_count() or 1)
    if warning:
        console.print(f"[yellow]note:[/yellow] {warning}")
    fleet = EmulatedFleet(plans, mqtt, stack_dir / "emulate", credentials=credentials, extra_agent_args=[
        *agent_args, *(["--profiles", str(profiles_file.resolve())] if profiles_file is not None else [])],
        restart=restart)
    if agent_args:
        out_console.print("over TLS: each device with its own client certificate from the stack's credential store")
    out_console.print(f"devices: {', '.join(fleet.devices)}; agent logs in {stack_dir / 'emulate'}; cgroups and "
                      f"namespaces named hemu-{fleet.tag}-*; Ctrl-C stops", soft_wrap=True)
    if broker is None:
        register_devices(stack_dir, fleet.devices)  # `harmony run --stack` counts them
    try:
        failures = run_fleet(
            fleet, duration_s=duration,
            on_failure=lambda f: console.print(f"[red]device failure:[/red] {', '.join(f.devices)} "
                                               f"({f.device_class}): {f.reason}", soft_wrap=True),
            on_start=lambda started: out_console.print(_agents_table(started.processes(), "agents")),
            on_restart=lambda devices, pid: console.print(
                f"[yellow]device restarted:[/yellow] {', '.join(devices)} (pid {pid}, same namespace and cgroups)",
                soft_wrap=True))
    finally:
        if broker is None:
            register_devices(stack_dir, fleet.devices, add=False)
    out_console.print(f"stopped; {len(failures)} agent process(es) failed" if failures else "stopped")


def _agents_table(agents: list[dict[str, Any]], title: str) -> Table:
    """The agent processes of an emulated fleet (``EmulatedFleet.processes``) as a table."""
    table = Table(title=title)
    for column in ("devices", "class", "pid", "state", "restarts", "netns", "cgroups"):
        table.add_column(column)
    for a in agents:
        table.add_row(", ".join(a["devices"]), a["class"], str(a["pid"]), a["state"], str(a["restarts"]),
                      a["netns"] or "-", ", ".join(a["cgroups"]) or "-")
    return table


@fleet_app.command("ps")
def fleet_ps(
    stack_dir: Annotated[Path, typer.Option("--stack", help="run directory of the `harmony up` stack the fleet "
                                            "runs against (its state is in DIR/emulate)")] = Path("runs/stack"),
    as_json: Annotated[bool, typer.Option("--json", help="the state file's JSON instead of the table")] = False,
) -> None:
    """List the agents of the `harmony fleet emulate` running against a stack: PIDs, namespaces, cgroups."""
    from testbed.emulate import STATE_FILE
    from testbed.stack import process_alive

    path = stack_dir / "emulate" / STATE_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        _fail(FileNotFoundError(f"no emulated fleet runs against {stack_dir} ({path} is absent); start one with "
                                f"`harmony fleet emulate --stack {stack_dir} --profile CLASS:N`"))
    except ValueError as err:
        _fail(ValueError(f"{path}: not a fleet state file ({err})"))
    supervisor = int(doc.get("supervisor_pid", 0))
    if not process_alive(supervisor):
        _fail(RuntimeError(f"{path} is left from a `harmony fleet emulate` (pid {supervisor}) that is no longer "
                           "running; its agents are not supervised"))
    for agent in doc["agents"]:  # the file is written at each change; a process may have ended since
        if agent["state"] == "running" and not process_alive(int(agent["pid"])):
            agent["state"] = "ended"
    if as_json:
        typer.echo(json.dumps(doc))
        return
    out_console.print(_agents_table(doc["agents"], f"emulated fleet hemu-{doc['tag']} against {doc['broker']} "
                                    f"(supervisor pid {supervisor}, restarts {'on' if doc['restart'] else 'off'})"))


@fleet_app.command("compose")
def fleet_compose(
    profile: Annotated[list[str], typer.Option("--profile", help="CLASS:N — N agent containers of a "
                                               "harmony/profiles.yaml class (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="the compose file to write")],
    core_gflops: Annotated[float, typer.Option("--core-gflops", min=0.01, help="GFLOP/s one core of the Docker "
                                               "host trains at: the agents' `cpus` are their rates over it")] = 25.0,
    credentials: Annotated[Path | None, typer.Option("--credentials", help="also create what the fleet mounts in "
                                                     "this credential store (CA, broker and device certificates, "
                                                     "passwords, ACLs, DIR/services/*.env)")] = None,
) -> None:
    """Write a compose file: broker, Redis, worker, orchestrator, driver and the emulated agents."""
    from testbed.compose import prepare_credentials, render_compose
    from testbed.emulate import EmulationError, parse_profile_option

    try:
        fleet = [parse_profile_option(p) for p in profile]
    except EmulationError as err:
        _fail(err)
    text = render_compose(fleet, core_flops=core_gflops * 1e9)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out_console.print(f"wrote {out} ({sum(n for _, n in fleet)} agents)")
    if credentials is not None:
        for path in prepare_credentials(credentials, fleet):
            out_console.print(f"wrote {path}")
        out_console.print(f"credential store {credentials}: run with HARMONY_CREDENTIALS_DIR={credentials.resolve()}")


def _measured_decisions(experiment: Any, broker: str | None, stack_dir: Path | None, username: str | None,
                        password: str | None, topic_prefix: str, wait: float) -> tuple[list[Any], dict[str, str]]:
    """Decisions from the ``hello`` of the devices online at ``broker`` (or the stack's broker), and
    the online devices the orchestrator would refuse (their agent version differs) → why."""
    import uuid

    from broker.client import BrokerClient
    from broker.topics import Topics
    from harmony.assignment import from_hello
    from orchestrator.registry import online_fleet
    from testbed.stack import load_stack

    if stack_dir is not None:
        info = load_stack(stack_dir)
        (host, port), (username, password) = info.service_mqtt, info.orchestrator_login()
        tls = info.service_tls("orchestrator")
    else:
        assert broker is not None
        host, port = _broker_address(broker)
        tls = None
    client = BrokerClient(f"fleet-plan-{uuid.uuid4().hex[:8]}", host, port, username=username, password=password,
                          tls=tls, topics=Topics(topic_prefix), clean_start=True, session_expiry_s=0)
    client.connect()
    try:
        n = experiment.num_clients
        profiles, refused = online_fleet(client, n, wait)
    finally:
        client.close()
    if len(profiles) < n:
        why = "".join(f"; refused: {reason}" for reason in refused.values())
        raise TimeoutError(f"{len(profiles)} device(s) online ({sorted(profiles)}) but fleet.num_clients = {n}; "
                           f"start more agents or lower fleet.num_clients{why}")
    family = experiment.cfg.model.family
    return experiment.assign_measured([from_hello(dev, hello, family) for dev, hello in profiles.items()]), refused


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
