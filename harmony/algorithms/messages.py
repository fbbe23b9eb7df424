"""What the client side and the server side of an algorithm hand each other.

These are the payloads of one step exchange (docs/design.md §3, U-shaped split training):
``FeaturesUp`` (client → server), ``LogitsDown``, ``LogitGradUp``, ``FeatureGradDown``.
Neither direction ever carries labels. The local engine passes these objects directly;
the distributed runtime encodes exactly these fields on the wire.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WIRE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class FeaturesUp:
    """Cut-layer features of one step (``z``, or ``z²`` for HARMONY) and HARMONY's extras."""

    step: int
    depth: int  # split depth the features were taken at
    features: torch.Tensor  # fp16 (or fp32) cut-layer activations, batch-first
    view_depth: int | None = None  # HARMONY: the sampled early-exit depth e of z¹
    view_features: torch.Tensor | None = None  # HARMONY: z¹ = f^{≤e}_{θ¹}(x ∈ B²)
    same_label: torch.Tensor | None = None  # HARMONY: s_j = 1[y(B²)_j = y(B¹)_j] (uint8), never labels
    negative_pairs: torch.Tensor | None = None  # HARMONY: [P, 2] int64 (j, k): z¹_j, z²_k differ in class


@dataclass
class LogitsDown:
    """Server logits ``g_d(z)`` for the client to score with its private labels."""

    step: int
    logits: torch.Tensor  # fp32, batch × classes


@dataclass
class LogitGradUp:
    """``∂ℓ/∂logits`` computed on the client (already weighted by ``1−γ``)."""

    step: int
    grad_logits: torch.Tensor  # fp32, batch × classes


@dataclass
class FeatureGradDown:
    """``∂/∂z`` for the client's backward pass, scaled by ``2**scale_exp`` before the cast."""

    step: int
    grad_features: torch.Tensor
    scale_exp: int = 0


def to_wire(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Quantise a tensor for transfer (detached; the backward pass treats this as identity)."""
    return t.detach().to(WIRE_DTYPES[dtype])


def encode_gradient(grad: torch.Tensor, dtype: str) -> tuple[torch.Tensor, int]:
    """Cast a gradient for transfer with a power-of-two scale so fp16 neither overflows nor
    flushes small values to zero. Returns (tensor, exponent); decode with :func:`decode_gradient`."""
    if dtype == "float32":
        return grad.detach().float(), 0
    peak = float(grad.detach().abs().max()) if grad.numel() else 0.0
    exp = 0 if peak == 0.0 or not math.isfinite(peak) else int(math.floor(14.0 - math.log2(peak)))
    exp = max(-24, min(exp, 60))
    return (grad.detach() * (2.0**exp)).to(WIRE_DTYPES[dtype]), exp


def decode_gradient(grad: torch.Tensor, scale_exp: int) -> torch.Tensor:
    g = grad.float()
    return g if scale_exp == 0 else g * (2.0 ** (-scale_exp))
