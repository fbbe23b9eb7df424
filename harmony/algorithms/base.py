"""The one small interface every algorithm implements, and the plain in-process transport.

An algorithm has a client side (:class:`ClientSide`, one per device per round), a server
side (:class:`ServerSession`, one per device per round, owning the server replica
``W_s^i``) and an optional post-training personalisation. One local step is the U-shaped
exchange ``begin_step → on_features → on_logits → on_logit_grad → on_feature_grad``.
The local engine wires the calls together with :func:`run_session`; the distributed
runtime carries the same four messages over MQTT and calls the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from harmony.algorithms.messages import FeatureGradDown, FeaturesUp, LogitGradUp, LogitsDown
from harmony.config import TrainConfig
from harmony.models import ClientModel, ServerModel
from harmony.seeding import torch_generator


@dataclass(frozen=True)
class SessionContext:
    """Who and when: enough to derive every random stream of a (device, round) session."""

    seed: int
    round: int
    device_id: int
    train: TrainConfig
    torch_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def generator(self, purpose: str) -> torch.Generator:
        return torch_generator(self.seed, self.round, self.device_id, purpose)


def batches_per_epoch(samples: int, batch_size: int) -> int:
    """Full batches in one epoch of ``samples`` (a client smaller than a batch is one batch)."""
    return samples // max(1, min(batch_size, samples))


class BatchStream:
    """Mini-batches of one client's data: epochs of seeded permutations, full batches only
    (a client with fewer samples than the batch size gets its whole set as one batch)."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        channels_last: bool = False,
    ) -> None:
        if indices.numel() == 0:
            raise ValueError("a client needs at least one training sample")
        self.x, self.y, self.indices = x, y, indices
        self.batch_size = min(batch_size, indices.numel())
        self.generator = generator
        self.channels_last = channels_last and x.dim() == 4
        self._order: torch.Tensor | None = None
        self._pos = 0

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.indices.numel(), self.batch_size)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._order is None or self._pos + self.batch_size > self._order.numel():
            perm = torch.randperm(self.indices.numel(), generator=self.generator)
            self._order = self.indices[perm.to(self.indices.device)]
            self._pos = 0
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        x = self.x.index_select(0, idx)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.y.index_select(0, idx)


@dataclass
class StepStats:
    """Running training statistics of one client side in one round."""

    samples: int = 0
    loss_exit: float = 0.0
    loss_server: float = 0.0
    correct_exit: int = 0
    correct_server: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, n: int, loss_exit: float, loss_server: float, correct_exit: int, correct_server: int) -> None:
        self.samples += n
        self.loss_exit += loss_exit * n
        self.loss_server += loss_server * n
        self.correct_exit += correct_exit
        self.correct_server += correct_server

    def vector(self) -> list[float]:
        """The five sums a round record is built from, in their fixed order (also their wire form)."""
        return [float(self.samples), float(self.loss_exit), float(self.loss_server), float(self.correct_exit),
                float(self.correct_server)]

    @classmethod
    def from_vector(cls, values: list[float]) -> StepStats:
        if len(values) != 5:
            raise ValueError(f"step statistics need 5 numbers (samples, two losses, two correct counts), "
                             f"got {len(values)}")
        samples, loss_exit, loss_server, correct_exit, correct_server = (float(v) for v in values)
        return cls(int(samples), loss_exit, loss_server, int(correct_exit), int(correct_server))


class ClientSide(ABC):
    """The client half of one (device, round) session."""

    model: ClientModel
    stats: StepStats

    @abstractmethod
    def begin_step(self, step: int) -> FeaturesUp: ...

    @abstractmethod
    def on_logits(self, msg: LogitsDown) -> LogitGradUp: ...

    @abstractmethod
    def on_feature_grad(self, msg: FeatureGradDown) -> None: ...

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


class ServerSession(ABC):
    """The server half of one (device, round) session; owns the replica ``W_s^i``."""

    model: ServerModel

    @abstractmethod
    def on_features(self, msg: FeaturesUp) -> LogitsDown: ...

    @abstractmethod
    def on_logit_grad(self, msg: LogitGradUp) -> FeatureGradDown: ...

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


class Algorithm(ABC):
    """A hybrid-SFL method: how a round's sessions train and how clients are personalised."""

    name: str
    early_exit: bool = True  # inference may exit on device (False: always offload)
    lam: float = 0.0  # personalisation mix of the client side after aggregation
    batches_per_step: int = 1
    fixed_max_depth: bool = False  # ablation: every client at the largest split depth

    @abstractmethod
    def client_side(self, model: ClientModel, batches: BatchStream, ctx: SessionContext) -> ClientSide: ...

    @abstractmethod
    def server_session(self, model: ServerModel, depth: int, ctx: SessionContext) -> ServerSession: ...

    @property
    def personalises(self) -> bool:
        """Whether :meth:`personalise` changes the model (a runtime may skip the work when not)."""
        return False

    def personalise(self, model: ClientModel, batches: BatchStream, ctx: SessionContext) -> None:
        """After the last round: adapt the client model in place (default: nothing)."""

    def steps_per_round(self, batches_per_epoch: int, train: TrainConfig) -> int:
        """Local steps per round for a client with ``batches_per_epoch`` full batches."""
        if train.local_steps is not None:
            return train.local_steps
        return max(1, train.local_epochs * batches_per_epoch // self.batches_per_step)


def sgd(params: list[nn.Parameter] | nn.Module, lr: float, train: TrainConfig,
        momentum: float | None = None) -> torch.optim.SGD:
    """The optimiser every side uses: SGD with the config's weight decay and momentum
    (``train.momentum`` unless ``momentum`` is given)."""
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=train.momentum if momentum is None else momentum,
                           weight_decay=train.weight_decay)


def run_session(client: ClientSide, server: ServerSession, steps: int) -> None:
    """The in-process transport: ``steps`` U-shaped step exchanges, messages passed by reference."""
    for step in range(steps):
        up = client.begin_step(step)
        down = server.on_features(up)
        grad_up = client.on_logits(down)
        client.on_feature_grad(server.on_logit_grad(grad_up))
