"""Experiment configuration: one validated tree, loaded from YAML with ``--set`` overrides.

A bad value raises :class:`ConfigError`, whose message names the key, the value given and
what is allowed, e.g. ``train.participation = 1.5: must be <= 1``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_TAUS: list[float] = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
                             1.2, 1.4, 1.6, 1.8, 2.0, 2.3]


class ConfigError(ValueError):
    """An invalid experiment configuration; the message says which key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: Literal["fashion_mnist", "mnist", "cifar10", "cifar100", "cinic10", "tiny_imagenet"] = (
        "fashion_mnist"
    )
    data_dir: str | None = None
    partition: Literal["shard", "dirichlet"] = "shard"
    shards_per_client: int = Field(2, ge=1)
    num_shards: int = Field(100, ge=1)
    dirichlet_beta: float = Field(0.5, gt=0)
    train_fraction: float = Field(1.0, gt=0, le=1, description="fraction of each client's samples kept")
    test_per_client: int = Field(200, ge=1)
    rhos: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    val_per_client: int = Field(
        0, ge=0, description="validation samples held out of each client's data (never trained on; built per ρ "
                             "like the test set, OOD from other classes' training samples); 0: none")
    id_rule: Literal["auto", "present", "share", "mass"] = Field(
        "auto", description="a client's in-distribution classes: present (every class it holds), share (classes "
                            "with ≥ id_threshold of its samples), mass (fewest classes covering id_threshold of "
                            "them); auto: present for shard, mass for dirichlet")
    id_threshold: float | None = Field(
        None, ge=0, le=1, description="the id_rule's threshold (None: share 0.05, mass 0.9)")

    @property
    def id_rule_resolved(self) -> str:
        """The ID rule in force (``auto`` resolved by the partition)."""
        if self.id_rule != "auto":
            return self.id_rule
        return "present" if self.partition == "shard" else "mass"

    @field_validator("rhos")
    @classmethod
    def _rhos_in_range(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one OOD ratio")
        for r in v:
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"every OOD ratio must lie in [0, 1], got {r}")
        return v


class ModelConfig(_Section):
    family: Literal["cnn8", "vgg11_bn", "mobilenet_v2", "resnet18", "resnet50", "vit_s"] = "cnn8"
    width: float = Field(1.0, gt=0, le=4)
    channels_last: bool = True


class FleetConfig(_Section):
    num_clients: int = Field(10, ge=1, le=100_000)
    split_depths: list[int] | None = Field(
        None, description="one depth per client, or a pattern repeated over the clients"
    )
    depth_distribution: dict[int, float] | None = None
    profiles: list[str] | None = Field(
        None, description="device profile per client (repeated); depth chosen to fit the profile"
    )
    step_budget_s: float = Field(1.0, gt=0, description="per-step time budget when depths come from profiles or "
                                                         "measurements")
    assignment: Literal["config", "measured"] = Field(
        "config", description="split depths from the config (split_depths, depth_distribution, profiles) or "
                              "measured: from each device's measured compute rate, memory and uplink (on a stack "
                              "the agents' hello; in the local runtime the fleet.profiles figures)")
    reassign_drift: float | None = Field(
        None, gt=0, description="with assignment: measured, re-decide a device's depth when its measured client "
                                "step time differs from the estimate by more than this fraction (None: never)")
    # -- rounds that never hang (the engine's rules; both runtimes apply them alike)
    round_deadline_s: float | None = Field(
        None, gt=0,
        description="a session that takes longer is a straggler, left out of the aggregate (None: deadline_slack, "
                    "else on a stack one derived from the try, quorum_slack)")
    deadline_slack: float | None = Field(
        None, gt=0, description="without round_deadline_s: deadline = slack × the slowest participant's estimated "
                                "session time (from its profile)")
    quorum_slack: float | None = Field(
        5.0, gt=0,
        description="without round_deadline_s and deadline_slack, on a stack (sessions side by side in real time): "
                    "once a try has its quorum, the sessions still running may take this × the time the quorum "
                    "took (at least 30 s) before they are stragglers (None: wait up to --round-timeout)")
    quorum: float = Field(
        0.5, gt=0,
        description="sessions a round needs to complete: a fraction of its participants (≤ 1, rounded up) or a count "
                    "(> 1). The default 0.5 accepts failures as long as half the participants complete, as Flower's "
                    "accept_failures with a minimum does; 1.0: every participant")
    round_retries: int = Field(2, ge=0, description="tries of a round that fell below quorum before the run fails")
    retry_grace_s: float = Field(
        15.0, ge=0, description="before a retry, wait up to this long for the devices the failed try lost to come "
                                "back (an agent restarting); 0: retry at once")
    clock: Literal["wall", "simulated"] = Field(
        "wall", description="local engine: session times measured (wall) or modelled from the device profiles "
                            "(simulated: FLOPs ÷ compute rate + cut-layer bytes ÷ uplink)")
    offline_probability: float = Field(
        0.0, ge=0, lt=1, description="seeded chance that a device is unavailable for a round (not selected)")
    dropout_probability: float = Field(
        0.0, ge=0, lt=1, description="seeded chance that a participant vanishes mid-session (its work discarded)")
    availability_trace: str | None = Field(
        None, description="JSON file {client: [[off_from_s, off_to_s], ...]} on the simulated clock: a device is "
                          "offline in those intervals (needs clock: simulated)")

    @model_validator(mode="after")
    def _one_depth_source(self) -> FleetConfig:
        given = [k for k in ("split_depths", "depth_distribution", "profiles") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of split_depths, depth_distribution, profiles (got {given})")
        if self.depth_distribution is not None:
            if not self.depth_distribution or any(w < 0 for w in self.depth_distribution.values()):
                raise ValueError("depth_distribution needs non-negative weights for at least one depth")
            if sum(self.depth_distribution.values()) <= 0:
                raise ValueError("depth_distribution weights must not all be zero")
        if self.split_depths is not None and not self.split_depths:
            raise ValueError("split_depths must not be empty")
        if self.assignment == "measured" and (self.split_depths is not None or self.depth_distribution is not None):
            raise ValueError("fleet.assignment: measured decides the depths itself; remove fleet.split_depths / "
                             "fleet.depth_distribution (or set fleet.assignment: config)")
        if self.reassign_drift is not None and self.assignment != "measured":
            raise ValueError("fleet.reassign_drift re-decides measured depths: set fleet.assignment: measured")
        if self.quorum > 1 and self.quorum != int(self.quorum):
            raise ValueError(f"quorum {self.quorum}: above 1 it is a count of sessions and must be a whole number")
        if self.availability_trace is not None and self.clock != "simulated":
            raise ValueError("availability_trace runs on the simulated clock: set clock: simulated")
        return self


class HarmonyConfig(_Section):
    """HARMONY's knobs (docs/design.md §3), with the paper's defaults where it gives them."""

    inner_lr: float = Field(
        0.001, gt=0,
        description="α, the meta-adaptation (inner-loop) SGD rate (the paper's value was lost; 0.001 measured "
                    "better than 0.01, benchmarks/RESULTS.md §2)",
    )
    inner_steps: int = Field(1, ge=0, description="m, inner-loop SGD steps per branch")
    csa_weight: float = Field(
        1.0, ge=0,
        description="weight of L_CSA in the server replica's loss (1 against 5 on validation at the reduced scale, "
                    "two seeds; 5 led after 10 rounds only: benchmarks/RESULTS.md §10)",
    )
    csa_margin: float = Field(1.0, gt=0, description="m_c, the CCSA margin")
    negatives: int = Field(32, ge=0, description="sampled different-class pairs per step, beside the within-step pairs")
    stochastic_depth: bool = Field(True, description="sample z¹'s exit depth e ≤ d_i (False: e = d_i)")
    normalize_embeddings: bool = Field(
        True, description="L2-normalise u, v before the CCSA distance (False: raw CCSA, which collapses φ here)"
    )


class TrainConfig(_Section):
    algorithm: str = "splitgp"
    rounds: int = Field(10, ge=1)
    participation: float = Field(1.0, gt=0, le=1)
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="if set, steps per round instead of epochs")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    gamma: float = Field(0.5, ge=0, le=1, description="weight of the on-device loss in the hybrid loss")
    lam: float | None = Field(None, ge=0, le=1, description="personalisation mix; the algorithm's default if unset")
    finetune_lr: float = Field(
        0.001, gt=0, description="on-device fine-tuning / personalisation rate (HARMONY's α; SplitGP+FT uses the same)"
    )
    finetune_steps: int = Field(5, ge=0, description="on-device fine-tuning / personalisation steps")
    finetune_momentum: float = Field(
        0.0, ge=0, lt=1,
        description="momentum of the fine-tuning / personalisation steps (0: plain SGD steps, like the inner loop)",
    )
    feature_dtype: Literal["float16", "float32"] = "float16"
    harmony: HarmonyConfig = Field(default_factory=HarmonyConfig)

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        from harmony.algorithm_names import algorithm_spec

        algorithm_spec(v)  # raises ValueError naming the known algorithms
        return v


TAU_POLICIES = ("oracle", "fixed", "validation", "entropy_quantile", "estimated_mix")
"""How a client's exit threshold τ is chosen (docs/design.md §14); every one the data allows is reported."""


class EvalConfig(_Section):
    taus: list[float] = Field(default_factory=lambda: list(DEFAULT_TAUS))
    fixed_tau: float = Field(0.5, gt=0)
    tau_policy: Literal["oracle", "fixed", "validation", "entropy_quantile", "estimated_mix"] = Field(
        "oracle", description="the τ behind the headline accuracy / offload / latency: oracle (best on the test "
                              "labels, an upper bound), fixed (fixed_tau), validation (best for the expected "
                              "accuracy on the client's own validation pools at that ρ), entropy_quantile "
                              "(label-free: the entropy quantile of its ID validation queries that offloads "
                              "offload_budget of them), estimated_mix "
                              "(the same at the OOD share it estimates from its queries' exit entropies, "
                              "without labels or knowledge of ρ)")
    offload_budget: float = Field(
        0.1, ge=0, le=1, description="entropy_quantile: the fraction of the client's in-distribution validation "
                                     "queries it would offload")
    eval_every: int = Field(0, ge=0, description="full evaluation every N rounds (0: only at the end)")
    server_profile: str = "server"
    client_profiles: list[str] = Field(
        default_factory=lambda: ["pi_zero_2", "pi4", "pi5", "jetson_nano", "jetson_orin_nano"],
        description="profiles for clients by ascending split depth, when the fleet gives no profiles",
    )
    bits_per_element: int = Field(16, ge=1, le=64)
    measure_latency_samples: int = Field(16, ge=0)
    batch_size: int = Field(500, ge=1)

    @field_validator("taus")
    @classmethod
    def _taus_positive(cls, v: list[float]) -> list[float]:
        if not v or any(t <= 0 for t in v):
            raise ValueError("taus must be a non-empty list of positive entropy thresholds")
        return sorted(v)


class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = Field(0, ge=0)
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int | None = Field(None, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _policy_needs_validation(self) -> ExperimentConfig:
        if self.eval.tau_policy not in ("oracle", "fixed") and self.data.val_per_client == 0:
            raise ValueError(f"eval.tau_policy = {self.eval.tau_policy} chooses τ on each client's validation set: "
                             "set data.val_per_client (e.g. 50)")
        return self

    def with_overrides(self, **dotted: Any) -> ExperimentConfig:
        """A copy with dotted keys replaced, validated like a file."""
        raw = self.model_dump()
        for key, value in dotted.items():
            _set_dotted(raw, key, value)
        return validate_config(raw)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        given = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see examples/*.yaml for the keys)"
        lines.append(msg if not e["loc"] else f"{key} = {given!r}: {msg}")  # a whole-config rule names its keys
    return "invalid config:\n  " + "\n  ".join(lines)


EVALUATION_ONLY_KEYS = ("eval", "train.finetune_lr", "train.finetune_steps", "train.finetune_momentum")
"""Config keys that only the final evaluation reads (the τ sweep and policies, latency, the
post-training personalisation): a finished run resumed with other values of them is evaluated
again under the new ones, without retraining — its training is the same."""


def training_view(doc: dict[str, Any]) -> dict[str, Any]:
    """A config dump without :data:`EVALUATION_ONLY_KEYS`: two runs with equal views train alike."""
    out = copy.deepcopy(doc)
    for key in EVALUATION_ONLY_KEYS:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return out


def evaluation_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The evaluation-only keys whose values differ between two config dumps."""
    def get(doc: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            doc = doc.get(part, {}) if isinstance(doc, dict) else {}
        return doc

    return [k for k in EVALUATION_ONLY_KEYS if get(old, k) != get(new, k)]

def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw dict into an :class:`ExperimentConfig` or raise :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` (value read as YAML, so ``0.5``, ``[2,3]`` and ``true`` work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.rounds=5")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot read value {value!r}: {err}") from None
    return key, parsed


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config, apply ``key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    raw = copy.deepcopy(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return validate_config(raw)
