"""HARMONY: meta-adaptation, stochastic early extraction, contrastive semantic alignment
and label-private supervision (docs/design.md §3; the paper's §3.3–3.5).

One local step, as the paper numbers it:
1. two mini-batches ``B¹, B²`` of the client's data;
2. inner loop: from ``θ_i``, ``m`` SGD steps at rate ``α`` of the on-device loss on ``B¹``
   give ``θ_i¹``, on ``B²`` give ``θ_i²``;
3. cross-batch views ``z¹ = f^{≤e}_{θ¹}(x ∈ B²)`` at a sampled depth ``e ≤ d_i`` and
   ``z² = f_{θ²}(x ∈ B¹)`` at ``d_i``, both fp16 on the wire (straight-through);
4. the client sends ``z¹, z²``, ``e`` and the indicators ``s_j = 1[y(B²)_j = y(B¹)_j]``
   (plus sampled different-class pairs) — never labels;
5. server CSA on ``u = φ_e(z¹)``, ``v = φ_{d_i}(z²)`` (L2-normalised by default: with the raw
   embeddings the CCSA positive term collapses φ and the fallback with it — measured, see the
   README), its gradient confined to the replica;
6. U-shaped task training on ``z²`` (logits down, ``∂ℓ/∂logits`` up, ``∂/∂z²`` down);
7. first-order MAML: the gradient taken at ``θ_i²`` is applied to ``θ_i``;
8. after the last round, a few on-device SGD steps from the aggregated model (eq. 5).
Client sides aggregate with λ = 0.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from harmony.algorithms.base import Algorithm, BatchStream, ClientSide, ServerSession, SessionContext, StepStats, sgd
from harmony.algorithms.messages import (
    FeatureGradDown,
    FeaturesUp,
    LogitGradUp,
    LogitsDown,
    decode_gradient,
    encode_gradient,
    to_wire,
)
from harmony.algorithms.splitgp import finetune_on_device
from harmony.config import HarmonyConfig
from harmony.models import ClientModel, ServerModel


def csa_loss(u: torch.Tensor, v: torch.Tensor, same: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """CCSA (Motiian et al. 2017, the authors' code): ``d = sqrt(max(Σ(u−v)², 1e-8))``,
    ``mean[s·d² + (1−s)·max(0, m − d)²]`` over the rows of ``u, v`` (one pair per row)."""
    d = torch.sqrt(torch.clamp(((u - v) ** 2).sum(dim=1), min=1e-8))
    s = same.to(d.dtype)
    return (s * d**2 + (1.0 - s) * torch.clamp(margin - d, min=0.0) ** 2).mean()


class HarmonyClient(ClientSide):
    """Client side of a HARMONY session (steps 1–4, 6 and 7)."""

    def __init__(
        self, model: ClientModel, batches: BatchStream, ctx: SessionContext, gamma: float,
        knobs: HarmonyConfig, inner_steps: int, stochastic_depth: bool,
    ) -> None:
        self.model, self.batches, self.ctx, self.gamma = model, batches, ctx, gamma
        self.knobs, self.inner_steps, self.stochastic_depth = knobs, inner_steps, stochastic_depth
        self.dtype = ctx.train.feature_dtype
        self.optimizer = sgd(model, ctx.train.lr, ctx.train)
        self.stats = StepStats()
        model.train()
        # The two temporary adapted models θ¹, θ² (re-copied from θ every step).
        self.branch1, self.branch2 = copy.deepcopy(model), copy.deepcopy(model)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._theta = [*model.parameters(), *model.buffers()]
        self._branch_tensors = {id(b): [*b.parameters(), *b.buffers()] for b in (self.branch1, self.branch2)}
        self._depth_gen = ctx.generator("exit_depth")
        self._pair_gen = ctx.generator("negative_pairs")
        self._y: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._exit_loss: torch.Tensor | None = None
        self._server_loss, self._server_correct = 0.0, 0

    def _adapt(self, branch: ClientModel, x: torch.Tensor, y: torch.Tensor) -> None:
        """Step 2: ``branch ← θ_i`` then ``m`` plain SGD steps at ``α`` on the on-device loss."""
        with torch.no_grad():
            torch._foreach_copy_(self._branch_tensors[id(branch)], self._theta)
        params = [p for p in branch.parameters() if p.requires_grad]
        for _ in range(self.inner_steps):
            _, logits = branch(x)
            grads = torch.autograd.grad(F.cross_entropy(logits, y), params)
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=-self.knobs.inner_lr)

    def _exit_depth(self) -> int:
        """Step 3's ``e``: uniform over the allowed depths ``≤ d_i`` (or ``d_i`` when disabled)."""
        depths = self.model.exit_depths
        if not self.stochastic_depth or len(depths) == 1:
            return self.model.depth
        return depths[int(torch.randint(len(depths), (1,), generator=self._depth_gen))]

    def _negative_pairs(self, y_view: torch.Tensor, y_task: torch.Tensor) -> torch.Tensor:
        """Up to ``negatives`` random (j, k) with ``y(B²)_j ≠ y(B¹)_k``: indices only, no labels."""
        n = self.knobs.negatives
        candidates = (y_view[:, None] != y_task[None, :]).nonzero()
        if n == 0 or candidates.numel() == 0:
            return torch.zeros((0, 2), dtype=torch.int64)
        pick = torch.randperm(candidates.shape[0], generator=self._pair_gen)[:n]
        return candidates[pick.to(candidates.device)].to(torch.int64)

    def begin_step(self, step: int) -> FeaturesUp:
        x1, y1 = self.batches.next()  # 1. two mini-batches
        x2, y2 = self.batches.next()
        self._adapt(self.branch1, x1, y1)  # 2. inner loop, one adapted model per batch
        self._adapt(self.branch2, x2, y2)
        e = self._exit_depth()  # 3. cross-batch views
        with torch.no_grad():
            z1 = self.branch1.features(x2, e)
        z2 = self.branch2.features(x1)
        if self.gamma > 0:
            exit_logits = self.branch2.exit_head(z2)
            self._exit_loss = F.cross_entropy(exit_logits, y1)
            self.stats.correct_exit += int((exit_logits.detach().argmax(1) == y1).sum())
        self._y, self._z = y1, z2
        return FeaturesUp(  # 4. features, depths and same-label indicators only
            step=step, depth=self.model.depth, features=to_wire(z2, self.dtype),
            view_depth=e, view_features=to_wire(z1, self.dtype),
            same_label=(y2 == y1).to(torch.uint8), negative_pairs=self._negative_pairs(y2, y1),
        )

    def on_logits(self, msg: LogitsDown) -> LogitGradUp:
        # 6. the client scores the server's logits with its private labels
        logits = msg.logits.detach().requires_grad_(True)
        loss = F.cross_entropy(logits, self._y)
        (grad,) = torch.autograd.grad((1.0 - self.gamma) * loss, logits)
        self._server_loss = float(loss.detach())
        self._server_correct = int((logits.detach().argmax(1) == self._y).sum())
        return LogitGradUp(step=msg.step, grad_logits=grad)

    def on_feature_grad(self, msg: FeatureGradDown) -> None:
        grad_z = decode_gradient(msg.grad_features, msg.scale_exp).to(self._z.dtype)
        branch_params = [p for p in self.branch2.parameters() if p.requires_grad]
        for p in branch_params:
            p.grad = None
        if self._exit_loss is not None:
            torch.autograd.backward([self.gamma * self._exit_loss, self._z], [None, grad_z], inputs=branch_params)
            exit_loss = float(self._exit_loss.detach())
        else:
            torch.autograd.backward([self._z], [grad_z], inputs=branch_params)
            exit_loss = 0.0
        # 7. first-order MAML: gradients at θ² update the pre-adaptation θ
        for p, q in zip(self._params, branch_params, strict=True):
            p.grad = q.grad
        self.optimizer.step()
        with torch.no_grad():  # running statistics (BatchNorm) follow the query branch
            for dst, src in zip(self.model.buffers(), self.branch2.buffers(), strict=True):
                dst.copy_(src)
        n = int(self._y.numel())
        self.stats.samples += n
        self.stats.loss_exit += exit_loss * n
        self.stats.loss_server += self._server_loss * n
        self.stats.correct_server += self._server_correct
        self._z = self._exit_loss = self._y = None


class HarmonyServer(ServerSession):
    """Server side of a HARMONY session: CSA (step 5) and U-shaped task training (step 6)."""

    def __init__(self, model: ServerModel, depth: int, ctx: SessionContext, csa_weight: float, margin: float,
                 normalize: bool = True) -> None:
        self.model, self.depth, self.ctx = model, depth, ctx
        self.csa_weight, self.margin, self.normalize = csa_weight, margin, normalize
        self.optimizer = sgd(model, ctx.train.lr, ctx.train)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._z: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._csa: torch.Tensor | None = None
        self.last_csa_loss = 0.0
        model.train()

    def on_features(self, msg: FeaturesUp) -> LogitsDown:
        if msg.depth != self.depth:
            raise ValueError(f"features at depth {msg.depth}, but this session serves depth {self.depth}")
        z2 = msg.features.to(torch.float32).requires_grad_(True)
        v = self.model.embed(z2, self.depth)
        self._z, self._logits = z2, self.model.head(v)
        self._csa = None
        if self.csa_weight > 0 and msg.view_features is not None and msg.same_label is not None:
            # 5. CSA: u = φ_e(stopgrad z¹), v = φ_d(z²); its gradient never reaches z² (see below)
            u = self.model.embed(msg.view_features.to(torch.float32), int(msg.view_depth)).flatten(1)
            v = v.flatten(1)
            if self.normalize:  # see HarmonyConfig.normalize_embeddings and the README
                u, v = F.normalize(u, dim=1), F.normalize(v, dim=1)
            rows = torch.arange(u.shape[0], device=u.device)
            pairs = msg.negative_pairs if msg.negative_pairs is not None else torch.zeros((0, 2), dtype=torch.int64)
            a = torch.cat([rows, pairs[:, 0].to(u.device)])
            b = torch.cat([rows, pairs[:, 1].to(u.device)])
            same = torch.cat([msg.same_label.to(u.device), torch.zeros(pairs.shape[0], dtype=torch.uint8,
                                                                        device=u.device)])
            self._csa = csa_loss(u[a], v[b], same, self.margin)
            self.last_csa_loss = float(self._csa.detach())
        return LogitsDown(step=msg.step, logits=self._logits.detach())

    def on_logit_grad(self, msg: LogitGradUp) -> FeatureGradDown:
        if self._logits is None:
            raise RuntimeError("logit gradient arrived before features")
        grad_logits = msg.grad_logits.to(self._logits.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        if self._csa is None:
            self._logits.backward(grad_logits)
            grad_z = self._z.grad
        else:
            # ∂/∂z² from the task loss alone (CSA is stopped at z²), then the replica's
            # gradient from task + CSA in one pass restricted to the server's parameters.
            (grad_z,) = torch.autograd.grad(self._logits, self._z, grad_logits, retain_graph=True)
            torch.autograd.backward([self._logits, self.csa_weight * self._csa], [grad_logits, None],
                                    inputs=self._params)
        self.optimizer.step()
        grad, exp = encode_gradient(grad_z, self.ctx.train.feature_dtype)
        self._z = self._logits = self._csa = None
        return FeatureGradDown(step=msg.step, grad_features=grad, scale_exp=exp)


class Harmony(Algorithm):
    """HARMONY and its ablations.

    ``csa``: server-side alignment on; ``stochastic_depth``: None follows the config;
    ``inner_steps``: None follows the config (0 = no meta-adaptation); ``fixed_max_depth``:
    every client at the largest split depth; ``lam``: client-side mix (HARMONY: 0).
    """

    def __init__(
        self, name: str, csa: bool = True, stochastic_depth: bool | None = None, inner_steps: int | None = None,
        fixed_max_depth: bool = False, lam: float = 0.0, personalise_after: bool = True,
    ) -> None:
        self.name, self.csa, self.stochastic_depth, self.inner_steps = name, csa, stochastic_depth, inner_steps
        self.fixed_max_depth, self.lam, self.personalise_after = fixed_max_depth, lam, personalise_after

    def client_side(self, model: ClientModel, batches: BatchStream, ctx: SessionContext) -> ClientSide:
        knobs = ctx.train.harmony
        return HarmonyClient(
            model, batches, ctx, ctx.train.gamma, knobs,
            knobs.inner_steps if self.inner_steps is None else self.inner_steps,
            knobs.stochastic_depth if self.stochastic_depth is None else self.stochastic_depth,
        )

    def server_session(self, model: ServerModel, depth: int, ctx: SessionContext) -> ServerSession:
        knobs = ctx.train.harmony
        return HarmonyServer(model, depth, ctx, knobs.csa_weight if self.csa else 0.0, knobs.csa_margin,
                             knobs.normalize_embeddings)

    @property
    def personalises(self) -> bool:
        return self.personalise_after

    def personalise(self, model: ClientModel, batches: BatchStream, ctx: SessionContext) -> None:
        if self.personalise_after:  # 8. eq. 5: a few on-device SGD steps from the aggregated model
            finetune_on_device(model, batches, ctx)
