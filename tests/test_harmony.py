"""HARMONY pinned down step by step (docs/design.md §3)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from harmony.algorithms import BatchStream, SessionContext, parse_algorithm
from harmony.algorithms.harmony import csa_loss
from harmony.algorithms.messages import LogitGradUp
from harmony.config import TrainConfig
from harmony.models import build_model


def test_csa_by_hand():
    u = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4], [1.0, 1.0]])
    same = torch.tensor([1, 0, 0], dtype=torch.uint8)
    # pair 0: same, d = 5 → d² = 25; pair 1: different, d = 0.5 → (1 − 0.5)² = 0.25;
    # pair 2: different, d = sqrt(1e-8) = 1e-4 → (1 − 1e-4)²
    expected = (25.0 + 0.25 + (1 - 1e-4) ** 2) / 3
    assert csa_loss(u, v, same, margin=1.0).item() == pytest.approx(expected, rel=1e-6)
    far = csa_loss(u[:1], v[:1], torch.tensor([0]), margin=1.0)
    assert far.item() == 0.0  # different classes already beyond the margin
    assert csa_loss(u[:1], u[:1], torch.tensor([1])).item() == pytest.approx(1e-8, abs=1e-12)


def _session(algorithm: str, depth: int, seed: int = 0, batch: int = 16, **train):
    torch.manual_seed(seed)
    net = build_model("cnn8", 0.25)
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 3, (64,))
    cfg = TrainConfig(lr=0.01, batch_size=batch, **train)
    ctx = SessionContext(seed, 1, 0, cfg)
    alg = parse_algorithm(algorithm)
    client_model, server_model = net.client_model(depth), net.server_model()
    batches = BatchStream(x, y, torch.arange(64), batch, ctx.generator("batches"))
    return alg, client_model, server_model, batches, ctx


def test_csa_never_reaches_the_client():
    """The cut-layer gradient sent to the client is bit-identical with and without CSA, so
    CSA contributes exactly zero to every client parameter's gradient; yet CSA does move
    the server replica."""
    grads, servers = {}, {}
    for weight in (0.0, 1.0):
        alg, cm, sm, batches, ctx = _session("harmony", 4)
        ctx = SessionContext(0, 1, 0, ctx.train.model_copy(update={
            "harmony": ctx.train.harmony.model_copy(update={"csa_weight": weight})}))
        client, server = alg.client_side(cm, batches, ctx), alg.server_session(sm, 4, ctx)
        up = client.begin_step(0)
        down = server.on_features(up)
        grad_up = client.on_logits(down)
        grads[weight] = server.on_logit_grad(grad_up)
        servers[weight] = copy.deepcopy(sm.state_dict())
        assert up.view_features is not None
    assert torch.equal(grads[0.0].grad_features, grads[1.0].grad_features)
    assert grads[0.0].scale_exp == grads[1.0].scale_exp
    assert any(not torch.equal(servers[0.0][k], servers[1.0][k]) for k in servers[0.0])


def test_csa_alone_gives_a_zero_feature_gradient():
    alg, cm, sm, batches, ctx = _session("harmony", 3)
    client, server = alg.client_side(cm, batches, ctx), alg.server_session(sm, 3, ctx)
    up = client.begin_step(0)
    down = server.on_features(up)
    before = copy.deepcopy(sm.state_dict())
    reply = server.on_logit_grad(LogitGradUp(0, torch.zeros_like(down.logits)))
    assert server.last_csa_loss > 0
    assert not reply.grad_features.any()
    assert any(not torch.equal(before[k], v) for k, v in sm.state_dict().items())


def test_uploads_are_fp16_indicators_and_indices_only():
    alg, cm, sm, batches, ctx = _session("harmony", 4)
    client = alg.client_side(cm, batches, ctx)
    for step in range(5):
        up = client.begin_step(step)
        assert up.features.dtype == torch.float16 and up.view_features.dtype == torch.float16
        assert up.same_label.dtype == torch.uint8 and set(up.same_label.unique().tolist()) <= {0, 1}
        assert up.same_label.shape == (up.features.shape[0],)
        assert up.negative_pairs.shape[1] == 2 and up.negative_pairs.max() < up.features.shape[0]
        server = alg.server_session(sm, 4, ctx)
        down = server.on_features(up)
        # the server computed on exactly the fp16 values
        with torch.no_grad():
            expected = sm(up.features.float(), 4)
        assert torch.equal(down.logits, expected)
        client.on_feature_grad(server.on_logit_grad(client.on_logits(down)))


@pytest.mark.parametrize("depth, expected", [(4, {2, 3, 4}), (3, {2, 3}), (2, {2})])
def test_sampled_exit_depth_covers_allowed_depths(depth, expected):
    alg, cm, sm, batches, ctx = _session("harmony", depth)
    client = alg.client_side(cm, batches, ctx)
    seen = {client._exit_depth() for _ in range(200)}
    assert seen == expected


def test_depth_agnostic_ablation_always_uses_own_depth():
    alg, cm, sm, batches, ctx = _session("harmony(depth-agnostic)", 4)
    client = alg.client_side(cm, batches, ctx)
    assert {client._exit_depth() for _ in range(50)} == {4}


def test_first_order_meta_update_on_a_tiny_model():
    """θ ← θ − lr·∇L(θ²) where θ² = θ − α∇ℓ_exit(θ; B²) and L is the hybrid loss on B¹."""
    alg, cm, sm, batches, ctx = _session("harmony", 2, batch=8, momentum=0.0)
    ctx = SessionContext(0, 1, 0, ctx.train.model_copy(update={"momentum": 0.0}))
    theta = {k: v.clone() for k, v in cm.state_dict().items()}
    replay = BatchStream(batches.x, batches.y, batches.indices, 8, ctx.generator("batches"))
    batches = BatchStream(batches.x, batches.y, batches.indices, 8, ctx.generator("batches"))
    (x1, y1), (x2, y2) = replay.next(), replay.next()
    client, server = alg.client_side(cm, batches, ctx), alg.server_session(copy.deepcopy(sm), 2, ctx)
    client.on_feature_grad(server.on_logit_grad(client.on_logits(server.on_features(client.begin_step(0)))))

    # by hand: one inner step on B² from θ, then the hybrid gradient at θ² on B¹
    ref = copy.deepcopy(cm)
    ref.load_state_dict(theta)
    inner = torch.autograd.grad(F.cross_entropy(ref(x2)[1], y2), list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), inner, strict=True):
            p -= ctx.train.harmony.inner_lr * g
    z = ref.features(x1)
    z_wire = z.detach().half().float().requires_grad_(True)
    server_ref = copy.deepcopy(sm)
    server_loss = F.cross_entropy(server_ref(z_wire, 2), y1)
    (gz,) = torch.autograd.grad((1 - ctx.train.gamma) * server_loss, z_wire)
    loss = ctx.train.gamma * F.cross_entropy(ref.exit_head(z), y1)
    outer = torch.autograd.grad([loss, z], list(ref.parameters()), [None, gz])
    for (name, after), g in zip(cm.named_parameters(), outer, strict=True):
        expected = theta[name] - ctx.train.lr * g
        assert torch.allclose(after, expected, atol=1e-5, rtol=1e-4), name
    moved = max((cm.state_dict()[k] - theta[k]).abs().max().item() for k in theta)
    assert moved > 0 and math.isfinite(moved)


def test_personalisation_is_plain_sgd_steps_at_the_finetune_rate():
    """Eq. 5: ``finetune_steps`` plain SGD steps of the on-device loss at ``finetune_lr`` from the
    aggregated model (no momentum unless ``finetune_momentum`` asks), on the client's own data."""
    alg, cm, _, batches, ctx = _session("harmony", 3, batch=8, finetune_steps=2, finetune_lr=0.05)
    assert ctx.train.finetune_momentum == 0.0
    theta = copy.deepcopy(cm)
    replay = BatchStream(batches.x, batches.y, batches.indices, 8, ctx.generator("personalise"))
    alg.personalise(cm, BatchStream(batches.x, batches.y, batches.indices, 8, ctx.generator("personalise")), ctx)
    for _ in range(2):  # by hand: θ ← θ − lr·∇ℓ(H(f(x)), y), twice
        x, y = replay.next()
        grads = torch.autograd.grad(F.cross_entropy(theta(x)[1], y), list(theta.parameters()))
        with torch.no_grad():
            for p, g in zip(theta.parameters(), grads, strict=True):
                p -= 0.05 * g
    for (name, got), want in zip(cm.named_parameters(), theta.parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), name

    # momentum on request changes the second step
    alg, cm2, _, batches, ctx = _session("harmony", 3, batch=8, finetune_steps=2, finetune_lr=0.05,
                                         finetune_momentum=0.9)
    alg.personalise(cm2, BatchStream(batches.x, batches.y, batches.indices, 8, ctx.generator("personalise")), ctx)
    assert any(not torch.equal(a, b) for a, b in zip(cm2.parameters(), cm.parameters(), strict=True))
