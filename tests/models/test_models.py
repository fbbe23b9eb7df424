"""Backbone families: the paper's Table 1 counts, hand-counted FLOPs, and split consistency.

Width-1 models are only built on the meta device (shapes and parameter counts, no memory,
no compute); forward passes use small widths.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from harmony.models import FAMILIES, MultiExitNet, build_model, cost_table
from harmony.models.cnn8 import build_cnn8
from harmony.models.mobilenet_v2 import build_mobilenet_v2
from harmony.models.resnet import build_resnet18, build_resnet50
from harmony.models.vgg11_bn import build_vgg11_bn
from harmony.models.vit_s import build_vit_s


def _numel(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@dataclass(frozen=True)
class Counts:
    """Per allowed depth, in order: client prefix, server back end, exit head, cut elements."""

    depths: tuple[int, ...]
    client: tuple[int, ...]
    server: tuple[int, ...]
    exit_head: tuple[int, ...]
    cut: tuple[int, ...]


def _counts(net: MultiExitNet) -> Counts:
    """Counts measured from a (meta-device) template: parameters by block, cut sizes by shape."""
    backbone = _numel([*net.blocks, net.head])
    cuts, z = [], torch.empty((1, *net.input_shape), device="meta")
    with torch.no_grad():
        for j, block in enumerate(net.eval().blocks, start=1):
            z = block(z)
            if j in net.split_depths:
                cuts.append(z[0].numel())
    client = tuple(_numel(list(net.blocks[:d])) for d in net.split_depths)
    return Counts(
        depths=net.split_depths,
        client=client,
        server=tuple(backbone - c for c in client),
        exit_head=tuple(_numel([net.exit_heads[str(d)]]) for d in net.split_depths),
        cut=tuple(cuts),
    )


def _meta(build: Callable[..., MultiExitNet], **kwargs) -> MultiExitNet:
    with torch.device("meta"):
        return build(**kwargs)


# --- the paper's Table 1 ------------------------------------------------------------------

# Table 1 in thousands, (min, max) over depths: client, exit head, server parameters.
PAPER = {
    "cnn8": ((18.8, 387.8), (5.8, 23.1), (3480.3, 3849.4)),
    "vgg11_bn": ((76.0, 962.3), (5.1, 10.3), (8268.8, 9155.1)),
    "mobilenet_v2": ((0.9, 239.4), (3.3, 6.5), (2112.6, 2351.0)),
    "resnet50": ((84.5, 884.8), (51.4, 102.6), (23033.0, 23833.3)),
    "vit_s": ((3920.3, 11018.1), (39.3, 39.3), (10686.1, 17783.9)),
}


@dataclass(frozen=True)
class Table1Case:
    name: str
    build: Callable[..., MultiExitNet]
    kwargs: dict
    counts: Counts
    paper: str | None = None  # family row of PAPER these counts are compared with
    exact: tuple[str, ...] = ()  # columns that round to the paper's value exactly
    client_tolerance: float = 0.0  # relative; for client counts that are not exact


TABLE1_CASES = [
    Table1Case(
        "cnn8",
        build_cnn8,
        {},
        Counts(
            (2, 3, 4),
            (18_816, 92_672, 387_840),
            (3_849_354, 3_775_498, 3_480_330),
            (5_770, 11_530, 23_050),
            (12_544, 6_272, 2_304),
        ),
        paper="cnn8",
        exact=("client", "server", "exit_head"),  # 3×3-pooled exit heads: the paper's 5.8K–23.1K
    ),
    Table1Case(
        "vgg11_bn",
        build_vgg11_bn,
        {},
        Counts(
            (2, 3, 4),
            (76_032, 371_712, 962_304),
            (9_155_082, 8_859_402, 8_268_810),
            (5_130, 10_250, 10_250),
            (8_192, 16_384, 4_096),
        ),
        paper="vgg11_bn",
        exact=("client", "server", "exit_head"),
    ),
    Table1Case(  # the paper's MobileNetV2 row is CIFAR-100
        "mobilenet_v2-100",
        build_mobilenet_v2,
        {"num_classes": 100},
        Counts(
            (1, 4, 5),
            (928, 55_488, 239_360),
            (2_351_044, 2_296_484, 2_112_612),
            (3_300, 3_300, 6_500),
            (32_768, 2_048, 1_024),
        ),
        paper="mobilenet_v2",
        exact=("client", "server", "exit_head"),
    ),
    Table1Case(
        "mobilenet_v2-10",
        build_mobilenet_v2,
        {},
        Counts(
            (1, 4, 5),
            (928, 55_488, 239_360),
            (2_235_754, 2_181_194, 1_997_322),
            (330, 330, 650),
            (32_768, 2_048, 1_024),
        ),
    ),
    Table1Case(  # Tiny-ImageNet, CIFAR stem: the client is 7,680 short (3×3 vs 7×7 stem conv)
        "resnet50-cifar-stem",
        build_resnet50,
        {"num_classes": 200, "input_shape": (3, 64, 64)},
        Counts(
            (2, 4, 6),
            (76_864, 217_664, 877_120),
            (23_833_288, 23_692_488, 23_033_032),
            (51_400, 51_400, 102_600),
            (1_048_576, 1_048_576, 524_288),
        ),
        paper="resnet50",
        exact=("server", "exit_head"),
        client_tolerance=0.10,
    ),
    Table1Case(
        "resnet50-imagenet-stem",
        build_resnet50,
        {"num_classes": 200, "input_shape": (3, 64, 64), "stem": "imagenet"},
        Counts(
            (2, 4, 6),
            (84_544, 225_344, 884_800),
            (23_833_288, 23_692_488, 23_033_032),
            (51_400, 51_400, 102_600),
            (65_536, 65_536, 32_768),
        ),
        paper="resnet50",
        exact=("client", "server", "exit_head"),
    ),
    Table1Case(
        "resnet18",
        build_resnet18,
        {},
        Counts(
            (2, 3, 5),
            (75_840, 149_824, 675_392),
            (11_098_122, 11_024_138, 10_498_570),
            (650, 650, 1_290),
            (65_536, 65_536, 32_768),
        ),
    ),
    Table1Case(  # CIFAR-100 at 32×32 with 4×4 patches: the patch embedding is smaller
        "vit_s-32",
        build_vit_s,
        {"num_classes": 100},
        Counts(
            (3, 5, 7),
            (3_593_088, 7_142_016, 10_690_944),
            (17_783_908, 14_234_980, 10_686_052),
            (39_268,) * 3,
            (24_960,) * 3,
        ),
        paper="vit_s",
        exact=("server", "exit_head"),
        client_tolerance=0.10,
    ),
    Table1Case(
        "vit_s-64",
        build_vit_s,
        {"num_classes": 200, "input_shape": (3, 64, 64)},
        Counts(
            (3, 5, 7),
            (3_648_384, 7_197_312, 10_746_240),
            (17_822_408, 14_273_480, 10_724_552),
            (77_768,) * 3,
            (24_960,) * 3,
        ),
    ),
    Table1Case(  # the input the paper's ViT-S counts imply
        "vit_s-224",
        build_vit_s,
        {"num_classes": 100, "input_shape": (3, 224, 224), "patch_size": 16},
        Counts(
            (3, 5, 7),
            (3_920_256, 7_469_184, 11_018_112),
            (17_783_908, 14_234_980, 10_686_052),
            (39_268,) * 3,
            (75_648,) * 3,
        ),
        paper="vit_s",
        exact=("client", "server", "exit_head"),
    ),
]


def _thousands(count: int) -> float:
    """A count in thousands to one decimal, half rounded up as the paper does (10,250 -> 10.3)."""
    return ((count + 50) // 100) / 10


@pytest.mark.parametrize("case", TABLE1_CASES, ids=lambda c: c.name)
def test_table1_counts(case: Table1Case) -> None:
    counts = _counts(_meta(case.build, **case.kwargs))
    assert counts == case.counts
    if case.paper is None:
        return
    paper = dict(zip(("client", "exit_head", "server"), PAPER[case.paper], strict=True))
    for column, (low, high) in paper.items():
        achieved = getattr(counts, column)
        in_thousands = (_thousands(min(achieved)), _thousands(max(achieved)))
        if column in case.exact:
            assert in_thousands == (low, high), column
        elif column == "client":
            assert min(achieved) == pytest.approx(low * 1000, rel=case.client_tolerance)
            assert max(achieved) == pytest.approx(high * 1000, rel=case.client_tolerance)


def test_cnn8_backbone_total() -> None:
    net = _meta(build_cnn8)
    assert _numel([*net.blocks, net.head]) == 3_868_170
    assert len(net.blocks) == 7


def test_vgg11_bn_total_matches_table1_row() -> None:
    net = _meta(build_vgg11_bn)
    assert _numel([*net.blocks, net.head]) == 76_032 + 9_155_082 == 962_304 + 8_268_810


# --- cnn8 cost table against a hand count -------------------------------------------------


def _conv(side: int, cin: int, cout: int) -> int:
    return 2 * side * side * cout * cin * 3 * 3  # per sample; bias, ReLU and pooling not counted


def _linear(fan_in: int, fan_out: int) -> int:
    return 2 * fan_in * fan_out


def test_cnn8_cost_table_against_hand_count() -> None:
    layer_flops = [
        _conv(28, 1, 32),  # B1 conv1 at 28×28
        _conv(28, 32, 64),  # B2 conv2 at 28×28, then pool to 14
        _conv(14, 64, 128),  # B3 conv3 at 14×14, then pool to 7
        _conv(7, 128, 256),  # B4 conv4 at 7×7, then pool to 3
        _conv(3, 256, 256),  # B5 conv5 at 3×3
        _linear(2304, 1024),  # B6 fc1
        _linear(1024, 512),  # B7 fc2
        _linear(512, 10),  # head
    ]
    assert layer_flops == [
        451_584,
        28_901_376,
        28_901_376,
        28_901_376,
        10_616_832,
        4_718_592,
        1_048_576,
        10_240,
    ]
    table = cost_table(build_cnn8())
    assert sorted(table) == [2, 3, 4]
    exit_channels = {2: 64, 3: 128, 4: 256}
    for d, cost in table.items():
        assert cost.client_flops == sum(layer_flops[:d])
        assert cost.server_flops == sum(layer_flops[d:])
        assert cost.exit_head_flops == _linear(exit_channels[d] * 3 * 3, 10)  # 3×3 pool, then linear
    assert [table[d].client_flops for d in (2, 3, 4)] == [29_352_960, 58_254_336, 87_155_712]
    assert [table[d].server_flops for d in (2, 3, 4)] == [74_196_992, 45_295_616, 16_394_240]
    assert [table[d].exit_head_flops for d in (2, 3, 4)] == [11_520, 23_040, 46_080]
    assert [table[d].cut_elements for d in (2, 3, 4)] == [12_544, 6_272, 2_304]
    assert [table[d].client_params for d in (2, 3, 4)] == [18_816, 92_672, 387_840]
    assert [table[d].server_params for d in (2, 3, 4)] == [3_849_354, 3_775_498, 3_480_330]
    assert [table[d].exit_head_params for d in (2, 3, 4)] == [5_770, 11_530, 23_050]
    assert table[2].client_param_bytes == 4 * (18_816 + 5_770)


def test_vit_cost_table_counts_attention() -> None:
    # width 0.125: dim 48, MLP 192, 64 patch tokens of 4×4×3 plus the class token
    dim, tokens = 48, 65
    patch_embedding = 2 * 64 * (4 * 4 * 3) * dim  # the conv patchify; position adds are not counted
    encoder_block = (
        _linear(dim, 3 * dim) * tokens  # qkv
        + 2 * (2 * tokens * tokens * dim)  # q @ kᵀ and att @ v over all heads
        + _linear(dim, dim) * tokens  # attention output projection
        + (_linear(dim, 4 * dim) + _linear(4 * dim, dim)) * tokens  # MLP
    )
    table = cost_table(build_vit_s(width=0.125))
    for d, cost in table.items():
        assert cost.client_flops == patch_embedding + (d - 1) * encoder_block
        assert cost.server_flops == (13 - d) * encoder_block + _linear(dim, 10)
        assert cost.exit_head_flops == _linear(dim, 10)
        assert cost.cut_elements == tokens * dim


# --- split consistency for every family (small widths) --------------------------------------

# family -> (small-width kwargs for forward passes, embedding shape per sample at that width)
SMALL = {
    "cnn8": ({"width": 0.25}, (128,)),
    "vgg11_bn": ({"width": 0.125}, (64, 1, 1)),
    "mobilenet_v2": ({"width": 0.25}, (320, 2, 2)),
    "resnet18": ({"width": 0.125}, (64, 4, 4)),
    "resnet50": ({"width": 0.0625, "input_shape": (3, 32, 32)}, (128, 4, 4)),
    "vit_s": ({"width": 0.125}, (65, 48)),
}


def test_every_family_is_registered_and_covered() -> None:
    assert (
        set(FAMILIES) == set(SMALL) == {"cnn8", "vgg11_bn", "mobilenet_v2", "resnet18", "resnet50", "vit_s"}
    )


def _small_template(family: str) -> tuple[MultiExitNet, torch.Tensor]:
    torch.manual_seed(0)
    net = build_model(family, **SMALL[family][0])
    x = torch.randn(2, *net.input_shape)
    with torch.no_grad():
        net.train()(x)  # move BatchNorm running statistics off their initial values
    return net.eval(), x


def _owner(key: str) -> str:
    """The template module a state-dict key belongs to: ``blocks.{j}``, ``exit_heads.{d}`` or ``head``."""
    parts = key.split(".")
    return parts[0] if parts[0] == "head" else ".".join(parts[:2])


def _prefix(net: MultiExitNet, x: torch.Tensor, depth: int) -> torch.Tensor:
    for block in net.blocks[:depth]:
        x = block(x)
    return x


@pytest.mark.slow  # long: out of make test-fast
@pytest.mark.parametrize("family", sorted(SMALL))
def test_split_views_reproduce_the_template(family: str) -> None:
    net, x = _small_template(family)
    template_keys = net.state_dict()
    server = net.server_model().eval()
    with torch.no_grad():
        full = net(x)
        assert full.shape == (2, net.num_classes)
        for key, value in server.state_dict().items():
            assert torch.equal(value, template_keys[key]), key
        for d in net.split_depths:
            client = net.client_model(d).eval()
            state = client.state_dict()
            assert {_owner(k) for k in state} == {f"blocks.{j}" for j in range(d)} | {f"exit_heads.{d}"}
            for key, value in state.items():
                assert torch.equal(value, template_keys[key]), key
            z, exit_logits = client(x)
            assert torch.allclose(z, _prefix(net, x, d), atol=1e-5)
            assert torch.allclose(exit_logits, net.exit_heads[str(d)](z), atol=1e-5)
            assert exit_logits.shape == (2, net.num_classes)
            for e in range(1, d + 1):  # stochastic early extraction reads any shallower prefix
                assert torch.allclose(client.features(x, e), _prefix(net, x, e), atol=1e-5)
            assert torch.allclose(server(client.features(x), d), full, atol=1e-4, rtol=1e-4)
            embedding = server.embed(z, d)
            assert embedding.shape == (2, *SMALL[family][1])
            assert torch.allclose(net.head(embedding), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_server_holds_the_largest_back_end(family: str) -> None:
    net = _meta(build_model, family=family, **SMALL[family][0])
    first = net.split_depths[0]
    expected = {f"blocks.{j}" for j in range(first, net.num_blocks)} | {"head"}
    keys = net.server_keys()
    assert set(keys) <= set(net.state_dict())
    assert {_owner(k) for k in keys} == expected


@pytest.mark.parametrize("family", sorted(SMALL))
def test_disallowed_depth_names_the_allowed_ones(family: str) -> None:
    net = _meta(build_model, family=family, **SMALL[family][0])
    allowed = list(net.split_depths)
    server = net.server_model()
    for bad in (d for d in range(net.num_blocks + 1) if d not in allowed):
        with pytest.raises(ValueError, match=re.escape(f"allowed: {allowed}")):
            net.client_model(bad)
        with pytest.raises(ValueError, match=re.escape(f"allowed: {allowed}")):
            server.embed(torch.empty(1, device="meta"), bad)


def test_unknown_family_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown model family 'resnet34'") as excinfo:
        build_model("resnet34")
    for family in FAMILIES:
        assert family in str(excinfo.value)


def test_resnet_rejects_unknown_stem() -> None:
    with pytest.raises(ValueError, match="'cifar', 'imagenet'"):
        build_resnet18(stem="deep")  # type: ignore[arg-type]


def test_vit_rejects_a_patch_size_that_does_not_tile_the_input() -> None:
    with pytest.raises(ValueError, match="patch size 5"):
        build_vit_s(width=0.125, patch_size=5)


# --- width multiplier ---------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(SMALL))
def test_smaller_width_has_fewer_parameters_and_runs(family: str) -> None:
    small_kwargs = SMALL[family][0]
    wider = _meta(build_model, family=family, **{**small_kwargs, "width": 2 * small_kwargs["width"]})
    full = _meta(build_model, family=family, **{**small_kwargs, "width": 1.0})
    torch.manual_seed(0)
    small = build_model(family, **small_kwargs)
    assert _numel([small]) < _numel([wider]) < _numel([full])
    for d in small.split_depths:
        assert _numel(list(small.blocks[:d])) < _numel(list(full.blocks[:d]))
    x = torch.randn(2, *small.input_shape)
    logits = small(x)
    assert logits.shape == (2, small.num_classes) and torch.isfinite(logits).all()
    logits.sum().backward()  # trains as well: every parameter gets a gradient
    assert all(p.grad is not None for p in [*small.blocks.parameters(), *small.head.parameters()])


def test_resnet_and_vit_honour_a_64x64_input() -> None:
    torch.manual_seed(0)
    for net in (
        build_resnet18(width=0.125, num_classes=200, input_shape=(3, 64, 64)),
        build_vit_s(width=0.125, num_classes=200, input_shape=(3, 64, 64)),
    ):
        x = torch.randn(2, 3, 64, 64)
        assert net.eval()(x).shape == (2, 200)
        if net.family == "vit_s":
            assert net.blocks[0](x).shape == (2, 65, 48)  # 8×8 patches: still 64 tokens + class token
