"""ResNet-18 and ResNet-50 (He et al. 2016) as multi-exit templates: one family, two sizes.

ResNet-50 is the paper's backbone (Tiny-ImageNet, 200 classes); ResNet-18 is the one to
train on CPUs. The default stem is CIFAR-style — conv 3×3 stride 1 (no bias) + BN + ReLU,
no max-pool — so 32×32 and 64×64 inputs keep full resolution into ``layer1``;
``stem="imagenet"`` gives torchvision's conv 7×7 stride 2 + BN + ReLU + max-pool 3×3/2
instead (the one the paper's counts imply, below). The layers after the stem are
torchvision's (stride on the 3×3 conv, 1×1 conv + BN projection shortcuts).

Blocks: ``B_1`` the stem, then every residual block (BasicBlock for ResNet-18, Bottleneck
for ResNet-50) is one block, in order ``layer1.0, layer1.1, …, layer4.{last}`` — 9 blocks
for ResNet-18, 17 for ResNet-50. Head: global average pool, Linear(final channels,
classes); the pool is adaptive, so any input size (32×32, 64×64, …) works. Exit heads:
:class:`ConvExitHead` with a global (1×1) pool, which is what the paper's middle column
counts.

ResNet-50, allowed split depths 2, 4, 6 (after layer1.0, layer1.2 = end of layer1,
layer2.1). Cut activations per sample, CIFAR stem: 256×H×W, 256×H×W, 512×(H/2)×(W/2) —
1,048,576 / 1,048,576 / 524,288 at 64×64 (262,144 / 262,144 / 131,072 at 32×32);
ImageNet stem at 64×64: 65,536 / 65,536 / 32,768. Table 1 (thousands, min–max; the
paper's row is Tiny-ImageNet, 200 classes) against this module at width 1:

- client 84.5–884.8: CIFAR stem 76,864 / 217,664 / 877,120 — each exactly 7,680 below the
  paper, the difference between a 3×3 and a 7×7 stem conv (1,728 vs 9,408 weights);
  ``stem="imagenet"`` reproduces it exactly: 84,544 / 225,344 / 884,800.
- server 23033.0–23833.3: exactly 23,833,288 / 23,692,488 / 23,033,032 at 200 classes
  with either stem (the stem is always on the client); the whole network has 23,910,152
  parameters (CIFAR stem) or 23,917,832 (ImageNet stem).
- exit heads 51.4–102.6: exactly 51,400 / 51,400 / 102,600 at 200 classes (256, 256,
  512 channels).

ResNet-18 (no paper row), allowed split depths 2, 3, 5 (after layer1.0, layer1.1 = end of
layer1, layer2.1 = end of layer2), in the same spirit: an early cut, the end of layer1,
and one in layer2. At width 1, CIFAR stem: client 75,840 / 149,824 / 675,392; server
11,098,122 / 11,024,138 / 10,498,570 at 10 classes (11,173,962 in all); cut activations
64×32×32 = 65,536 / 65,536 / 128×16×16 = 32,768 per sample at 32×32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from harmony.models.base import ConvExitHead, MultiExitNet, scaled

Stem = Literal["cifar", "imagenet"]
RESNET18_SPLIT_DEPTHS = (2, 3, 5)  # after layer1.0, layer1.1, layer2.1
RESNET50_SPLIT_DEPTHS = (2, 4, 6)  # after layer1.0, layer1.2, layer2.1


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3×3 convs (the first carrying the stride) with BN; ``planes`` output channels."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand to ``4·planes``; BN after each."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _stem(cin: int, cout: int, stem: Stem) -> nn.Sequential:
    if stem == "cifar":
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )
    if stem == "imagenet":
        return nn.Sequential(
            nn.Conv2d(cin, cout, 7, 2, padding=3, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, padding=1),
        )
    raise ValueError(f"unknown ResNet stem {stem!r}; allowed: 'cifar', 'imagenet'")


def _build_resnet(
    family: str,
    block: type[BasicBlock] | type[Bottleneck],
    repeats: tuple[int, int, int, int],
    split_depths: tuple[int, ...],
    width: float,
    num_classes: int,
    input_shape: tuple[int, int, int],
    stem: Stem,
) -> MultiExitNet:
    cin = scaled(64, width)
    blocks: list[nn.Module] = [_stem(input_shape[0], cin, stem)]
    channels = [cin]  # output channels of each block
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), repeats, strict=True)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(block(cin, scaled(planes, width), stride))
            cin = scaled(planes, width) * block.expansion
            channels.append(cin)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    exit_heads = {d: ConvExitHead(channels[d - 1], num_classes, pool=1) for d in split_depths}
    return MultiExitNet(family, blocks, head, exit_heads, input_shape, num_classes)


def build_resnet18(
    width: float = 1.0,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    stem: Stem = "cifar",
) -> MultiExitNet:
    return _build_resnet(
        "resnet18", BasicBlock, (2, 2, 2, 2), RESNET18_SPLIT_DEPTHS, width, num_classes, input_shape, stem
    )


def build_resnet50(
    width: float = 1.0,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    stem: Stem = "cifar",
) -> MultiExitNet:
    return _build_resnet(
        "resnet50", Bottleneck, (3, 4, 6, 3), RESNET50_SPLIT_DEPTHS, width, num_classes, input_shape, stem
    )
