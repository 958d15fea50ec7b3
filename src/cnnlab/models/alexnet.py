"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) and ZFNet (Zeiler & Fergus, 2013).

``alexnet`` is the paper's network as one tower (Krizhevsky 2012 §3.5 and Fig. 2):
227x227 input, C1 96@55x55 (11x11/4), ReLU, local response normalisation (n=5,
alpha=1e-4, beta=0.75, k=2) after C1 and C2, overlapping 3x3/2 max pooling, C2 256 5x5,
C3 384, C4 384, C5 256 (3x3), then 4096-4096-1000 with dropout 0.5 on the two hidden
layers. ``groups=2`` restores the paper's two-GPU split (C2, C4, C5 only see the maps of
their own GPU). torchvision's ``alexnet`` is a different network (64-192-384-256-256 from
"One weird trick", Krizhevsky 2014, no LRN): cnnlab registers it as ``alexnet_tv``.

``zfnet`` is Zeiler & Fergus 2013 Fig. 3: AlexNet with a 7x7/2 first conv and a 5x5/2
second conv, which keep more of the image in the first layers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.layers import ConvNormAct, init_weights, local_response_norm
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, StateDict, overwrite_param, register_model

ALEXNET = Family(
    name="AlexNet",
    paper="Krizhevsky, Sutskever & Hinton, ImageNet classification with deep convolutional neural networks",
    year=2012,
    url="https://papers.nips.cc/paper/4824-imagenet-classification-with-deep-convolutional-neural-networks",
)
ZFNET = Family(
    name="ZFNet",
    paper="Zeiler & Fergus, Visualizing and understanding convolutional networks",
    year=2013,
    url="https://arxiv.org/abs/1311.2901",
)


@dataclass(frozen=True)
class ConvLayer:
    """One conv layer, then ReLU, then optionally LRN and a 3x3/2 overlapping max pool."""

    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    grouped: bool = False  # split across the two GPUs in the paper (only used with groups > 1)
    lrn: bool = False
    pool: bool = False
    bias_init: float = 0.0  # the paper's initial bias (AlexNet §5: 1 in conv2, conv4, conv5)


# Krizhevsky 2012 §3.5 and Fig. 2 (both towers merged): 227 -> 55 -> 27 -> 13 -> 6.
ALEXNET_LAYERS = (
    ConvLayer(96, 11, stride=4, lrn=True, pool=True),
    ConvLayer(256, 5, padding=2, grouped=True, lrn=True, pool=True, bias_init=1.0),
    ConvLayer(384, 3, padding=1),
    ConvLayer(384, 3, padding=1, grouped=True, bias_init=1.0),
    ConvLayer(256, 3, padding=1, grouped=True, pool=True, bias_init=1.0),
)
# torchvision's alexnet (Krizhevsky 2014, "One weird trick", single column): 224 -> 55 -> 27 -> 13 -> 6.
ALEXNET_TV_LAYERS = (
    ConvLayer(64, 11, stride=4, padding=2, pool=True),
    ConvLayer(192, 5, padding=2, pool=True),
    ConvLayer(384, 3, padding=1),
    ConvLayer(256, 3, padding=1),
    ConvLayer(256, 3, padding=1, pool=True),
)
# Zeiler & Fergus 2013 Fig. 3: 224 -> 110 -> 55 -> 26 -> 13 -> 13 -> 6 (with ceil-mode pooling).
# Their "contrast normalisation across feature maps" after layers 1 and 2 is AlexNet's LRN here.
ZFNET_LAYERS = (
    ConvLayer(96, 7, stride=2, padding=1, lrn=True, pool=True),
    ConvLayer(256, 5, stride=2, lrn=True, pool=True),
    ConvLayer(384, 3, padding=1),
    ConvLayer(384, 3, padding=1),
    ConvLayer(256, 3, padding=1, pool=True),
)


class FCHead(nn.Module):
    """The AlexNet/VGG classifier: pool to a fixed grid, flatten, two hidden FC layers, the last FC.

    Dropout follows each hidden layer's activation, as in both papers (torchvision's AlexNet
    puts it before; in eval mode the two are the same function).

    Args:
        in_channels: channels of the feature map.
        num_classes: outputs of ``fc``.
        pool_size: the grid the feature map is pooled to (6 for AlexNet, 7 for VGG); adaptive
            average pooling is the identity at the paper's input size and lets smaller inputs work.
        hidden: width of fc6 and fc7 (4096).
        drop_rate: dropout after fc6 and fc7 (0.5).
        act_layer: activation of the hidden layers.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool_size: int,
        hidden: int = 4096,
        drop_rate: float = 0.5,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc6 = nn.Linear(in_channels * pool_size * pool_size, hidden)
        self.act6 = act_layer()
        self.drop6 = nn.Dropout(drop_rate)
        self.fc7 = nn.Linear(hidden, hidden)
        self.act7 = act_layer()
        self.drop7 = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)  # (B, C, H, W) -> (B, C * s * s)
        x = self.drop6(self.act6(self.fc6(x)))
        x = self.drop7(self.act7(self.fc7(x)))
        return x if pre_logits else self.fc(x)


def _paper_init(model: AlexNet, layers: Sequence[ConvLayer]) -> None:
    """Krizhevsky et al. 2012 §5 and Zeiler & Fergus 2013 §3: every weight N(0, 0.01); biases as the rows say."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    for block, layer in zip(model.features, layers):
        nn.init.constant_(block.conv.bias, layer.bias_init)
    for fc in (model.head.fc6, model.head.fc7):
        nn.init.constant_(fc.bias, layers[-1].bias_init)


class AlexNet(Classifier):
    """AlexNet-style network: a few large-kernel conv layers with LRN and max pooling, then FCHead.

    Args:
        layers: the conv layers (``ALEXNET_LAYERS``, ``ALEXNET_TV_LAYERS``, ``ZFNET_LAYERS``).
        groups: 2 splits the ``grouped`` layers into two towers as in the paper's two GPUs.
        ceil_mode: max pooling rounds up (ZFNet's sizes need it; AlexNet's round down).
        drop_rate: dropout of the two hidden FC layers (0.5 in the papers).
        act_layer: ReLU in the papers.
        init: ``"reference"`` (the papers': weights N(0, 0.01); biases the rows' ``bias_init``, and for the
            hidden FC layers the last conv row's: AlexNet §5 sets 1 in conv2, conv4, conv5, fc6, fc7 "to
            provide the ReLUs with positive inputs", ZFNet §3 biases 0), ``"kaiming"``, ``"xavier"`` or
            ``"none"`` (PyTorch's defaults, which torchvision's AlexNet keeps: ``alexnet_tv``'s default).
    """

    head_name = "head.fc"
    min_input_size = 67  # set per instance from the layers (67 for the paper's AlexNet)

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        layers: Sequence[ConvLayer] = ALEXNET_LAYERS,
        groups: int = 1,
        ceil_mode: bool = False,
        drop_rate: float = 0.5,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        init: str = "reference",
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        blocks: list[nn.Module] = []
        channels, stride = in_channels, 1
        for i, layer in enumerate(layers):
            block = ConvNormAct(
                channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                groups=groups if layer.grouped else 1, bias=True, norm_layer=None, act_layer=act_layer,
            )
            stride *= layer.stride
            if layer.lrn:  # after the ReLU, as in §3.3
                block.add_module("lrn", local_response_norm(size=5, alpha=1e-4, beta=0.75, k=2.0))
            if layer.pool:  # overlapping pooling, §3.4: z=3, s=2
                block.add_module("pool", nn.MaxPool2d(3, 2, ceil_mode=ceil_mode))
                stride *= 2
            blocks.append(block)
            channels = layer.out_channels
            if layer.pool or i == len(layers) - 1:
                self.feature_info.append(FeatureInfo(f"features.{i}", channels, stride))
        self.features = nn.Sequential(*blocks)
        self.head = FCHead(channels, num_classes, pool_size=6, drop_rate=drop_rate, act_layer=act_layer)
        self.num_features = self.head.fc7.out_features
        self.min_input_size = _min_input_size(layers, ceil_mode)
        init_weights(self, init, lambda m: _paper_init(m, layers))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, 3, 227, 227) -> (B, 256, 6, 6)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)


def _min_input_size(layers: Sequence[ConvLayer], ceil_mode: bool) -> int:
    """Smallest square input for which every conv and pool still has at least one output pixel."""

    def out_size(size: int) -> int:
        for layer in layers:
            size = (size + 2 * layer.padding - layer.kernel_size) // layer.stride + 1
            if size < 1:
                return 0
            if layer.pool:
                size = pool_output_size(size, 3, 2, ceil_mode)
                if size < 1:
                    return 0
        return size

    size = 1
    while out_size(size) < 1:
        size += 1
    return size


def pool_output_size(size: int, kernel_size: int, stride: int, ceil_mode: bool) -> int:
    """Output length of an unpadded MaxPool2d, with PyTorch's rule for ceil mode."""
    if not ceil_mode:
        return (size - kernel_size) // stride + 1
    out = -(-(size - kernel_size) // stride) + 1
    if (out - 1) * stride >= size:  # the last window must start inside the input
        out -= 1
    return out


def convert_sequential(state_dict: StateDict, convs: Sequence[str], fcs: Sequence[str]) -> StateDict:
    """Map a torchvision ``features``/``classifier`` Sequential checkpoint onto cnnlab names, by position.

    ``features.N`` convs (4-D weights) are taken in order of N and renamed ``convs[k] + '.conv'``; a
    BatchNorm right after a conv (``features.N+1``) becomes ``convs[k] + '.norm'``. The Linear layers
    of ``classifier`` map in order onto ``fcs``. Raises KeyError when the checkpoint has a different
    number of layers (it is not this model's layout).
    """
    sd = dict(state_dict)

    def indices(prefix: str, ndim: int) -> list[int]:
        return sorted(int(k.split(".")[1]) for k, v in sd.items() if k.startswith(prefix) and k.endswith(".weight") and v.ndim == ndim)

    conv_ids, fc_ids = indices("features.", 4), indices("classifier.", 2)
    if len(conv_ids) != len(convs) or len(fc_ids) != len(fcs):
        raise KeyError(f"expected {len(convs)} convs and {len(fcs)} linears, found {len(conv_ids)} and {len(fc_ids)}")
    out: StateDict = {}
    for name, n in zip(convs, conv_ids):
        for param in ("weight", "bias"):
            if f"features.{n}.{param}" in sd:
                out[f"{name}.conv.{param}"] = sd.pop(f"features.{n}.{param}")
        is_norm = f"features.{n + 1}.running_mean" in sd
        for param in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if is_norm and f"features.{n + 1}.{param}" in sd:
                out[f"{name}.norm.{param}"] = sd.pop(f"features.{n + 1}.{param}")
    for name, n in zip(fcs, fc_ids):
        for param in ("weight", "bias"):
            if f"classifier.{n}.{param}" in sd:
                out[f"{name}.{param}"] = sd.pop(f"classifier.{n}.{param}")
    out.update(sd)  # anything left is reported as unexpected by load_weights
    return out


def _convert_alexnet_tv(state_dict: StateDict) -> StateDict:
    return convert_sequential(state_dict, [f"features.{i}" for i in range(5)], ["head.fc6", "head.fc7", "head.fc"])


@register_model(
    ALEXNET,
    default_input=(3, 227, 227),
    notes="The paper's network as one tower, with LRN: 62,378,344 parameters (groups=2, the paper's "
    "two-GPU split: 60,965,224; Krizhevsky 2012 §1 says 60 million). torchvision's alexnet is a "
    "different, later layout (64-192-384-256-256, no LRN): use alexnet_tv for it and its weights.",
)
def alexnet(**kwargs) -> AlexNet:
    overwrite_param(kwargs, "layers", ALEXNET_LAYERS)
    return AlexNet(**kwargs)


@register_model(
    ALEXNET,
    default_input=(3, 224, 224),
    pretrained={"torchvision": "alexnet"},
    converters={"torchvision": _convert_alexnet_tv},
    notes="torchvision's AlexNet (Krizhevsky 2014 'One weird trick' single column, no LRN): 61,100,840 parameters.",
)
def alexnet_tv(**kwargs) -> AlexNet:
    overwrite_param(kwargs, "layers", ALEXNET_TV_LAYERS)
    kwargs.setdefault("init", "none")  # the reference: torchvision's AlexNet keeps PyTorch's default init
    return AlexNet(**kwargs)


@register_model(
    ZFNET,
    default_input=(3, 224, 224),
    notes="Zeiler & Fergus 2013 Fig. 3, one tower with LRN: 62,357,608 parameters at 1000 classes "
    "(the paper gives no total).",
)
def zfnet(**kwargs) -> AlexNet:
    overwrite_param(kwargs, "layers", ZFNET_LAYERS)
    overwrite_param(kwargs, "ceil_mode", True)
    return AlexNet(**kwargs)
