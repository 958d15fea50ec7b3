"""Normalisation factory: batch, group, layer, instance norm and AlexNet's LRN."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from cnnlab._errors import CnnlabError, did_you_mean


class LayerNorm2d(nn.GroupNorm):
    """Layer norm over (C, H, W) of an NCHW tensor: GroupNorm with a single group."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, num_channels, eps=eps)


def _group_norm(num_channels: int, num_groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    groups = num_groups
    while num_channels % groups:  # the largest divisor <= num_groups keeps any width usable
        groups -= 1
    return nn.GroupNorm(groups, num_channels, eps=eps)


NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "batchnorm": nn.BatchNorm2d,
    "groupnorm": _group_norm,
    "layernorm": LayerNorm2d,
    "instancenorm": partial(nn.InstanceNorm2d, affine=True),
}


def get_norm_layer(name: str | Callable[..., nn.Module] | None) -> Callable[..., nn.Module] | None:
    """A norm factory (called with the channel count) from a name, a factory, or None."""
    if name is None or callable(name):
        return name
    key = name.lower().replace("_", "").replace("-", "")
    aliases = {"bn": "batchnorm", "gn": "groupnorm", "ln": "layernorm", "in": "instancenorm"}
    key = aliases.get(key, key)
    if key not in NORM_LAYERS:
        raise CnnlabError(f"unknown norm layer {name!r}{did_you_mean(key, NORM_LAYERS)} (choose from {', '.join(NORM_LAYERS)})")
    return NORM_LAYERS[key]


def local_response_norm(size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> nn.LocalResponseNorm:
    """AlexNet's local response normalisation (paper: n=5, alpha=1e-4, beta=0.75, k=2)."""
    return nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k)
