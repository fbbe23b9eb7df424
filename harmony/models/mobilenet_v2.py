"""MobileNetV2 for 3×32×32 images (CIFAR-10/100), as in the HARMONY paper.

CIFAR-style: the stem conv has stride 1 (ImageNet's has 2); every other layer is the
ImageNet MobileNetV2 (Sandler et al. 2018, width 1.0, torchvision's layout), so a 32×32
input leaves 1280×2×2 before the head. Blocks are the stages of the MobileNetV2 table:

    B_1 stem conv 3×3 3→32 + BN + ReLU6                              (split d=1)
    B_2 inverted residuals t=1, c=16,  n=1, s=1
    B_3 inverted residuals t=6, c=24,  n=2, s=2
    B_4 inverted residuals t=6, c=32,  n=3, s=2                      (split d=4)
    B_5 inverted residuals t=6, c=64,  n=4, s=2                      (split d=5)
    B_6 inverted residuals t=6, c=96,  n=3, s=1
    B_7 inverted residuals t=6, c=160, n=3, s=2
    B_8 inverted residuals t=6, c=320, n=1, s=1
    B_9 conv 1×1 320→1280 + BN + ReLU6
    head: global average pool, Linear(1280, classes)

Allowed split depths: 1, 4, 5; cut activations of 32×32×32 = 32,768, 32×8×8 = 2,048 and
64×4×4 = 1,024 elements per sample at 32×32. Exit heads: :class:`ConvExitHead` with a
global (1×1) pool, which is what the paper's middle column counts (below). The middle
depth sits after the 32-channel stage because an exit on 16 or 24 channels would be
smaller than the paper's smallest exit head (3.3K).

Table 1 (thousands, min–max over depths) against this module at width 1:

- client 0.9–239.4: exactly 928 (d=1) / 55,488 (d=4) / 239,360 (d=5) — the stem, and
  the prefix through the last 64-channel inverted residual.
- server 2112.6–2351.0: the paper's row is with 100 classes (CIFAR-100): the whole
  network has 2,351,972 parameters there, and the server back end is exactly 2,351,044 /
  2,296,484 / 2,112,612. With 10 classes the head is 115,290 smaller: 2,236,682 in all,
  server 2,235,754 / 2,181,194 / 1,997,322.
- exit heads 3.3–6.5: exactly 3,300 / 3,300 / 6,500 at 100 classes (global pool + linear
  on 32, 32, 64 channels; 330 / 330 / 650 at 10 classes).
"""

from __future__ import annotations

import torch
from torch import nn

from harmony.models.base import ConvExitHead, MultiExitNet, scaled

# (expansion t, output channels c, repeats n, first stride s) per stage, as in the paper.
MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
SPLIT_DEPTHS = (1, 4, 5)


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(nn.Module):
    """Expand 1×1 (when t > 1) → depthwise 3×3 → linear project 1×1; skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_bn_relu6(cin, hidden)
        layers += _conv_bn_relu6(hidden, hidden, kernel=3, stride=stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def build_mobilenet_v2(
    width: float = 1.0, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32)
) -> MultiExitNet:
    stem = scaled(32, width)
    blocks: list[nn.Module] = [nn.Sequential(*_conv_bn_relu6(input_shape[0], stem, kernel=3))]
    channels = [stem]  # output channels of each block
    cin = stem
    for expansion, c, repeats, stride in MOBILENET_V2_STAGES:
        cout = scaled(c, width)
        stage = [
            InvertedResidual(cin if i == 0 else cout, cout, stride if i == 0 else 1, expansion)
            for i in range(repeats)
        ]
        blocks.append(nn.Sequential(*stage))
        channels.append(cout)
        cin = cout
    last = scaled(1280, width)
    blocks.append(nn.Sequential(*_conv_bn_relu6(cin, last)))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes))
    exit_heads = {d: ConvExitHead(channels[d - 1], num_classes, pool=1) for d in SPLIT_DEPTHS}
    return MultiExitNet("mobilenet_v2", blocks, head, exit_heads, input_shape, num_classes)
