"""ViT-S (Dosovitskiy et al. 2021; DeiT-S sizes) as a multi-exit template.

Dim 384, 12 pre-norm encoder blocks, 6 heads, MLP 1536 with GELU, a class token and
learned position embeddings (timm's ``vit_small_patch16_224`` layout, parameter for
parameter). The patch size defaults to ``side // 8`` — 4 at 32×32, 8 at 64×64 — so the
sequence is always 64 patch tokens plus the class token (65×384 = 24,960 elements).

Blocks: ``B_1`` the patch embedding (conv patchify + class token + position embedding),
``B_2..B_13`` the encoder blocks. Head: LayerNorm, Linear on the class token. Exit heads:
:class:`TokenExitHead` (mean over all tokens, LayerNorm, Linear). Attention is written
out (``q @ kᵀ``, softmax, ``@ v``) rather than calling ``scaled_dot_product_attention``,
because torch's FLOP counter does not count the fused CPU kernel and the cost table must.

Allowed split depths: 3, 5, 7 (after encoder blocks 2, 4, 6); the cut is the whole token
sequence, so its size is the same at every depth: 24,960 elements at the default patch size.

Table 1 (thousands, min–max; the paper's row is with 100 classes, CIFAR-100) against
this module at width 1, 100 classes:

- server 10686.1–17783.9: exactly 17,783,908 / 14,234,980 / 10,686,052 (encoder blocks
  are 1,774,464 parameters each; the head is 39,268); at 10 classes 34,650 fewer.
- exit heads 39.3: exactly 39,268 at every depth.
- client 3920.3–11018.1: the paper's counts imply a 224×224 input with 16×16 patches (a
  768→384 patch projection and 197 positions, 371,328 parameters in ``B_1``); at
  ``input_shape=(3, 224, 224), patch_size=16`` this module reproduces them exactly:
  3,920,256 / 7,469,184 / 11,018,112. At the default 32×32 with 4×4 patches ``B_1`` has
  44,160, so the client is 3,593,088 / 7,142,016 / 10,690,944 — 327,168 below the paper
  (8.3% at the shallowest depth, 3.0% at the deepest); at 64×64 with 8×8 patches it is
  3,648,384 / 7,197,312 / 10,746,240.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from harmony.models.base import MultiExitNet, TokenExitHead, scaled

DIM, DEPTH, HEADS, MLP_RATIO = 384, 12, 6, 4
SPLIT_DEPTHS = (3, 5, 7)


class PatchEmbedding(nn.Module):
    """``B_1``: non-overlapping patches projected to ``dim``, a class token, learned positions."""

    def __init__(self, channels: int, dim: int, patch_size: int, num_patches: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embedding


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.heads))
        y = att.softmax(dim=-1) @ v  # (B, heads, T, head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassTokenHead(nn.Module):
    """The final head: LayerNorm, then a linear classifier on the class token."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x)[:, 0])


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def build_vit_s(
    width: float = 1.0,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    patch_size: int | None = None,
) -> MultiExitNet:
    """ViT-S at ``input_shape``; ``patch_size`` defaults to ``side // 8`` (64 patch tokens)."""
    channels, height, side = input_shape
    patch = patch_size if patch_size is not None else side // 8
    if patch < 1 or height % patch or side % patch:
        raise ValueError(
            f"vit_s: patch size {patch} must divide the input's {height}×{side}; "
            "pass patch_size, or an input side that is a multiple of 8"
        )
    dim = HEADS * scaled(DIM // HEADS, width)  # scale the head dim so dim stays divisible by heads
    blocks: list[nn.Module] = [PatchEmbedding(channels, dim, patch, (height // patch) * (side // patch))]
    blocks += [EncoderBlock(dim, HEADS, MLP_RATIO * dim) for _ in range(DEPTH)]
    head = ClassTokenHead(dim, num_classes)
    exit_heads = {d: TokenExitHead(dim, num_classes) for d in SPLIT_DEPTHS}
    net = MultiExitNet("vit_s", blocks, head, exit_heads, input_shape, num_classes)
    net.apply(_init_weights)
    return net
