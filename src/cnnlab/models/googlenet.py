"""GoogLeNet / Inception v1 (Szegedy et al., 2014, "Going deeper with convolutions", Table 1).

A stem of plain convs, then nine Inception modules (``cnnlab.layers.inception.InceptionModule``)
with max pooling between groups, global average pooling, dropout and one linear layer.
With 1x1 reductions before the 3x3 and 5x5 convs the whole network has about 6.8M
parameters (Table 1's params column sums to 6,797.7K, K = 1024, weights only), roughly
10x fewer than AlexNet's 60M.

``googlenet`` follows torchvision's layout so its weights load: batch norm (eps 1e-3)
after every conv, a 3x3 instead of a 5x5 in branch 3 (pytorch/vision#906) and a 2x2
pool before 5a: 6,624,904 parameters. ``large_kernel_size=5, norm_layer=None`` gives the
paper's convs (6,998,552 parameters; the paper also has LRN in the stem, omitted here).

Auxiliary classifiers (``aux_logits=True``, after 4a and 4d) only run in training mode:
``forward`` then returns ``GoogLeNetOutputs(logits, aux1, aux2)`` (a named tuple; note
torchvision's field order is ``(logits, aux_logits2, aux_logits1)``). In eval mode, or
without them, ``forward`` returns the logits. The paper weights their losses by 0.3.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct, SqueezeExcite, init_weights
from cnnlab.layers.init import torchvision_googlenet_init
from cnnlab.layers.inception import InceptionModule
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, StateDict, overwrite_param, register_model

GOOGLENET = Family(
    name="GoogLeNet",
    paper="Szegedy et al., Going deeper with convolutions",
    year=2014,
    url="https://arxiv.org/abs/1409.4842",
)
SENET = Family(
    name="SENet",
    paper="Hu, Shen & Sun, Squeeze-and-excitation networks",
    year=2018,
    url="https://arxiv.org/abs/1709.01507",
)


@dataclass(frozen=True)
class StemConv:
    name: str
    out_channels: int
    kernel_size: int
    stride: int = 1


@dataclass(frozen=True)
class MaxPool:
    name: str
    kernel_size: int = 3
    stride: int = 2


@dataclass(frozen=True)
class Inception:
    """One Inception module; widths named as the columns of Table 1."""

    name: str
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int


# Szegedy et al. 2014, Table 1 (224 -> 112 -> 56 -> 28 -> 14 -> 7). Names are torchvision's.
GOOGLENET_LAYERS: tuple[StemConv | MaxPool | Inception, ...] = (
    StemConv("conv1", 64, 7, stride=2),
    MaxPool("maxpool1"),
    StemConv("conv2", 64, 1),  # Table 1's "3x3 reduce" of the second conv layer
    StemConv("conv3", 192, 3),
    MaxPool("maxpool2"),
    Inception("inception3a", 64, 96, 128, 16, 32, 32),
    Inception("inception3b", 128, 128, 192, 32, 96, 64),
    MaxPool("maxpool3"),
    Inception("inception4a", 192, 96, 208, 16, 48, 64),
    Inception("inception4b", 160, 112, 224, 24, 64, 64),
    Inception("inception4c", 128, 128, 256, 24, 64, 64),
    Inception("inception4d", 112, 144, 288, 32, 64, 64),
    Inception("inception4e", 256, 160, 320, 32, 128, 128),
    MaxPool("maxpool4", kernel_size=2),  # 3x3/2 in Table 1; torchvision's 2x2/2 gives the same 7x7
    Inception("inception5a", 256, 160, 320, 32, 128, 128),
    Inception("inception5b", 384, 192, 384, 48, 128, 128),
)


class GoogLeNetOutputs(NamedTuple):
    logits: torch.Tensor
    aux1: torch.Tensor
    aux2: torch.Tensor


class InceptionAux(nn.Module):
    """Auxiliary classifier (§5): 4x4 average pool, 1x1 conv 128, FC 1024, dropout 0.7, FC.

    Args:
        in_channels: channels of the tapped feature map.
        num_classes: outputs.
        norm_layer: normalisation of the 1x1 conv.
        drop_rate: 0.7 in the paper.
    """

    def __init__(
        self, in_channels: int, num_classes: int, norm_layer: Callable[..., nn.Module] | None, drop_rate: float = 0.7
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)  # the paper's 5x5/3 average pool at 14x14
        self.conv = ConvNormAct(in_channels, 128, 1, norm_layer=norm_layer)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(1024, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)  # (B, C, H, W) -> (B, 128 * 4 * 4)
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class GoogLeNet(Classifier):
    """GoogLeNet (Inception v1) from a layer table.

    Args:
        layers: the table (``GOOGLENET_LAYERS``).
        aux_logits: add the two auxiliary classifiers (used in training mode only).
        aux_after: names of the modules whose outputs feed the auxiliary classifiers.
        transform_input: re-normalise ImageNet-normalised input to the [-1, 1] scaling the
            original weights expect (torchvision sets it for its pretrained googlenet).
        large_kernel_size: kernel of branch 3 of every module (5 in the paper, 3 in torchvision).
        norm_layer: after every conv (torchvision: BatchNorm2d with eps 1e-3; None in the paper).
        attn_layer: attention applied to each Inception module's output (SqueezeExcite: SE-Inception).
        drop_rate: dropout before the classifier (0.4 in Table 1; torchvision 0.2).
        init: ``"reference"`` (torchvision's: truncated normal std 0.01 for convs and linears; SE-Inception
            too, as the SENet paper gives no scheme of its own), ``"kaiming"``, ``"xavier"`` or ``"none"``.
    """

    head_name = "fc"
    min_input_size = 15  # four ceil-mode 3x3/2 pools: 15 -> 8 -> 4 -> 2 -> 1 -> 1

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        layers: Sequence[StemConv | MaxPool | Inception] = GOOGLENET_LAYERS,
        aux_logits: bool = False,
        aux_after: tuple[str, str] = ("inception4a", "inception4d"),
        transform_input: bool = False,
        large_kernel_size: int = 3,
        norm_layer: Callable[..., nn.Module] | None = partial(nn.BatchNorm2d, eps=1e-3),
        attn_layer: Callable[..., nn.Module] | None = None,
        drop_rate: float = 0.4,
        init: str = "reference",
    ) -> None:
        super().__init__()
        if transform_input and in_channels != 3:
            raise CnnlabError(f"transform_input re-normalises RGB ImageNet input: it needs in_channels=3, got {in_channels}")
        self.num_classes, self.in_channels = num_classes, in_channels
        self.aux_logits, self.aux_after, self.transform_input = aux_logits, tuple(aux_after), transform_input
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        channels, stride = in_channels, 1
        aux_channels: dict[str, int] = {}
        for i, row in enumerate(layers):
            if isinstance(row, StemConv):
                modules[row.name] = ConvNormAct(channels, row.out_channels, row.kernel_size, row.stride, norm_layer=norm_layer)
                channels, stride = row.out_channels, stride * row.stride
            elif isinstance(row, MaxPool):
                modules[row.name] = nn.MaxPool2d(row.kernel_size, row.stride, ceil_mode=True)
            else:
                block = InceptionModule(
                    channels, row.ch1x1, row.ch3x3red, row.ch3x3, row.ch5x5red, row.ch5x5, row.pool_proj,
                    large_kernel_size=large_kernel_size, norm_layer=norm_layer, attn_layer=attn_layer,
                )
                modules[row.name] = block
                channels = block.out_channels
            if row.name in self.aux_after:
                aux_channels[row.name] = channels
            # a stage ends before each pool and at the end of the table
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if not isinstance(row, MaxPool) and (nxt is None or isinstance(nxt, MaxPool)):
                self.feature_info.append(FeatureInfo(f"features.{row.name}", channels, stride))
            if isinstance(row, MaxPool):
                stride *= row.stride
        if aux_logits and set(aux_channels) != set(self.aux_after):
            raise CnnlabError(f"aux_after={aux_after!r}: expected names of two modules of the layer table")
        self.features = nn.Sequential(modules)
        if aux_logits:
            self.aux1 = InceptionAux(aux_channels[self.aux_after[0]], num_classes, norm_layer)
            self.aux2 = InceptionAux(aux_channels[self.aux_after[1]], num_classes, norm_layer)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self.num_features = channels
        init_weights(self, init, torchvision_googlenet_init)

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transform_input:
            return x
        # ImageNet mean/std normalisation -> (x - 0.5) / 0.5, as torchvision's GoogLeNet
        mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return x * (std / 0.5) + (mean - 0.5) / 0.5

    def _forward_features(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self._transform(x)
        aux: list[torch.Tensor] = []
        for name, module in self.features.named_children():
            x = module(x)
            if with_aux and name in self.aux_after:
                aux.append((self.aux1 if name == self.aux_after[0] else self.aux2)(x))
        return x, aux

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_features(x, with_aux=False)[0]  # (B, 3, 224, 224) -> (B, 1024, 7, 7)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.pool(x), 1))  # (B, 1024, H, W) -> (B, 1024)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | GoogLeNetOutputs:
        self.check_input(x)
        with_aux = self.aux_logits and self.training
        x, aux = self._forward_features(x, with_aux)
        logits = self.forward_head(x)
        return GoogLeNetOutputs(logits, aux[0], aux[1]) if with_aux else logits

    def filter_state_dict(self, state_dict: StateDict) -> StateDict:
        """Drop auxiliary-classifier weights this model does not have.

        torchvision's pretrained googlenet file holds ``aux1``/``aux2`` even though its model
        drops them after loading; without aux classifiers they are not needed.
        """
        if self.aux_logits:
            return state_dict
        return {k: v for k, v in state_dict.items() if not k.startswith(("aux1.", "aux2."))}

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the main classifier and, when present, the auxiliary classifiers' last layers."""
        super().reset_classifier(num_classes)
        if self.aux_logits:
            for aux in (self.aux1, self.aux2):
                fc2 = nn.Linear(aux.fc1.out_features, num_classes) if num_classes > 0 else nn.Identity()
                aux.fc2 = fc2.to(device=aux.fc1.weight.device, dtype=aux.fc1.weight.dtype)


def _convert_torchvision(state_dict: StateDict) -> StateDict:
    """torchvision GoogLeNet: ``conv1.bn.*`` -> ``features.conv1.norm.*``; aux and fc keep their names."""
    out: StateDict = {}
    for key, value in state_dict.items():
        top = key.split(".")[0]
        if top not in ("aux1", "aux2", "fc"):
            key = f"features.{key}"
        out[key.replace(".bn.", ".norm.")] = value
    if not any(k.startswith("features.inception") for k in out):
        raise KeyError("not a torchvision GoogLeNet state_dict")
    return out


@register_model(
    GOOGLENET,
    pretrained={"torchvision": "googlenet"},
    converters={"torchvision": _convert_torchvision},
    notes="torchvision's layout (BN, 3x3 in branch 3): 6,624,904 parameters; 13,004,888 with "
    "aux_logits=True. large_kernel_size=5, norm_layer=None: the paper's 6,998,552 (Table 1: ~6.8M). "
    "For torchvision's pretrained weights pass transform_input=True, as torchvision does.",
)
def googlenet(**kwargs) -> GoogLeNet:
    overwrite_param(kwargs, "layers", GOOGLENET_LAYERS)
    return GoogLeNet(**kwargs)


@register_model(
    SENET,
    notes="SE-Inception (Hu et al. 2018, Fig. 2): googlenet with squeeze-excite (reduction 16) on each "
    "Inception module's concatenated output.",
)
def se_googlenet(**kwargs) -> GoogLeNet:
    overwrite_param(kwargs, "layers", GOOGLENET_LAYERS)
    kwargs.setdefault("attn_layer", SqueezeExcite)
    return GoogLeNet(**kwargs)
