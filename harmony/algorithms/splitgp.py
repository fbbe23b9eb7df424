"""SplitGP and the baselines that are special cases of it.

One U-shaped step (docs/design.md §3, label-private from the start):
the client sends ``z = f_i(x)`` (fp16); the server answers ``g_d(z)``; the client scores
the logits with its private labels and returns ``(1−γ)·∂ℓ/∂logits``; the server
back-propagates, updates its replica and returns ``∂/∂z``; the client back-propagates it
together with ``γ·ℓ(H_d(z), y)`` and updates ``f_i`` and ``H_d``.

- SplitFed v1: no exit head (γ = 0), both sides generalised (λ = 0), always offloads.
- Multi-exit SFL: γ = 0.5, λ = 0.
- SplitGP(λ): γ = 0.5, the client side mixed as ``λ·local + (1−λ)·avg``.
- SplitGP + FT: SplitGP(λ = 0) then on-device fine-tuning with the personalisation
  rate and steps (``train.finetune_lr``, ``train.finetune_steps``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harmony.algorithms.base import (
    Algorithm,
    BatchStream,
    ClientSide,
    ServerSession,
    SessionContext,
    StepStats,
    sgd,
)
from harmony.algorithms.messages import (
    FeatureGradDown,
    FeaturesUp,
    LogitGradUp,
    LogitsDown,
    decode_gradient,
    encode_gradient,
    to_wire,
)
from harmony.models import ClientModel, ServerModel


class SplitClient(ClientSide):
    """Client side of a SplitGP-family session."""

    def __init__(self, model: ClientModel, batches: BatchStream, ctx: SessionContext, gamma: float) -> None:
        self.model, self.batches, self.ctx, self.gamma = model, batches, ctx, gamma
        self.dtype = ctx.train.feature_dtype
        self.optimizer = sgd(model, ctx.train.lr, ctx.train)
        self.stats = StepStats()
        self._y: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._exit_loss: torch.Tensor | None = None
        self._server_loss = 0.0
        self._server_correct = 0
        self.model.train()

    def begin_step(self, step: int) -> FeaturesUp:
        x, y = self.batches.next()
        z = self.model.features(x)
        if self.gamma > 0:
            exit_logits = self.model.exit_head(z)
            self._exit_loss = F.cross_entropy(exit_logits, y)
            self.stats.correct_exit += int((exit_logits.argmax(1) == y).sum())
        self._y, self._z = y, z
        return FeaturesUp(step=step, depth=self.model.depth, features=to_wire(z, self.dtype))

    def on_logits(self, msg: LogitsDown) -> LogitGradUp:
        logits = msg.logits.detach().requires_grad_(True)
        loss = F.cross_entropy(logits, self._y)
        (grad,) = torch.autograd.grad((1.0 - self.gamma) * loss, logits)
        self._server_loss = float(loss.detach())
        self._server_correct = int((logits.detach().argmax(1) == self._y).sum())
        return LogitGradUp(step=msg.step, grad_logits=grad)

    def on_feature_grad(self, msg: FeatureGradDown) -> None:
        grad_z = decode_gradient(msg.grad_features, msg.scale_exp).to(self._z.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        if self._exit_loss is not None:
            torch.autograd.backward([self.gamma * self._exit_loss, self._z], [None, grad_z])
            exit_loss = float(self._exit_loss.detach())
        else:
            self._z.backward(grad_z)
            exit_loss = 0.0
        self.optimizer.step()
        n = int(self._y.numel())
        self.stats.samples += n
        self.stats.loss_exit += exit_loss * n
        self.stats.loss_server += self._server_loss * n
        self.stats.correct_server += self._server_correct
        self._z = self._exit_loss = self._y = None


class SplitServer(ServerSession):
    """Server side of a SplitGP-family session: task training of the replica only."""

    def __init__(self, model: ServerModel, depth: int, ctx: SessionContext) -> None:
        self.model, self.depth, self.ctx = model, depth, ctx
        self.optimizer = sgd(model, ctx.train.lr, ctx.train)
        self._z: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self.model.train()

    def on_features(self, msg: FeaturesUp) -> LogitsDown:
        if msg.depth != self.depth:
            raise ValueError(f"features at depth {msg.depth}, but this session serves depth {self.depth}")
        z = msg.features.to(torch.float32).requires_grad_(True)
        self._z = z
        self._logits = self.model(z, self.depth)
        return LogitsDown(step=msg.step, logits=self._logits.detach())

    def on_logit_grad(self, msg: LogitGradUp) -> FeatureGradDown:
        if self._logits is None:
            raise RuntimeError("logit gradient arrived before features")
        self.optimizer.zero_grad(set_to_none=True)
        self._logits.backward(msg.grad_logits.to(self._logits.dtype))
        self.optimizer.step()
        grad, exp = encode_gradient(self._z.grad, self.ctx.train.feature_dtype)
        self._z = self._logits = None
        return FeatureGradDown(step=msg.step, grad_features=grad, scale_exp=exp)


def finetune_on_device(model: ClientModel, batches: BatchStream, ctx: SessionContext) -> None:
    """A few SGD steps of the on-device loss ``ℓ(H_d(f(x)), y)`` on local data
    (``train.finetune_steps`` at ``train.finetune_lr``; plain SGD unless ``train.finetune_momentum``).

    Plain steps by default: they are the few-step adaptation HARMONY's inner loop rehearses
    (eq. 3 → eq. 5), and with momentum 0.9 five steps overshoot enough to wreck the server
    fallback for every method (measured, benchmarks/RESULTS.md §2)."""
    train = ctx.train
    if train.finetune_steps == 0:
        return
    optimizer = sgd(model, train.finetune_lr, train, momentum=train.finetune_momentum)
    model.train()
    with torch.enable_grad():  # callers may be inside no_grad (evaluation, reports)
        for _ in range(train.finetune_steps):
            x, y = batches.next()
            _, logits = model(x)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(logits, y).backward()
            optimizer.step()


class SplitGP(Algorithm):
    """The SplitGP family: ``gamma`` (None: the config's), ``lam``, early exit, fine-tuning."""

    def __init__(
        self, name: str, lam: float, gamma: float | None = None, early_exit: bool = True, finetune: bool = False
    ) -> None:
        self.name, self.lam, self.gamma = name, lam, gamma
        self.early_exit, self.finetune = early_exit, finetune

    def _gamma(self, ctx: SessionContext) -> float:
        return ctx.train.gamma if self.gamma is None else self.gamma

    def client_side(self, model: ClientModel, batches: BatchStream, ctx: SessionContext) -> ClientSide:
        return SplitClient(model, batches, ctx, self._gamma(ctx))

    def server_session(self, model: ServerModel, depth: int, ctx: SessionContext) -> ServerSession:
        return SplitServer(model, depth, ctx)

    @property
    def personalises(self) -> bool:
        return self.finetune

    def personalise(self, model: ClientModel, batches: BatchStream, ctx: SessionContext) -> None:
        if self.finetune:
            finetune_on_device(model, batches, ctx)
