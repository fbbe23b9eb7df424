"""The multi-exit backbone template shared by every family.

A family is an ordered list of blocks ``B_1..B_L``, a final classifier head after ``B_L``,
a set of allowed split depths ``D`` and one exit head ``H_d`` per allowed depth. A client
at depth ``d`` holds ``B_1..B_d`` and ``H_d`` (:class:`ClientModel`); the server holds the
largest back end ``B_{d_min+1}..B_L`` plus the head (:class:`ServerModel`) and serves a
client at depth ``d`` by skipping the blocks up to ``d`` (depth-matched routing, ``g_d``).

Parameter names are the template's: ``blocks.{j}.*`` (``j`` 0-based), ``exit_heads.{d}.*``
and ``head.*`` in every view, so aggregation can match a client's or the server's tensors
to the template by name alone.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def scaled(channels: int, width: float) -> int:
    """A layer width under the family's width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


class ConvExitHead(nn.Module):
    """Exit head ``H_d`` for a convolutional cut: average pool to ``pool``×``pool``, flatten, linear."""

    def __init__(self, channels: int, num_classes: int, pool: int = 2) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(z), 1))


class TokenExitHead(nn.Module):
    """Exit head ``H_d`` for a token-sequence cut (ViT): mean over tokens, norm, linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(z.mean(dim=1)))


class MultiExitNet(nn.Module):
    """The full template: every block, every exit head and the final head.

    Families subclass nothing; they build one of these with :meth:`__init__` arguments.
    ``forward(x)`` runs the whole network (``B_1..B_L`` then the head).
    """

    def __init__(
        self,
        family: str,
        blocks: list[nn.Module],
        head: nn.Module,
        exit_heads: Mapping[int, nn.Module],
        input_shape: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        depths = tuple(sorted(exit_heads))
        if not depths or depths[0] < 1 or depths[-1] >= len(blocks):
            raise ValueError(f"{family}: split depths {depths} must lie in 1..{len(blocks) - 1}")
        self.family = family
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.split_depths: tuple[int, ...] = depths
        self.blocks = nn.ModuleList(blocks)
        self.exit_heads = nn.ModuleDict({str(d): exit_heads[d] for d in depths})
        self.head = head

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def check_depth(self, depth: int) -> None:
        if depth not in self.split_depths:
            raise ValueError(
                f"split depth {depth} is not allowed for {self.family}; allowed: {list(self.split_depths)}"
            )

    def client_model(self, depth: int) -> ClientModel:
        """A deep copy of the on-device model at ``depth``: ``B_1..B_d`` and ``H_d``."""
        self.check_depth(depth)
        return ClientModel(
            [copy.deepcopy(b) for b in self.blocks[:depth]],
            copy.deepcopy(self.exit_heads[str(depth)]),
            depth,
            tuple(d for d in self.split_depths if d <= depth),
        )

    def server_model(self) -> ServerModel:
        """A deep copy of the largest server back end: ``B_{d_min+1}..B_L`` and the head."""
        first = self.split_depths[0]
        return ServerModel(
            {j: copy.deepcopy(self.blocks[j]) for j in range(first, self.num_blocks)},
            copy.deepcopy(self.head),
            self.split_depths,
        )

    def client_keys(self, depth: int) -> list[str]:
        """Template parameter/buffer names a client at ``depth`` holds."""
        return list(self.client_model(depth).state_dict().keys())

    def server_keys(self) -> list[str]:
        return list(self.server_model().state_dict().keys())


class ClientModel(nn.Module):
    """The on-device model ``f_i = B_1..B_d`` with exit head ``H_d``."""

    def __init__(
        self, blocks: list[nn.Module], exit_head: nn.Module, depth: int, exit_depths: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.depth = depth
        self.exit_depths = exit_depths  # allowed depths <= depth (stochastic early extraction)
        self.blocks = nn.ModuleList(blocks)
        self.exit_heads = nn.ModuleDict({str(depth): exit_head})

    @property
    def exit_head(self) -> nn.Module:
        return self.exit_heads[str(self.depth)]

    def features(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """``f^{≤e}(x)``: the activation after block ``depth`` (default: the client's own)."""
        upto = self.depth if depth is None else depth
        if not 1 <= upto <= self.depth:
            raise ValueError(f"feature depth {upto} outside 1..{self.depth}")
        for block in self.blocks[:upto]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cut-layer features ``f(x)``, exit logits ``H_d(f(x))``)."""
        z = self.features(x)
        return z, self.exit_head(z)


class ServerModel(nn.Module):
    """The server back end with depth-matched routing: ``g_d = B_{d+1}..B_L, head``."""

    def __init__(self, blocks: dict[int, nn.Module], head: nn.Module, split_depths: tuple[int, ...]) -> None:
        super().__init__()
        self.split_depths = split_depths
        self.first = min(blocks)
        self.last = max(blocks)
        self.blocks = nn.ModuleDict({str(j): b for j, b in blocks.items()})
        self.head = head

    def embed(self, z: torch.Tensor, depth: int) -> torch.Tensor:
        """``φ_d(z)``: the pre-head embedding of a cut activation taken at ``depth``."""
        if depth not in self.split_depths:
            raise ValueError(f"split depth {depth} not served; allowed: {list(self.split_depths)}")
        for j in range(depth, self.last + 1):
            z = self.blocks[str(j)](z)
        return z

    def forward(self, z: torch.Tensor, depth: int) -> torch.Tensor:
        """``g_d(z)``: logits for a cut activation taken at ``depth``."""
        return self.head(self.embed(z, depth))


@dataclass(frozen=True)
class DepthCost:
    """Per-sample cost of one split depth (FLOPs count a multiply-add as 2)."""

    split_depth: int
    client_flops: int  # B_1..B_d forward
    exit_head_flops: int  # H_d forward
    client_params: int  # B_1..B_d (the paper's Table 1 "client" column)
    exit_head_params: int
    client_param_bytes: int  # B_1..B_d and H_d, fp32
    cut_elements: int  # cut-layer activation elements per sample
    server_flops: int  # g_d forward
    server_params: int  # B_{d+1}..B_L and the head (the paper's "server" column)
    activation_elements: int = 0  # outputs of every leaf layer of B_1..B_d and H_d per sample: what
    # a training step keeps for its backward pass (an upper-bound estimate of autograd's saved tensors)


def _forward_flops(fn, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(x)
    return int(counter.get_total_flops())


def _activation_elements(modules: list[nn.Module], fn, x: torch.Tensor) -> int:
    """Elements (per sample of ``x``) that the leaf layers of ``modules`` output while ``fn(x)`` runs."""
    total = 0

    def count(_m: nn.Module, _inputs: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out[0].numel()

    hooks = [leaf.register_forward_hook(count) for m in modules for leaf in m.modules()
             if not any(True for _ in leaf.children())]
    try:
        with torch.no_grad():
            fn(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def _numel(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def cost_table(net: MultiExitNet) -> dict[int, DepthCost]:
    """Per-depth costs of ``net`` measured with torch's FLOP counter on one sample."""
    was_training = net.training
    net.eval()
    table: dict[int, DepthCost] = {}
    x = torch.zeros((1, *net.input_shape))
    server = net.server_model().eval()
    try:
        for d in net.split_depths:
            client = net.client_model(d).eval()
            with torch.no_grad():
                z = client.features(x)
            head_params = _numel([client.exit_head])
            table[d] = DepthCost(
                split_depth=d,
                client_flops=_forward_flops(client.features, x),
                exit_head_flops=_forward_flops(client.exit_head, z),
                client_params=_numel(list(net.blocks[:d])),
                exit_head_params=head_params,
                client_param_bytes=4 * (_numel(list(net.blocks[:d])) + head_params),
                cut_elements=int(z[0].numel()),
                server_flops=_forward_flops(lambda t, d=d: server(t, d), z),
                server_params=_numel(list(net.blocks[d:]) + [net.head]),
                activation_elements=_activation_elements([client], lambda t, c=client: c.exit_head(c.features(t)), x),
            )
    finally:
        net.train(was_training)
    return table
