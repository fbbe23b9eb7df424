"""The Celery application of the server side: Redis as broker and result backend.

Configured from the environment so that ``harmony up``, tests and real deployments point the
same code at their own services::

    HSFL_REDIS_URL        redis://127.0.0.1:6379/0   broker, result backend and round state
    HSFL_MQTT             127.0.0.1:1883             the Mosquitto the session tasks talk through
    HSFL_MQTT_USER/…PASSWORD                         the server's broker credentials (optional)
    HSFL_MQTT_CAFILE/…CERTFILE/…KEYFILE              TLS: the broker's CA, the ``server`` client certificate
    HSFL_TOPIC_PREFIX     hsfl/v1
    HSFL_VISIBILITY_S     120    how long before an unacknowledged task is redelivered
    HSFL_RESTORE_INTERVAL_S 10   how often a worker looks for such tasks (see below)

Run a worker with ``celery -A server.app worker --pool threads --concurrency 2 -Q hsfl``: sessions
are I/O-bound between steps and torch releases the GIL, so threads serve several at once.
``acks_late`` plus ``reject_on_worker_lost``: a session whose worker dies goes back to the queue and
is replayed from the round-start weights (docs/design.md §5).

How "goes back to the queue" works with the Redis transport (kombu 5.7, ``kombu/transport/redis.py``):
a delivered message sits in the ``unacked`` hash until acknowledged. A worker killed outright
(SIGKILL, power loss) never restores it; ``reject_on_worker_lost`` only helps when a *pool child*
dies under a live parent. The message becomes visible again once it is ``visibility_timeout``
seconds old, and only when some live worker runs ``restore_visible``: at its start-up and then
every ``unacked_restore_interval × unacked_restore_throttle`` seconds (kombu's defaults, 10 × 10,
mean up to 100 s). We set the throttle to 1, so a lost task is redelivered within
``HSFL_VISIBILITY_S + HSFL_RESTORE_INTERVAL_S`` of its delivery (:func:`redelivery_bound_s`).

Root: a worker run as root (a container's default, ``harmony up`` as root) gets Celery's "running the
worker with superuser privileges" warning. What that warning guards against is pickle: a worker that
deserialises task messages with pickle runs whatever code a message carries, with root's rights, so
Celery refuses to start as root with pickle unless ``C_FORCE_ROOT`` is set. This app accepts JSON only
(``accept_content``), so a message can name only the registered tasks with plain data, as root or
not, and the broker is the stack's Redis behind its password. The warning is silenced for exactly that
case, by the worker's configuration as it starts (Celery's ``celeryd_init`` signal, sent just before
its privilege check: :func:`_quiet_root_warning`); a configuration that accepts pickle gets it back.
The docker images run the worker as a non-root user anyway.

That bound must sit well inside a round (the driver's ``round_timeout_s``, 900 s by default), or a
task lost before it started could never come back in time; hence 120 s, not the 900 s this
default used to be. A *started* session does not wait for it at all: it renews a heartbeat key,
and the round driver sends it again about ``server.state.ALIVE_TTL_S`` after its worker died.
A task that outlives the visibility timeout is delivered a second time while it still runs; the
copy finds the original's heartbeat and stands down (``server.state.Heartbeat``), so a long
session is neither duplicated nor restarted (docs/design.md §5).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from celery import Celery, signals
from celery.exceptions import SecurityWarning

QUEUE = "hsfl"
VISIBILITY_S = 120
"""Default ``HSFL_VISIBILITY_S``: well below the default round timeout (900 s); see the module docstring."""
RESTORE_INTERVAL_S = 10
"""Default ``HSFL_RESTORE_INTERVAL_S``."""


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={raw!r}: expected a whole number of seconds >= 1 (default {default}); "
                         f"unset it or fix the value in the worker's environment")
    return value


def visibility_s() -> int:
    """``HSFL_VISIBILITY_S``: seconds before the Redis transport redelivers an unacknowledged task."""
    return _env_seconds("HSFL_VISIBILITY_S", VISIBILITY_S)


def restore_interval_s() -> int:
    """``HSFL_RESTORE_INTERVAL_S``: seconds between a worker's looks for tasks to redeliver."""
    return _env_seconds("HSFL_RESTORE_INTERVAL_S", RESTORE_INTERVAL_S)


def redelivery_bound_s() -> int:
    """How long after its delivery a task lost with its worker is delivered again, at most (this
    process's settings; a worker started with other ones has its own)."""
    return visibility_s() + restore_interval_s()


def redis_url() -> str:
    return os.environ.get("HSFL_REDIS_URL", "redis://127.0.0.1:6379/0")


PICKLE_CONTENT = frozenset({"pickle", "application/x-python-serialize", "application/group-python-serialize"})
"""Content types whose messages run code when deserialised (what Celery's root check looks for)."""


@signals.celeryd_init.connect
def _quiet_root_warning(conf: Any = None, **_: Any) -> None:
    """A worker starts: silence Celery's superuser warning when its configuration accepts no pickle
    (module docstring)."""
    accept_content = getattr(conf, "accept_content", None)
    accepted = {str(c) for c in accept_content} if isinstance(accept_content, list | tuple | set) else {"pickle"}
    if not accepted & PICKLE_CONTENT:
        warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges",
                                category=SecurityWarning)


def celery_app(url: str | None = None, **kwargs: object) -> Celery:
    """The one Celery configuration of the project: the worker's app and every client that sends
    it tasks (the orchestrator's fleet, tests) use it, so their settings cannot drift apart."""
    url = url or redis_url()
    celery = Celery("hsfl", broker=url, backend=url, **kwargs)
    celery.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility_s(),
            "unacked_restore_interval": restore_interval_s(),
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
    )
    return celery


app = celery_app(include=["server.tasks"])
