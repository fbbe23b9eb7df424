"""VGG-11 with BatchNorm for 3×32×32 images (CIFAR-10, CINIC-10), as in the HARMONY paper.

Blocks ``B_1..B_8`` are the eight conv layers, each conv 3×3 (padding 1, with bias) → BN →
ReLU, followed by a 2× max-pool where VGG's configuration "A" has one (after conv1, conv2,
conv4, conv6, conv8), so a 32×32 input leaves 512×1×1 after ``B_8``. The final head is
global average pool (the identity at 32×32) → flatten → Linear(512, classes); there are
no hidden FC layers.

Allowed split depths: 2, 3, 4 (after conv2+pool, conv3, conv4+pool); cut activations of
128×8×8 = 8,192, 256×8×8 = 16,384 and 256×4×4 = 4,096 elements per sample at 32×32.
Exit heads: :class:`ConvExitHead` (2×2 average pool, linear).

At width 1 and 10 classes this reproduces the paper's Table 1 exactly: 9,231,114 parameters
in all; client prefix 76,032 (d=2) / 371,712 (d=3) / 962,304 (d=4), server back end
9,155,082 / 8,859,402 / 8,268,810; exit heads 5,130 / 10,250 / 10,250 — the paper's middle
column (5.1K–10.3K) is this exit-head parameter count.
"""

from __future__ import annotations

from torch import nn

from harmony.models.base import ConvExitHead, MultiExitNet, scaled

# VGG-11 ("A"): output channels of each conv and whether a max-pool follows it.
VGG11_LAYERS: tuple[tuple[int, bool], ...] = (
    (64, True),
    (128, True),
    (256, False),
    (256, True),
    (512, False),
    (512, True),
    (512, False),
    (512, True),
)
SPLIT_DEPTHS = (2, 3, 4)


def _conv_bn(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def build_vgg11_bn(
    width: float = 1.0, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32)
) -> MultiExitNet:
    channels = [scaled(c, width) for c, _ in VGG11_LAYERS]
    blocks: list[nn.Module] = []
    cin = input_shape[0]
    for cout, (_, pool) in zip(channels, VGG11_LAYERS, strict=True):
        blocks.append(_conv_bn(cin, cout, pool))
        cin = cout
    # five 2× max-pools take 32×32 to 1×1; the global pool keeps larger inputs at 512 features
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    exit_heads = {d: ConvExitHead(channels[d - 1], num_classes) for d in SPLIT_DEPTHS}
    return MultiExitNet("vgg11_bn", blocks, head, exit_heads, input_shape, num_classes)
