"""Round state and buffers in Redis (docs/design.md §5), shared by the session tasks and the orchestrator.

Key layout under the ``hsfl:`` prefix::

    hsfl:dev:{id}                 hash: profile (hello fields), status, assignment
    hsfl:devices                  set of registered device ids
    hsfl:config:{sha}             the run manifest (config, data shape, depths, n_i, device → client, the
                                  devices' share-blob hashes), JSON
    hsfl:model:{sha}              weights: a state-dict blob (``broker.blobs``; sha256 of its bytes)
    hsfl:round:{r}                hash: state (planned/running/aggregating/done/failed), participants, deadline,
                                  attempt (this try of the round), eval_attempt, and once done the
                                  aggregated shas, the uploads and the round's record (JSON)
    hsfl:round:{r}:ready          hash: device id → session token (a session is subscribed), and
                                  ``infer:{id}`` → token of the device's fallback-inference task
    hsfl:round:{r}:done           set of device ids whose session folded its result
    hsfl:round:{r}:eval           hash: device id → its evaluation report (JSON) for evaluation round r
    hsfl:round:{r}:notify         list: wake-ups for the orchestrator waiting on round r (BLPOP)
    hsfl:round:{r}:alive:{attempt}:{field}
                                  string with a TTL: a server task of that attempt serving ``field`` (a
                                  device id, or ``infer:{id}``) is alive; it renews it every second
    hsfl:agg:{r}:{dev}            hash: raw little-endian bytes per tensor in its own dtype
                                  (``client:{name}``/``server:{name}``)
                                  and ``meta`` (JSON: weight, shapes, stats, uploaded client sha)
    hsfl:run                      hash: the current run (id, manifest sha, last finished round)
    hsfl:events                   stream for monitors

Superseded work stops itself: every try of a round (and of an evaluation) gets a fresh
``attempt`` id in ``round:{r}``, and each server task holds a token in ``round:{r}:ready``. A
task whose token was replaced (its session was redelivered and runs elsewhere) or whose
attempt is no longer current (a restarted orchestrator re-planned the round) ends at its next
message or within a second (:class:`TaskGuard`), instead of holding a worker thread until its
deadline or answering a device that now talks to its successor.

Live work is not duplicated: a running task keeps ``round:{r}:alive:{attempt}:{field}`` alive
(:class:`Heartbeat`, renewed every ``HEARTBEAT_S``, expiring after ``ALIVE_TTL_S``). A copy of a
task that starts while the key lives (the Redis transport redelivered a message whose task still
runs, because it outlived the visibility timeout) stands down instead of superseding it; a key
that expires while its session is unfinished tells the round driver that the worker died, and
the driver sends the session again (docs/design.md §5). A task renews only a key that still
holds its own token, so the driver can free the key of a session it replays (:func:`drop_alive`).

The aggregation buffers are *per-session* contributions: ``θ_i`` as raw little-endian bytes in each
tensor's own dtype, with ``n_i`` in the meta. The aggregation task forms ``n_i·θ_i`` in float64
(exactly :meth:`harmony.aggregation.WeightedSum.add`'s first term) and merges them in the order the
engine gives (participant order), so the result is the local engine's bit for bit and independent
of which worker ran which session; a redelivered session overwrites its own buffer, so a replay
never double-counts. Storing ``θ_i``
rather than the float64 product halves what each session writes to Redis (and its append-only
file): ≈ 15.5 MB instead of 31 MB per session for full-width cnn8.

This module imports redis-py, numpy and torch only (no Celery), so the orchestrator can use it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import redis
import torch

from broker.blobs import bytes_to_state_dict, sha256_hex, state_dict_to_bytes
from harmony.aggregation import WeightedSum

log = logging.getLogger(__name__)

PREFIX = "hsfl:"
ROUND_STATES = ("planned", "running", "aggregating", "done", "failed")


def dev_key(dev: str) -> str:
    return f"{PREFIX}dev:{dev}"


def devices_key() -> str:
    return f"{PREFIX}devices"


def config_key(sha: str) -> str:
    return f"{PREFIX}config:{sha}"


def model_key(sha: str) -> str:
    return f"{PREFIX}model:{sha}"


def round_key(rnd: int) -> str:
    return f"{PREFIX}round:{rnd}"


def ready_key(rnd: int) -> str:
    return f"{PREFIX}round:{rnd}:ready"


def done_key(rnd: int) -> str:
    return f"{PREFIX}round:{rnd}:done"


def notify_key(rnd: int) -> str:
    """A list the server tasks push to whenever they change round ``rnd``'s ready/done/eval
    state, so the orchestrator blocks on it (BLPOP) instead of polling."""
    return f"{PREFIX}round:{rnd}:notify"


NOTIFY_TTL_S = 3600


def notify(r: redis.Redis | redis.client.Pipeline, rnd: int) -> None:
    """Wake the orchestrator waiting on round ``rnd`` (also inside a MULTI pipeline)."""
    r.rpush(notify_key(rnd), b"1")
    r.expire(notify_key(rnd), NOTIFY_TTL_S)


def wait_notify(r: redis.Redis, rnd: int, timeout_s: float) -> None:
    """Block until a task changes round ``rnd``'s state (or ``timeout_s`` passes), then drop the
    queued wake-ups: the caller re-reads the state itself, so one wake-up covers all of them."""
    if r.blpop([notify_key(rnd)], timeout=timeout_s) is not None:
        r.delete(notify_key(rnd))


def alive_key(rnd: int, attempt: str | None, field: str) -> str:
    return f"{PREFIX}round:{rnd}:alive:{attempt or '-'}:{field}"


HEARTBEAT_S = 1.0
"""How often a running server task renews its ``alive`` key."""
ALIVE_TTL_S = 10
"""How long an ``alive`` key outlives its task's last renewal: the round driver re-sends a session
whose key has been gone this long (its worker died), so a lost session comes back within about
``ALIVE_TTL_S`` plus a worker's pick-up, whatever the visibility timeout."""


_RENEW_IF_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return false
"""


class Heartbeat:
    """A running task's ``alive`` key, renewed from a daemon thread until :meth:`stop`.

    :meth:`start` takes the key only when nobody holds it (SET NX): False means another task of the
    same attempt serves ``field`` right now, and this copy should stand down."""

    def __init__(self, r: redis.Redis, rnd: int, attempt: str | None, field: str, token: str) -> None:
        self.r, self.key, self.token = r, alive_key(rnd, attempt, field), token
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"heartbeat-{field}", daemon=True)

    def start(self) -> bool:
        if not self.r.set(self.key, self.token, nx=True, ex=ALIVE_TTL_S):
            return False
        self._thread.start()
        return True

    def _renew(self) -> None:
        renew = self.r.register_script(_RENEW_IF_MINE)
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                if not renew(keys=[self.key], args=[self.token, ALIVE_TTL_S]):
                    return  # expired or taken over (the driver sent the session again): no longer ours
            except redis.RedisError as err:  # e.g. Redis restarting: the next renewal retries
                log.warning("heartbeat %s: %s", self.key, err)

    def stop(self) -> None:
        """Stop renewing; the key expires by itself (deleting it could delete a successor's)."""
        self._stopped.set()


def drop_alive(r: redis.Redis, rnd: int, attempt: str | None, field: str) -> None:
    """Free ``field``'s ``alive`` key for a successor: its holder, already superseded, cannot renew it
    any more (it renews only its own token) and stops at its next guard check."""
    r.delete(alive_key(rnd, attempt, field))


def eval_key(rnd: int) -> str:
    return f"{PREFIX}round:{rnd}:eval"


def agg_key(rnd: int, dev: str) -> str:
    return f"{PREFIX}agg:{rnd}:{dev}"


def run_key() -> str:
    return f"{PREFIX}run"


def events_key() -> str:
    return f"{PREFIX}events"


def clean_run_keys(r: redis.Redis, *, keep_models: set[str] | frozenset[str] = frozenset(),
                   keep_configs: set[str] | frozenset[str] = frozenset(), rounds: bool = False) -> int:
    """Delete the per-run keys that only a run's rounds need: every ``model:{sha}`` and
    ``config:{sha}`` but those kept and, with ``rounds``, the session buffers ``agg:*`` and the
    rounds' working keys (``round:{r}:ready``/``done``/``notify``/``alive:*``; the ``round:{r}``
    hashes with their records and the ``round:{r}:eval`` reports stay, until a fresh run's reset).
    Returns how many keys went. The ``hsfl:`` layout is unchanged."""
    doomed = [k for k in r.scan_iter(f"{PREFIX}model:*", count=1000)
              if k.decode().removeprefix(f"{PREFIX}model:") not in keep_models]
    doomed += [k for k in r.scan_iter(f"{PREFIX}config:*", count=1000)
               if k.decode().removeprefix(f"{PREFIX}config:") not in keep_configs]
    if rounds:
        doomed += list(r.scan_iter(f"{PREFIX}agg:*", count=1000))
        doomed += [k for k in r.scan_iter(f"{PREFIX}round:*:*", count=1000) if not k.endswith(b":eval")]
    for i in range(0, len(doomed), 1000):
        r.delete(*doomed[i:i + 1000])
    return len(doomed)


RECONNECT_TRIES = 40
"""How often a command is tried again when Redis is away (exponential backoff capped at 0.5 s:
about 15 s in all), so that a redis-server restarted mid-round (it reloads its append-only file in
about a second) costs the round nothing instead of failing the driver and the session tasks."""


def check_reachable(url: str) -> None:
    """One PING without tries again: a wrong URL or a Redis that is not running fails at once
    (``redis.ConnectionError``, ``AuthenticationError``) rather than after ``connect``'s retries."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    finally:
        client.close()


def connect(url: str) -> redis.Redis:
    """A redis-py client on ``url`` returning bytes (buffers are raw bytes) that rides out a restart
    of redis-server: connection errors and the loading of its append-only file are retried
    (``RECONNECT_TRIES``). The runtime's writes are idempotent (HSET, SADD, SET of content-addressed
    bytes) or harmless twice (a wake-up pushed, an event recorded), so a command tried again is
    harmless."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, decode_responses=False,
                                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RECONNECT_TRIES),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError])


# --------------------------------------------------------------------------- attempts
def claim_ready(r: redis.Redis, rnd: int, field: str, token: str, attempt_field: str = "attempt",
                attempt: str | None = None) -> bool:
    """Record ``token`` under ``field`` of ``round:{rnd}:ready`` — only while ``attempt`` is still the
    round's current ``attempt_field`` (checked and written atomically with WATCH/MULTI, so a task of
    a superseded attempt cannot overwrite the token of the current one). False: superseded."""
    if attempt is None:
        with r.pipeline(transaction=True) as pipe:
            pipe.hset(ready_key(rnd), field, token)
            notify(pipe, rnd)
            pipe.execute()
        return True
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(round_key(rnd))
                current = pipe.hget(round_key(rnd), attempt_field)
                if current is None or current.decode() != attempt:
                    pipe.unwatch()
                    return False
                pipe.multi()
                pipe.hset(ready_key(rnd), field, token)
                notify(pipe, rnd)
                pipe.execute()
                return True
            except redis.WatchError:
                continue


class Superseded(Exception):
    """This task's work was handed to a newer task (or a newer attempt of the round)."""


class TaskGuard:
    """Tells a server task whether it is still the one serving ``field`` in round ``rnd``."""

    def __init__(self, r: redis.Redis, rnd: int, field: str, token: str, attempt_field: str = "attempt",
                 attempt: str | None = None) -> None:
        self.r, self.rnd, self.field, self.token = r, rnd, field, token
        self.attempt_field, self.attempt = attempt_field, attempt

    def current(self) -> bool:
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(ready_key(self.rnd), self.field)
        pipe.hget(round_key(self.rnd), self.attempt_field)
        token, attempt = pipe.execute()
        if token is None or token.decode() != self.token:
            return False
        return self.attempt is None or (attempt is not None and attempt.decode() == self.attempt)

    def check(self) -> None:
        """Raise :class:`Superseded` unless :meth:`current`."""
        if not self.current():
            raise Superseded(f"round {self.rnd} {self.field}: token {self.token} superseded")


# --------------------------------------------------------------------------- models
def put_model(r: redis.Redis, state: Mapping[str, torch.Tensor]) -> tuple[str, bytes]:
    """Store a state dict under ``model:{sha}``; return (sha, bytes). Idempotent (content-addressed)."""
    data = state_dict_to_bytes(state)
    sha = sha256_hex(data)
    r.set(model_key(sha), data)
    return sha, data


def get_model(r: redis.Redis, sha: str) -> dict[str, torch.Tensor]:
    data = r.get(model_key(sha))
    if data is None:
        raise KeyError(f"no weights under {model_key(sha)} (was the round published?)")
    if sha256_hex(data) != sha:
        raise ValueError(f"{model_key(sha)} holds bytes hashing to {sha256_hex(data)}")
    return bytes_to_state_dict(data)


# --------------------------------------------------------------------------- partial sums
def state_fields(side: str, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, bytes], dict, dict]:
    """Each tensor of ``state`` as raw little-endian bytes in its own dtype; returns (fields, shapes, dtypes)."""
    fields: dict[str, bytes] = {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for name, tensor in state.items():
        array = tensor.detach().cpu().contiguous().numpy()
        little = array.dtype.newbyteorder("<")
        fields[f"{side}:{name}"] = np.ascontiguousarray(array, dtype=little).tobytes()
        shapes[name] = list(array.shape)
        dtypes[name] = little.str
    return fields, shapes, dtypes


def store_session_result(r: redis.Redis, rnd: int, dev: str, client_state: Mapping[str, torch.Tensor],
                         server_state: Mapping[str, torch.Tensor], weight: int, meta: dict[str, Any]) -> None:
    """Store one session's contribution (``θ_i`` of both sides, weight ``n_i``) and mark it done,
    atomically (MULTI/EXEC)."""
    if not weight > 0:
        raise ValueError(f"aggregation weight must be positive, got {weight}")
    c_fields, c_shapes, c_dtypes = state_fields("client", client_state)
    s_fields, s_shapes, s_dtypes = state_fields("server", server_state)
    meta = {**meta, "weight": weight, "shapes": {"client": c_shapes, "server": s_shapes},
            "dtypes": {"client": c_dtypes, "server": s_dtypes}}
    pipe = r.pipeline(transaction=True)
    pipe.delete(agg_key(rnd, dev))
    pipe.hset(agg_key(rnd, dev), mapping={**c_fields, **s_fields, "meta": json.dumps(meta).encode()})
    pipe.sadd(done_key(rnd), dev)
    notify(pipe, rnd)
    pipe.execute()


def session_meta(r: redis.Redis, rnd: int, dev: str) -> dict[str, Any]:
    """One done session's meta (weight ``n_i``, stats, uploaded client sha, …) without its tensors."""
    raw = r.hget(agg_key(rnd, dev), "meta")
    if raw is None:
        raise KeyError(f"no session result for device {dev!r} in round {rnd} ({agg_key(rnd, dev)})")
    return json.loads(raw)


def load_session_state(r: redis.Redis, rnd: int, dev: str
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """One session's stored ``θ_i`` of both sides as float64 tensors (the exact widening of the
    uploaded values, as ``WeightedSum.add`` forms it) plus its meta."""
    raw = r.hgetall(agg_key(rnd, dev))
    if b"meta" not in raw:
        raise KeyError(f"no partial sum for device {dev!r} in round {rnd} ({agg_key(rnd, dev)})")
    meta = json.loads(raw[b"meta"])
    sides: dict[str, dict[str, torch.Tensor]] = {"client": {}, "server": {}}
    for side, tensors in sides.items():
        for name, shape in meta["shapes"][side].items():
            array = np.frombuffer(raw[f"{side}:{name}".encode()], dtype=meta["dtypes"][side][name]).reshape(shape)
            tensors[name] = torch.from_numpy(array.astype(np.float64))  # one pass: byte order and width
    return sides["client"], sides["server"], meta


def load_partial_sum(r: redis.Redis, rnd: int, dev: str) -> tuple[WeightedSum, WeightedSum, dict[str, Any]]:
    """One session's contribution as (client, server) ``WeightedSum``s (``n_i·θ_i`` in float64) plus its meta."""
    client, server, meta = load_session_state(r, rnd, dev)
    sums = WeightedSum(), WeightedSum()
    for acc, tensors in zip(sums, (client, server), strict=True):
        acc.add(tensors, float(meta["weight"]))
    return sums[0], sums[1], meta


def merge_partial_sums(r: redis.Redis, rnd: int, devices: Iterable[str]) -> tuple[WeightedSum, WeightedSum, list]:
    """Fold the sessions' buffers into one sum per side in the given (participant) order — the local
    engine's ``WeightedSum.add`` calls in the local engine's order, so the same bits; returns the
    sums and each meta."""
    client_sum, server_sum, metas = WeightedSum(), WeightedSum(), []
    for dev in devices:
        client, server, meta = load_session_state(r, rnd, dev)
        client_sum.add(client, float(meta["weight"]))
        server_sum.add(server, float(meta["weight"]))
        metas.append(meta)
    return client_sum, server_sum, metas


def event(r: redis.Redis, name: str, **fields: Any) -> None:
    """Append a monitor event to the ``hsfl:events`` stream (capped)."""
    r.xadd(events_key(), {"name": name, **{k: json.dumps(v) for k, v in fields.items()}}, maxlen=10_000,
           approximate=True)
