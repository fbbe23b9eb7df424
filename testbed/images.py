"""Images made locally, for an engine that reaches no registry (testbed/engine.py).

- :func:`base_image`: the stand-in for ``python:3.11-slim-bookworm`` that the project's
  Dockerfiles build on (``--build-arg PYTHON_IMAGE=...``): a Debian bookworm root with Python 3.11,
  venv and pip (``testbed.rootfs``), imported as an image of its architecture (arm64 through
  qemu-user's binfmt entry);
- :func:`service_images`: Mosquitto, Redis and Prometheus from Debian's packages, laid out as the
  compose file expects of ``eclipse-mosquitto``, ``redis`` and ``prom/prometheus`` (config and data
  under ``/mosquitto``, the broker as uid 1883; ``/data``, redis-server as uid 999 with protected
  mode off; ``/prometheus``, user nobody — as the official images have it), for
  ``MOSQUITTO_IMAGE``/``REDIS_IMAGE``/``PROMETHEUS_IMAGE``. Grafana has no Debian package: none;
- :func:`build_project_image`: ``docker/Dockerfile.agent`` or ``docker/Dockerfile.server`` on such a
  base, installing from a wheelhouse under ``docker/wheelhouse/`` (no index reachable).

Each image carries a label with what it was made from; an image whose label matches is not made again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from testbed.compose import MOSQUITTO_UID, REDIS_UID
from testbed.engine import DockerEngine, EngineError
from testbed.rootfs import IMAGE_PACKAGES, debian_root, ensure_binfmt, host_arch

log = logging.getLogger(__name__)

SERVICE_PACKAGES = ("mosquitto", "mosquitto-clients", "redis-server", "prometheus", "ca-certificates")
LABEL = "org.harmony-testbed.made-from"

MOSQUITTO_DOCKERFILE = f"""\
FROM {{root}}
# the layout and user of eclipse-mosquitto: config and data under /mosquitto, the broker as uid 1883
# (mosquitto drops to its user after start; health checks run as root)
RUN groupmod -g {MOSQUITTO_UID} mosquitto && usermod -u {MOSQUITTO_UID} -g {MOSQUITTO_UID} mosquitto \\
    && mkdir -p /mosquitto/config /mosquitto/data /mosquitto/log && chown -R {MOSQUITTO_UID}:{MOSQUITTO_UID} /mosquitto
VOLUME ["/mosquitto/data"]
EXPOSE 1883 8883
LABEL {LABEL}="{{made_from}}"
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
"""

REDIS_ENTRYPOINT = f"""\
#!/bin/sh
# as the official redis image: redis-server runs as the redis user (uid {REDIS_UID}), protected mode off
set -e
if [ "$1" = redis-server ]; then
  shift
  exec setpriv --reuid={REDIS_UID} --regid={REDIS_UID} --init-groups redis-server --protected-mode no "$@"
fi
exec "$@"
"""

REDIS_DOCKERFILE = f"""\
FROM {{root}}
RUN groupmod -g {REDIS_UID} redis && usermod -u {REDIS_UID} -g {REDIS_UID} redis \\
    && mkdir -p /data && chown {REDIS_UID}:{REDIS_UID} /data
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint.sh
RUN chmod 0755 /usr/local/bin/redis-entrypoint.sh
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6379
LABEL {LABEL}="{{made_from}}"
ENTRYPOINT ["/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
"""


PROMETHEUS_DOCKERFILE = f"""\
FROM {{root}}
# the layout of prom/prometheus: config at /etc/prometheus/prometheus.yml, data in /prometheus, user nobody
RUN mkdir -p /prometheus && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
LABEL {LABEL}="{{made_from}}"
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.console.libraries=/usr/share/prometheus/console_libraries", \
     "--web.console.templates=/usr/share/prometheus/consoles"]
"""


def image_label(engine: DockerEngine, image: str) -> str | None:
    """The made-from label of ``image`` in ``engine``; None when there is no such image."""
    out = engine.docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}', image,
                        check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def import_root(engine: DockerEngine, root: Path, image: str, arch: str, made_from: str) -> str:
    """An image of ``arch`` holding the files of ``root``: ``FROM scratch`` + ``ADD root.tar /``, built
    for ``linux/ARCH`` (``docker import`` would label it with the host's architecture), with Python's
    defaults set. The tar keeps owners and modes; ``/proc``, ``/sys`` and ``/dev`` go in empty."""
    if arch != host_arch():
        ensure_binfmt(arch)  # the image's RUN steps and its containers run under qemu-user
    with tempfile.TemporaryDirectory(prefix="harmony-root-") as context:
        tar = subprocess.run(["tar", "-C", str(root), "--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./dev/*",
                              "-cf", str(Path(context) / "root.tar"), "."], capture_output=True, text=True)
        if tar.returncode != 0:
            raise EngineError(f"packing {root} failed: {tar.stderr[-2000:]}")
        Path(context, "Dockerfile").write_text(
            f'FROM scratch\nADD root.tar /\nENV LANG=C.UTF-8\nLABEL {LABEL}="{made_from}"\nCMD ["python3"]\n')
        engine.docker("build", "--platform", f"linux/{arch}", "-t", image, context, timeout=900)
    have = engine.docker("image", "inspect", "--format", "{{.Architecture}}", image).stdout.strip()
    if have != arch:
        raise EngineError(f"{image}: made as {have}, not {arch}")
    return image


def base_image(engine: DockerEngine, arch: str, tag: str | None = None) -> str:
    """The local stand-in for ``python:3.11-slim-bookworm`` of ``arch`` (module docstring); its name."""
    image = tag or f"harmony-local/python:3.11-bookworm-{arch}"
    root = debian_root(arch, IMAGE_PACKAGES)
    if image_label(engine, image) != root.name:
        log.info("making %s from %s", image, root)
        import_root(engine, root, image, arch, root.name)
    return image


def service_images(engine: DockerEngine) -> dict[str, str]:
    """Mosquitto, Redis and Prometheus images from Debian's packages, by the compose file's variable that
    names each: ``{"MOSQUITTO_IMAGE": ..., "REDIS_IMAGE": ..., "PROMETHEUS_IMAGE": ...}``. (Grafana is not
    packaged by Debian: no local image of it.)"""
    root = debian_root(host_arch(), SERVICE_PACKAGES)
    base = f"harmony-local/debian-services:{root.name}"
    if image_label(engine, base) != root.name:
        import_root(engine, root, base, host_arch(), root.name)
    images = {}
    for variable, name, dockerfile, extra in (
            ("MOSQUITTO_IMAGE", "harmony-local/mosquitto:2.0-bookworm", MOSQUITTO_DOCKERFILE, {}),
            ("REDIS_IMAGE", "harmony-local/redis:7.0-bookworm", REDIS_DOCKERFILE,
             {"redis-entrypoint.sh": REDIS_ENTRYPOINT}),
            ("PROMETHEUS_IMAGE", "harmony-local/prometheus:2.42-bookworm", PROMETHEUS_DOCKERFILE, {})):
        made_from = root.name + "-" + _digest(dockerfile + "".join(extra.values()))
        if image_label(engine, name) != made_from:
            with tempfile.TemporaryDirectory() as context:
                Path(context, "Dockerfile").write_text(dockerfile.format(root=base, made_from=made_from))
                for file, text in extra.items():
                    Path(context, file).write_text(text)
                engine.docker("build", "-t", name, context, timeout=900)
        images[variable] = name
    return images


def build_project_image(engine: DockerEngine, repo: Path, dockerfile: str, image: str, *, arch: str,
                        base: str, wheelhouse: Path | None = None,
                        build_args: Mapping[str, str] | None = None, timeout_s: float = 1800) -> str:
    """``docker build --platform linux/ARCH -f docker/DOCKERFILE`` from the repository root on ``base``,
    installing from ``wheelhouse`` (copied, by hard links where it can, to ``docker/wheelhouse/NAME``
    for the build and removed afterwards); returns ``image``."""
    args = {"PYTHON_IMAGE": base, **(build_args or {})}
    staged: Path | None = None
    try:
        if wheelhouse is not None:
            # one fixed name per architecture: the name is a build argument, and a new one would miss
            # the build cache of every step after it
            staged = repo / "docker" / "wheelhouse" / f".build-{arch}"
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(wheelhouse, staged, copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns(".*", "harmony_testbed-*"))  # built from source
            args["WHEELHOUSE"] = str(staged.relative_to(repo))
        argv = ["build", "--platform", f"linux/{arch}", "-f", f"docker/{dockerfile}", "-t", image]
        for key, value in args.items():
            argv += ["--build-arg", f"{key}={value}"]
        log.info("building %s (%s, linux/%s)", image, dockerfile, arch)
        out = engine.docker(*argv, ".", cwd=repo, timeout=timeout_s, check=False)
        if out.returncode != 0:
            raise EngineError(f"building {image} from docker/{dockerfile} for linux/{arch} failed:\n"
                              f"{(out.stderr or out.stdout)[-4000:]}")
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    return image


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
