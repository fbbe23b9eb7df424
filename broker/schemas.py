"""One schema per message kind, and the conversion between message objects and wire bodies.

The step payloads are ``harmony.algorithms.messages``' dataclasses, carried field for field
(``features`` = ``FeaturesUp``, ``logits`` = ``LogitsDown``, ``logit_grad`` = ``LogitGradUp``,
``feature_grad`` = ``FeatureGradDown``); every other kind has a dataclass here. ``to_body(msg)``
and ``from_body(kind, body)`` validate fully in both directions (types, ranges, tensor dtypes and
dimensions, cross-field shapes), so a bad message fails on the sender as well as on the receiver,
with a ``WireError`` naming the field (``body.<name>``).

Privacy rule (docs/design.md §3 step 4): no upload schema (``UPLOAD_KINDS``) has a field named or
carrying labels. The only label-derived data that leaves a device is HARMONY's ``same_label``
indicator (uint8, values 0/1, one per feature pair) and ``negative_pairs`` (int64 index pairs into
the two feature batches); integer tensors anywhere else in an upload are rejected.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from broker.errors import WireError
from broker.limits import BLOB_CHUNK_BYTES, MAX_TENSOR_DIMS
from broker.topics import SHA256_PATTERN
from harmony.algorithms.messages import FeatureGradDown, FeaturesUp, LogitGradUp, LogitsDown
from harmony.evaluate import ClientEvaluation, ClientScore, ThresholdScore

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"
MAX_SPLIT_DEPTH = 64
LINK_PROBE_MAX_BYTES = 1 << 20
SCALE_EXP_RANGE = (-64, 64)
"""Accepted ``FeatureGradDown.scale_exp`` (``encode_gradient`` produces −24 … 60)."""
_INT64_MAX = 2**63 - 1
_IDENT = re.compile(r"[a-z][a-z0-9_]{0,31}")
_POLICY_NAMES = re.compile(r"[a-z][a-z0-9_]{0,31}(,[a-z][a-z0-9_]{0,31}){0,7}")
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MAP_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_FLOATS = (torch.float16, torch.float32)


# --------------------------------------------------------------------------- message kinds
@dataclass
class Hello:
    """Agent registration: the device's resource profile (psutil probe, micro-benchmark, link probe).

    ``cores``, ``cpus`` and ``memory_bytes`` are the host's, bounded by the agent's cgroup limits
    (a container's CPU quota and memory limit; ``edge_agent.probe``).
    """

    agent_version: str
    cores: int  # whole cores it can run on: the CPU quota rounded up
    freq_mhz: float
    memory_bytes: int
    load: float  # 1-minute load average
    gflops: float  # measured matmul GFLOP/s
    rtt_ms: float  # round trip through the broker
    uplink_bps: float  # bits per second device → broker (link probe); 0 when not measured
    battery: float | None = None  # percent 0–100; None on mains-powered boards
    cpus: float | None = None  # CPU time it may use, in CPUs (e.g. 0.15); None from agents before this field
    rates: dict[str, float] | None = None  # measured training FLOP/s per kind of layer (conv, depthwise, attention)
    started_at: float | None = None  # when the agent process started (unix s); a new value: the device restarted
    device_class: str | None = None  # the harmony/profiles.yaml class it runs as or emulates (--device-class)
    data_share: str | None = None  # sha256 of the client share whose rows its board data file holds (harmony flash)
    self_check: dict[str, Any] | None = None  # the self-check at agent start (edge_agent.selfcheck): ok, cpu, torch


@dataclass
class LinkProbe:
    """Agent → broker on the device's ``up`` topic, only to time the uplink (nobody consumes it)."""

    payload: bytes


@dataclass
class Status:
    """Retained device status; ``offline`` is also the last will."""

    state: str  # "online", "offline", "idle", "training", … ([a-z][a-z0-9_]{0,31})
    detail: str = ""


@dataclass
class Assign:
    """Orchestrator → agent: the run manifest (config, data shape, depths, device → client) by its
    hash, and the split depth the device trains at (checked against the manifest)."""

    split_depth: int
    config_digest: str  # sha256 (hex) of the run manifest blob both sides must share


@dataclass
class RoundStart:
    """Orchestrator → agent: round ``round`` begins; fetch weights whose hash changed."""

    round: int
    steps: int
    client_model_sha256: str


@dataclass
class InferRequest:
    """Fallback inference: offloaded cut-layer features at split depth ``depth``."""

    depth: int
    features: torch.Tensor  # fp16/fp32, batch-first, ≥ 2 dims
    want_logits: bool = False


@dataclass
class InferReply:
    """Server answer to an ``infer`` message (``ref_seq`` = its envelope seq)."""

    ref_seq: int
    predictions: torch.Tensor  # int64 [batch]
    logits: torch.Tensor | None = None  # fp32 [batch, classes] when asked for


@dataclass
class Personalise:
    """Orchestrator → agent: personalise from this aggregated client model (eq. 5: the algorithm's
    own steps and rate, ``train.finetune_*`` of the run manifest), then upload the result."""

    model_sha256: str


@dataclass
class Evaluate:
    """Orchestrator → agent: evaluate a client model on the OOD ratios ``rhos``.

    The device runs its early-exit model over its own test set and offloads the features of
    the samples the server must classify as ``infer`` messages; it then sweeps
    ``entropy_thresholds`` (empty: the run config's ``eval.taus``) and ``fixed_tau`` (``None``:
    ``eval.fixed_tau``) and answers with an ``eval_report``.
    """

    model_sha256: str
    rhos: list[float] = field(default_factory=lambda: [0.0])
    entropy_thresholds: list[float] = field(default_factory=list)
    fixed_tau: float | None = None


@dataclass
class EvalReport:
    """Agent → server: one client's evaluation, per OOD ratio (aggregates only; labels stay on the device).

    ``accuracy``/``offload_probability`` at the client's best threshold of the sweep (``tau``),
    and at the fixed threshold. Latencies are medians at batch 1 in seconds: the on-device
    forward and the ``infer`` round trip, when measured. A device with a validation split also
    reports the τ policies it chose there: ``policies`` names them (comma-separated), and
    ``policy_tau``/``policy_accuracy``/``policy_offload`` hold one value per (policy, ρ), policy-major.
    """

    rhos: list[float]
    accuracy: list[float]
    tau: list[float]
    offload_probability: list[float]
    accuracy_fixed_tau: list[float]
    offload_probability_fixed_tau: list[float]
    fixed_tau: float
    samples: int  # test samples evaluated (the ID and OOD pools for the largest ρ)
    client_latency_s: float | None = None
    server_latency_s: float | None = None
    policies: str | None = None
    policy_tau: list[float] | None = None
    policy_accuracy: list[float] | None = None
    policy_offload: list[float] | None = None

    @classmethod
    def from_evaluation(cls, ev: ClientEvaluation, fixed_tau: float, samples: int) -> EvalReport:
        """A device's :class:`harmony.evaluate.ClientEvaluation` as it travels (same floats)."""
        names = list(ev.scores[0].policies) if ev.scores else []
        extra: dict[str, Any] = {}
        if names:
            extra = {"policies": ",".join(names),
                     "policy_tau": [s.policies[n].tau for n in names for s in ev.scores],
                     "policy_accuracy": [s.policies[n].accuracy for n in names for s in ev.scores],
                     "policy_offload": [s.policies[n].offload_probability for n in names for s in ev.scores]}
        return cls(
            rhos=[s.rho for s in ev.scores], accuracy=[s.oracle.accuracy for s in ev.scores],
            tau=[s.oracle.tau for s in ev.scores],
            offload_probability=[s.oracle.offload_probability for s in ev.scores],
            accuracy_fixed_tau=[s.fixed.accuracy for s in ev.scores],
            offload_probability_fixed_tau=[s.fixed.offload_probability for s in ev.scores],
            fixed_tau=fixed_tau, samples=samples,
            client_latency_s=None if ev.measured_s is None else ev.measured_s[0],
            server_latency_s=None if ev.measured_s is None else ev.measured_s[1], **extra)

    def to_evaluation(self) -> ClientEvaluation:
        """Back to the :class:`~harmony.evaluate.ClientEvaluation` the engine tabulates (same floats, same order)."""
        scores = [ClientScore(rho, ThresholdScore(tau, acc, off), ThresholdScore(self.fixed_tau, acc_f, off_f))
                  for rho, acc, tau, off, acc_f, off_f in zip(
                      self.rhos, self.accuracy, self.tau, self.offload_probability, self.accuracy_fixed_tau,
                      self.offload_probability_fixed_tau, strict=True)]
        if self.policies:
            assert self.policy_tau is not None and self.policy_accuracy is not None and self.policy_offload is not None
            n = len(scores)
            for j, name in enumerate(self.policies.split(",")):
                for k, score in enumerate(scores):
                    score.policies[name] = ThresholdScore(self.policy_tau[j * n + k], self.policy_accuracy[j * n + k],
                                                          self.policy_offload[j * n + k])
        measured = None
        if self.client_latency_s is not None and self.server_latency_s is not None:
            measured = (self.client_latency_s, self.server_latency_s)
        return ClientEvaluation(scores, measured)


@dataclass
class Stop:
    """Orchestrator → agent: stop training and disconnect."""

    reason: str = ""


@dataclass
class Cancel:
    """Orchestrator → agent: abandon your session of round ``round`` (its server side failed, the
    device was left out at the deadline, or it was dropped); the agent goes back to waiting for
    commands. A cancel for a round other than the session in progress is ignored."""

    round: int
    reason: str = ""


@dataclass
class ErrorReport:
    """Why a message was dropped (sent on ``dev/{id}/err``; agents may send it on ``up``)."""

    code: str  # broker.inbound.REJECTION_CODES: "bad_schema", "replay", "stale_round", "unknown_device", …
    field: str  # the WireError field, or "" when none applies
    message: str
    ref_seq: int | None = None  # seq of the offending message when it was readable


@dataclass
class BlobChunk:
    """Chunk ``index`` of ``count`` of the blob whose whole content hashes to ``sha256``."""

    sha256: str
    index: int
    count: int
    data: bytes


@dataclass
class Event:
    """A round or device event for monitors (flat scalar fields only)."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- field specs
@dataclass(frozen=True)
class FieldSpec:
    """What one body field must be. ``type``: int, float, bool, str, bytes, tensor, float_list, scalar_map."""

    name: str
    type: str
    optional: bool = False
    lo: float | None = None
    hi: float | None = None
    pattern: re.Pattern[str] | None = None
    max_len: int | None = None
    dtypes: tuple[torch.dtype, ...] = ()
    ndim: int | None = None  # exact number of dimensions
    min_ndim: int = 0


def _int(name: str, lo: int = 0, hi: int = _INT64_MAX, optional: bool = False) -> FieldSpec:
    return FieldSpec(name, "int", optional, lo=lo, hi=hi)


def _float(name: str, lo: float = 0.0, hi: float = 1e18, optional: bool = False) -> FieldSpec:
    return FieldSpec(name, "float", optional, lo=lo, hi=hi)


def _str(name: str, max_len: int = 256, pattern: re.Pattern[str] | None = None) -> FieldSpec:
    return FieldSpec(name, "str", max_len=max_len, pattern=pattern)


def _tensor(
    name: str, dtypes: tuple[torch.dtype, ...], *, ndim: int | None = None, min_ndim: int = 0, optional: bool = False
) -> FieldSpec:
    return FieldSpec(name, "tensor", optional, dtypes=dtypes, ndim=ndim, min_ndim=min_ndim)


def _fail(spec_name: str, detail: str) -> WireError:
    return WireError(f"body.{spec_name}", detail)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_value(spec: FieldSpec, value: Any) -> Any:
    """Validate one field value against its spec; return it normalised (plain int/float/bytes/list)."""
    kind = spec.type
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _fail(spec.name, f"expected an integer, got {type(value).__name__}")
        number = int(value)
        if (spec.lo is not None and number < spec.lo) or (spec.hi is not None and number > spec.hi):
            raise _fail(spec.name, f"expected an integer in [{spec.lo:g}, {spec.hi:g}], got {number}")
        return number
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _fail(spec.name, f"expected a number, got {type(value).__name__}")
        real = float(value)
        if not math.isfinite(real):
            raise _fail(spec.name, f"expected a finite number, got {real}")
        if (spec.lo is not None and real < spec.lo) or (spec.hi is not None and real > spec.hi):
            raise _fail(spec.name, f"expected a number in [{spec.lo:g}, {spec.hi:g}], got {real}")
        return real
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(spec.name, f"expected true or false, got {type(value).__name__}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _fail(spec.name, f"expected a string, got {type(value).__name__}")
        if spec.max_len is not None and len(value) > spec.max_len:
            raise _fail(spec.name, f"expected at most {spec.max_len} characters, got {len(value)}")
        if spec.pattern is not None and not spec.pattern.fullmatch(value):
            raise _fail(spec.name, f"expected a string matching {spec.pattern.pattern}, got {value!r}")
        return value
    if kind == "bytes":
        if not isinstance(value, bytes | bytearray | memoryview):
            raise _fail(spec.name, f"expected bytes, got {type(value).__name__}")
        data = bytes(value)
        if spec.max_len is not None and len(data) > spec.max_len:
            raise _fail(spec.name, f"expected at most {spec.max_len} bytes, got {len(data)}")
        return data
    if kind == "tensor":
        return _check_tensor(spec, value)
    if kind == "float_list":
        if not isinstance(value, list | tuple):
            raise _fail(spec.name, f"expected a list of numbers, got {type(value).__name__}")
        if spec.max_len is not None and len(value) > spec.max_len:
            raise _fail(spec.name, f"expected at most {spec.max_len} numbers, got {len(value)}")
        item = FieldSpec(spec.name, "float", lo=spec.lo, hi=spec.hi)
        return [_check_value(item, v) for v in value]
    if kind == "scalar_map":
        return _check_scalar_map(spec, value)
    raise AssertionError(f"unknown field type {kind!r}")  # a bug in a schema table, not bad input


def _check_tensor(spec: FieldSpec, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _fail(spec.name, f"expected a tensor, got {type(value).__name__}")
    allowed = " or ".join(_dtype_name(d) for d in spec.dtypes)
    if value.dtype not in spec.dtypes:
        hint = " (integer tensors such as labels are never uploaded)" if not value.dtype.is_floating_point else ""
        raise _fail(spec.name, f"expected dtype {allowed}, got {_dtype_name(value.dtype)}{hint}")
    if spec.ndim is not None and value.dim() != spec.ndim:
        raise _fail(spec.name, f"expected {spec.ndim} dimension(s), got shape {list(value.shape)}")
    if value.dim() < spec.min_ndim:
        raise _fail(spec.name, f"expected at least {spec.min_ndim} dimensions, got shape {list(value.shape)}")
    if value.dim() > MAX_TENSOR_DIMS:
        raise _fail(spec.name, f"expected at most {MAX_TENSOR_DIMS} dimensions, got {value.dim()}")
    return value


def _check_scalar_map(spec: FieldSpec, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(spec.name, f"expected a map of scalars, got {type(value).__name__}")
    if len(value) > 64:
        raise _fail(spec.name, f"expected at most 64 entries, got {len(value)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _MAP_KEY.fullmatch(key):
            raise _fail(spec.name, f"expected keys matching {_MAP_KEY.pattern}, got {key!r}")
        if isinstance(item, float) and not math.isfinite(item):
            raise WireError(f"body.{spec.name}.{key}", f"expected a finite number, got {item}")
        if isinstance(item, str) and len(item) > 1024:
            raise WireError(f"body.{spec.name}.{key}", f"expected at most 1024 characters, got {len(item)}")
        if item is not None and not isinstance(item, bool | int | float | str):
            raise WireError(f"body.{spec.name}.{key}", f"expected a scalar (nil/bool/int/float/str), got "
                            f"{type(item).__name__}")
        out[key] = item
    return out


# --------------------------------------------------------------------------- cross-field checks
def _batch(t: torch.Tensor, name: str) -> int:
    if t.shape[0] < 1:
        raise _fail(name, f"expected at least one sample in the batch, got shape {list(t.shape)}")
    return int(t.shape[0])


def _check_features(m: FeaturesUp) -> None:
    batch = _batch(m.features, "features")
    if (m.view_depth is None) != (m.view_features is None):
        raise _fail("view_depth", "expected view_depth and view_features together (both or neither)")
    if m.view_depth is not None and m.view_depth > m.depth:
        raise _fail("view_depth", f"expected view_depth <= depth ({m.depth}), got {m.view_depth}")
    if m.view_features is not None and m.view_features.shape[0] != batch:
        raise _fail("view_features", f"expected batch {batch} (as features), got shape {list(m.view_features.shape)}")
    if m.same_label is not None:
        if m.view_features is None:
            raise _fail("same_label", "expected same_label only together with view_features")
        if m.same_label.shape[0] != batch:
            raise _fail("same_label", f"expected length {batch} (the feature batch), got {m.same_label.shape[0]}")
        if bool((m.same_label > 1).any()):
            raise _fail("same_label", "expected only 0/1 values (a same-label indicator, never labels)")
    if m.negative_pairs is not None:
        if m.view_features is None:
            raise _fail("negative_pairs", "expected negative_pairs only together with view_features")
        pairs = m.negative_pairs
        if pairs.shape[1] != 2:
            raise _fail("negative_pairs", f"expected shape [pairs, 2], got {list(pairs.shape)}")
        if pairs.numel() and (bool((pairs < 0).any()) or bool((pairs >= batch).any())):
            raise _fail("negative_pairs", f"expected indices in [0, {batch}) into the feature batches")


def _check_logits(m: LogitsDown | LogitGradUp) -> None:
    name = "logits" if isinstance(m, LogitsDown) else "grad_logits"
    t = m.logits if isinstance(m, LogitsDown) else m.grad_logits
    _batch(t, name)
    if t.shape[1] < 1:
        raise _fail(name, f"expected at least one class, got shape {list(t.shape)}")


def _check_feature_grad(m: FeatureGradDown) -> None:
    _batch(m.grad_features, "grad_features")


def _check_infer(m: InferRequest) -> None:
    _batch(m.features, "features")


def _check_infer_reply(m: InferReply) -> None:
    if m.logits is not None and m.logits.shape[0] != m.predictions.shape[0]:
        raise _fail("logits", f"expected {m.predictions.shape[0]} rows (one per prediction), got "
                    f"{list(m.logits.shape)}")


def _check_eval_report(m: EvalReport) -> None:
    n = len(m.rhos)
    if n < 1:
        raise _fail("rhos", "expected at least one OOD ratio")
    for name in ("accuracy", "tau", "offload_probability", "accuracy_fixed_tau", "offload_probability_fixed_tau"):
        if len(getattr(m, name)) != n:
            raise _fail(name, f"expected {n} values (one per rho), got {len(getattr(m, name))}")
    names = m.policies.split(",") if m.policies else []
    if len(set(names)) != len(names):
        raise _fail("policies", f"expected distinct policy names, got {m.policies!r}")
    for name in ("policy_tau", "policy_accuracy", "policy_offload"):
        values = getattr(m, name)
        if len(values or []) != n * len(names):
            raise _fail(name, f"expected {n * len(names)} values (one per policy and rho), got {len(values or [])}")


def _check_blob_chunk(m: BlobChunk) -> None:
    if m.index >= m.count:
        raise _fail("index", f"expected index < count ({m.count}), got {m.index}")


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Schema:
    """A message kind: its class, fields, the topic channels it may travel on, and cross-field checks."""

    kind: str
    cls: type
    fields: tuple[FieldSpec, ...]
    channels: frozenset[str]
    check: Callable[[Any], None] | None = None

    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


_SHA = _str("", 64, SHA256_PATTERN)


def _sha(name: str) -> FieldSpec:
    return dataclasses.replace(_SHA, name=name)


_FEATURE_DTYPES = _FLOATS
SCHEMAS: dict[str, Schema] = {
    s.kind: s
    for s in [
        Schema("hello", Hello, (
            _str("agent_version", 64), _int("cores", 1, 65536), _float("freq_mhz", 0, 1e6),
            _int("memory_bytes", 0, 2**62), _float("load", 0, 1e6), _float("gflops", 0, 1e9),
            _float("rtt_ms", 0, 1e7), _float("uplink_bps", 0, 1e15), _float("battery", 0, 100, optional=True),
            _float("cpus", 0.001, 65536, optional=True), FieldSpec("rates", "scalar_map", optional=True),
            _float("started_at", 0, 1e11, optional=True),
            FieldSpec("device_class", "str", True, max_len=64, pattern=_IDENT),
            dataclasses.replace(_SHA, name="data_share", optional=True),
            FieldSpec("self_check", "scalar_map", optional=True),
        ), frozenset({"hello"})),
        Schema("link_probe", LinkProbe, (FieldSpec("payload", "bytes", max_len=LINK_PROBE_MAX_BYTES),),
               frozenset({"up"})),
        Schema("status", Status, (_str("state", 32, _IDENT), _str("detail", 1024)), frozenset({"status"})),
        Schema("assign", Assign, (
            _int("split_depth", 1, MAX_SPLIT_DEPTH), _sha("config_digest"),
        ), frozenset({"cmd"})),
        Schema("round_start", RoundStart, (
            _int("round"), _int("steps", 1, 10**7), _sha("client_model_sha256"),
        ), frozenset({"cmd"})),
        Schema("features", FeaturesUp, (
            _int("step"), _int("depth", 1, MAX_SPLIT_DEPTH), _tensor("features", _FEATURE_DTYPES, min_ndim=2),
            _int("view_depth", 1, MAX_SPLIT_DEPTH, optional=True),
            _tensor("view_features", _FEATURE_DTYPES, min_ndim=2, optional=True),
            _tensor("same_label", (torch.uint8,), ndim=1, optional=True),
            _tensor("negative_pairs", (torch.int64,), ndim=2, optional=True),
        ), frozenset({"up"}), _check_features),
        Schema("logits", LogitsDown, (_int("step"), _tensor("logits", (torch.float32,), ndim=2)),
               frozenset({"down"}), _check_logits),
        Schema("logit_grad", LogitGradUp, (_int("step"), _tensor("grad_logits", (torch.float32,), ndim=2)),
               frozenset({"up"}), _check_logits),
        Schema("feature_grad", FeatureGradDown, (
            _int("step"), _tensor("grad_features", _FEATURE_DTYPES, min_ndim=2),
            _int("scale_exp", SCALE_EXP_RANGE[0], SCALE_EXP_RANGE[1]),
        ), frozenset({"down"}), _check_feature_grad),
        Schema("infer", InferRequest, (
            _int("depth", 1, MAX_SPLIT_DEPTH), _tensor("features", _FEATURE_DTYPES, min_ndim=2),
            FieldSpec("want_logits", "bool"),
        ), frozenset({"up"}), _check_infer),
        Schema("infer_reply", InferReply, (
            _int("ref_seq"), _tensor("predictions", (torch.int64,), ndim=1),
            _tensor("logits", (torch.float32,), ndim=2, optional=True),
        ), frozenset({"down"}), _check_infer_reply),
        Schema("personalise", Personalise, (_sha("model_sha256"),), frozenset({"cmd"})),
        Schema("evaluate", Evaluate, (
            _sha("model_sha256"),
            FieldSpec("rhos", "float_list", lo=0.0, hi=1.0, max_len=64),
            FieldSpec("entropy_thresholds", "float_list", lo=0.0, hi=1e3, max_len=1024),
            _float("fixed_tau", 0, 1e3, optional=True),
        ), frozenset({"cmd"})),
        Schema("eval_report", EvalReport, (
            FieldSpec("rhos", "float_list", lo=0.0, hi=1.0, max_len=64),
            FieldSpec("accuracy", "float_list", lo=0.0, hi=1.0, max_len=64),
            FieldSpec("tau", "float_list", lo=0.0, hi=1e3, max_len=64),
            FieldSpec("offload_probability", "float_list", lo=0.0, hi=1.0, max_len=64),
            FieldSpec("accuracy_fixed_tau", "float_list", lo=0.0, hi=1.0, max_len=64),
            FieldSpec("offload_probability_fixed_tau", "float_list", lo=0.0, hi=1.0, max_len=64),
            _float("fixed_tau", 0, 1e3), _int("samples", 0, 2**40),
            _float("client_latency_s", 0, 1e6, optional=True), _float("server_latency_s", 0, 1e6, optional=True),
            FieldSpec("policies", "str", True, max_len=256, pattern=_POLICY_NAMES),
            FieldSpec("policy_tau", "float_list", True, lo=0.0, hi=1e3, max_len=1024),
            FieldSpec("policy_accuracy", "float_list", True, lo=0.0, hi=1.0, max_len=1024),
            FieldSpec("policy_offload", "float_list", True, lo=0.0, hi=1.0, max_len=1024),
        ), frozenset({"up"}), _check_eval_report),
        Schema("stop", Stop, (_str("reason", 1024),), frozenset({"cmd"})),
        Schema("cancel", Cancel, (_int("round"), _str("reason", 1024)), frozenset({"cmd"})),
        Schema("error", ErrorReport, (
            _str("code", 32, _IDENT), _str("field", 128), _str("message", 2048), _int("ref_seq", optional=True),
        ), frozenset({"err", "up"})),
        Schema("blob_chunk", BlobChunk, (
            _sha("sha256"), _int("index", 0, 2**20), _int("count", 1, 2**20),
            FieldSpec("data", "bytes", max_len=BLOB_CHUNK_BYTES),
        ), frozenset({"blob", "up"}), _check_blob_chunk),
        Schema("event", Event, (_str("name", 64, _EVENT_NAME), FieldSpec("fields", "scalar_map")),
               frozenset({"events"})),
    ]
}
"""Every message kind, by name."""

KINDS = frozenset(SCHEMAS)
UPLOAD_KINDS = frozenset(k for k, s in SCHEMAS.items() if s.channels & {"hello", "status", "up"})
"""Kinds a device sends (on its hello, status or up topic): none may carry labels."""
FLEET_KINDS = frozenset({"event", "blob_chunk"})
"""Kinds that may have an empty ``dev`` in the envelope (not about one device)."""
_KIND_BY_CLASS: dict[type, str] = {s.cls: k for k, s in SCHEMAS.items()}


def schema(kind: str) -> Schema:
    """The schema of ``kind``; ``WireError`` (field ``kind``) if there is none."""
    try:
        return SCHEMAS[kind]
    except (KeyError, TypeError):
        raise WireError(
            "kind", f"unknown message kind {kind!r}; expected one of {', '.join(sorted(SCHEMAS))}"
        ) from None


def kind_of(msg: object) -> str:
    """The kind of a message object (``FeaturesUp`` → ``"features"``)."""
    try:
        return _KIND_BY_CLASS[type(msg)]
    except KeyError:
        raise WireError("body", f"no wire schema for {type(msg).__name__}; expected one of "
                        f"{', '.join(sorted(c.__name__ for c in _KIND_BY_CLASS))}") from None


def check_channel(kind: str, channel: str) -> None:
    """Raise ``WireError`` (field ``kind``) unless messages of ``kind`` may travel on ``channel``."""
    allowed = schema(kind).channels
    if channel not in allowed:
        raise WireError("kind", f"kind {kind!r} is not allowed on the {channel!r} channel "
                        f"(expected on {', '.join(sorted(allowed))})")


def _validate(spec: Schema, values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in spec.fields:
        value = values.get(f.name, dataclasses.MISSING)
        if value is dataclasses.MISSING or value is None:
            if f.optional:
                out[f.name] = None
                continue
            if value is None:
                raise _fail(f.name, f"expected a value for required field of {spec.kind!r}, got nil")
            raise _fail(f.name, f"missing required field of {spec.kind!r}")
        out[f.name] = _check_value(f, value)
    return out


def to_body(msg: object) -> dict[str, Any]:
    """Validate a message object and return its wire body (field name → value; tensors stay tensors)."""
    spec = schema(kind_of(msg))
    assert dataclasses.is_dataclass(msg)
    known = set(spec.field_names())
    values: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        if f.name not in known:  # the dataclass grew a field the wire does not know: fail loudly
            raise _fail(f.name, f"field of {type(msg).__name__} has no place in the {spec.kind!r} wire schema")
        values[f.name] = getattr(msg, f.name)
    body = _validate(spec, values)
    if spec.check is not None:
        spec.check(spec.cls(**body))
    return body


def from_body(kind: str, body: object) -> Any:
    """Validate a decoded wire body of ``kind`` and build its message object."""
    spec = schema(kind)
    if not isinstance(body, Mapping):
        raise WireError("body", f"expected a map for kind {kind!r}, got {type(body).__name__}")
    known = spec.field_names()
    for key in body:
        if key not in known:
            raise WireError(f"body.{key}", f"unknown field for kind {kind!r}; expected only {', '.join(known)}")
    msg = spec.cls(**_validate(spec, body))
    if spec.check is not None:
        spec.check(msg)
    return msg
