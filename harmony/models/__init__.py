"""Multi-exit backbone families, one module each, and a registry to build them by name."""

from __future__ import annotations

from collections.abc import Callable

from harmony.models.base import ClientModel, DepthCost, MultiExitNet, ServerModel, cost_table
from harmony.models.cnn8 import build_cnn8
from harmony.models.mobilenet_v2 import build_mobilenet_v2
from harmony.models.resnet import build_resnet18, build_resnet50
from harmony.models.vgg11_bn import build_vgg11_bn
from harmony.models.vit_s import build_vit_s

FAMILIES: dict[str, Callable[..., MultiExitNet]] = {
    "cnn8": build_cnn8,
    "vgg11_bn": build_vgg11_bn,
    "mobilenet_v2": build_mobilenet_v2,
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "vit_s": build_vit_s,
}


def build_model(
    family: str, width: float = 1.0, num_classes: int = 10, input_shape: tuple[int, int, int] | None = None
) -> MultiExitNet:
    """Build a family's template by name; ``input_shape`` defaults to the family's own."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; available: {sorted(FAMILIES)}")
    kwargs: dict = {"width": width, "num_classes": num_classes}
    if input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    return FAMILIES[family](**kwargs)


__all__ = [
    "FAMILIES",
    "ClientModel",
    "DepthCost",
    "MultiExitNet",
    "ServerModel",
    "build_model",
    "cost_table",
]
