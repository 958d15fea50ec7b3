"""Xception (Chollet, 2017, "Xception: Deep Learning with Depthwise Separable Convolutions").

Inception modules replaced by depthwise separable convolutions, arranged as in Fig. 5:
an entry flow (two plain 3x3 convs, three blocks that halve the resolution), a middle flow
(eight identical blocks of three separable convs at 728 channels), and an exit flow (one
more down-sampling block, then separable convs to 1536 and 2048 maps). Every block has a
residual connection: identity, or a 1x1 stride-2 conv where the block down-samples.
Default input 299x299 (the stem convs are unpadded: 299 -> 149 -> 147; exit flow 10x10).
``feature_info`` taps the block outputs (the residual sums, before the next block's ReLU;
timm taps them after that ReLU) and the exit flow's final ReLU output.

state_dict layout::

    stem.{0,1}.{conv,norm}.*                                  3x3/2 conv 32, 3x3 conv 64 (unpadded)
    {entry_flow,middle_flow}.{i}.residual.{j}.conv.{depthwise,pointwise}.weight, ...residual.{j}.norm.*
    {entry_flow,middle_flow}.{i}.shortcut.{conv,norm}.*       1x1/2 projection (down-sampling blocks)
    exit_flow.0.*                                             the exit flow's block, as above
    exit_flow.{1,2}.conv.{depthwise,pointwise}.weight, exit_flow.{1,2}.norm.*   1536 and 2048 maps
    fc.*
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct, SeparableConv2d, get_act_layer, get_norm_layer, init_weights, make_act
from cnnlab.layers.init import torchvision_resnet_init
from cnnlab.models._convert import replace_prefix
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, StateDict, register_model

LayerFactory = Callable[..., nn.Module]
FLOWS = ("entry_flow", "middle_flow", "exit_flow")


@dataclass(frozen=True)
class XceptionBlockRow:
    """One residual block of Fig. 5 (``repeats`` identical copies of it).

    ``channels`` are the output widths of its separable convs; a stride-2 block ends in a
    3x3/2 max pool and its shortcut is a 1x1/2 conv. ``relu_first=False`` for the first block,
    whose input has just been through a ReLU.
    """

    flow: str
    channels: tuple[int, ...]
    stride: int
    repeats: int = 1
    relu_first: bool = True


# Chollet 2017, Fig. 5.
XCEPTION_BLOCKS = (
    XceptionBlockRow("entry_flow", (128, 128), 2, relu_first=False),
    XceptionBlockRow("entry_flow", (256, 256), 2),
    XceptionBlockRow("entry_flow", (728, 728), 2),
    XceptionBlockRow("middle_flow", (728, 728, 728), 1, repeats=8),
    XceptionBlockRow("exit_flow", (728, 1024), 2),
)
XCEPTION_STEM = (32, 64)
XCEPTION_EXIT_CONVS = (1536, 2048)


def separable_conv_norm(
    in_channels: int,
    out_channels: int,
    norm_layer: LayerFactory,
    act_layer: LayerFactory | None,
    act_first: bool,
    inplace: bool = True,
) -> nn.Sequential:
    """A 3x3 separable conv with BN, and a ReLU before it (inside blocks) or after it (exit flow).

    Children: ``act`` (optional), ``conv`` (SeparableConv2d), ``norm``.
    """
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    conv_norm = (("conv", SeparableConv2d(in_channels, out_channels, 3)), ("norm", norm_layer(out_channels)))
    if act_layer is not None and act_first:
        parts["act"] = make_act(act_layer) if inplace else act_layer()
    parts.update(conv_norm)
    if act_layer is not None and not act_first:
        parts["act"] = make_act(act_layer)
    return nn.Sequential(parts)


class XceptionBlock(nn.Module):
    """Residual block of separable convs: ``out = residual(x) + shortcut(x)``.

    Args:
        in_channels: input channels.
        channels: output channels of each ReLU-SeparableConv-BN in the residual branch.
        stride: 2 ends the branch in a 3x3/2 max pool and projects the shortcut (1x1/2 conv + BN).
        relu_first: whether the branch starts with a ReLU.
        norm_layer, act_layer: factories.
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        stride: int = 1,
        relu_first: bool = True,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        units, width = [], in_channels
        for i, out in enumerate(channels):
            act = act_layer if relu_first or i > 0 else None
            # the first ReLU must not work in place: the block's input also feeds the shortcut
            units.append(separable_conv_norm(width, out, norm_layer, act, act_first=True, inplace=i > 0))
            width = out
        if stride != 1:
            units.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.residual = nn.Sequential(*units)
        if stride != 1 or width != in_channels:
            self.shortcut: nn.Module = ConvNormAct(in_channels, width, 1, stride=stride, norm_layer=norm_layer, act_layer=None)
        else:
            self.shortcut = nn.Identity()
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class Xception(Classifier):
    """Xception read from rows of Fig. 5.

    Args:
        blocks: the residual blocks, each tagged with its flow.
        drop_rate: dropout before the classifier (0.5 on ImageNet, paper §4.3).
        norm_layer, act_layer: factories or names.
        init: ``"reference"`` (timm's legacy Xception: He normal fan_out convs, PyTorch's default linear),
            ``"kaiming"``, ``"xavier"`` or ``"none"``.
    """

    head_name = "fc"
    min_input_size = 32

    def __init__(
        self,
        blocks: tuple[XceptionBlockRow, ...] = XCEPTION_BLOCKS,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.5,
        norm_layer: LayerFactory | str = nn.BatchNorm2d,
        act_layer: LayerFactory | str = nn.ReLU,
        init: str = "reference",
    ) -> None:
        super().__init__()
        bad = [row.flow for row in blocks if row.flow not in FLOWS]
        if bad:
            raise CnnlabError(f"unknown Xception flow {bad[0]!r}; rows must name one of {', '.join(FLOWS)}")
        self.num_classes, self.in_channels = num_classes, in_channels
        norm_layer, act_layer = get_norm_layer(norm_layer), get_act_layer(act_layer)
        stem_a, stem_b = XCEPTION_STEM
        self.stem = nn.Sequential(  # unpadded, as in the Keras original: 299 -> 149 -> 147
            ConvNormAct(in_channels, stem_a, 3, stride=2, padding=0, norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(stem_a, stem_b, 3, padding=0, norm_layer=norm_layer, act_layer=act_layer),
        )
        self.feature_info.append(FeatureInfo("stem", stem_b, 2))
        flows: dict[str, list[nn.Module]] = {flow: [] for flow in FLOWS}
        channels, stride = stem_b, 2
        taps: dict[int, FeatureInfo] = {}  # the last map at each stride
        for row in blocks:
            for _ in range(row.repeats):
                block = XceptionBlock(channels, row.channels, row.stride, row.relu_first, norm_layer, act_layer)
                channels, stride = block.out_channels, stride * row.stride
                flows[row.flow].append(block)
                if row.flow != "exit_flow":
                    path = "middle_flow" if row.flow == "middle_flow" else f"entry_flow.{len(flows[row.flow]) - 1}"
                    taps[stride] = FeatureInfo(path, channels, stride)
        for conv_channels in XCEPTION_EXIT_CONVS:
            flows["exit_flow"].append(separable_conv_norm(channels, conv_channels, norm_layer, act_layer, act_first=False))
            channels = conv_channels
        self.entry_flow = nn.Sequential(*flows["entry_flow"])
        self.middle_flow = nn.Sequential(*flows["middle_flow"])
        self.exit_flow = nn.Sequential(*flows["exit_flow"])
        taps[stride] = FeatureInfo("exit_flow", channels, stride)
        self.feature_info += sorted(taps.values(), key=lambda info: info.stride)
        self.num_features = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, init, torchvision_resnet_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit_flow(self.middle_flow(self.entry_flow(self.stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(torch.flatten(self.pool(x), 1))  # (B, 2048, 10, 10) -> (B, 2048)
        return x if pre_logits else self.fc(x)


# -- timm checkpoints ----------------------------------------------------------------------

_TIMM_REP = re.compile(r"^block(\d+)\.rep\.(\d+)\.(.+)$")
_TIMM_SKIP = re.compile(r"^block(\d+)\.(skip|skipbn)\.(.+)$")
_TIMM_FIXED = {"conv1.": "stem.0.conv.", "bn1.": "stem.0.norm.", "conv2.": "stem.1.conv.", "bn2.": "stem.1.norm.",
               "conv3.conv1.": "exit_flow.1.conv.depthwise.", "conv3.pointwise.": "exit_flow.1.conv.pointwise.",
               "bn3.": "exit_flow.1.norm.", "conv4.conv1.": "exit_flow.2.conv.depthwise.",
               "conv4.pointwise.": "exit_flow.2.conv.pointwise.", "bn4.": "exit_flow.2.norm.", "fc.": "fc."}


def _timm_block_path(block: int) -> str:
    """timm numbers blocks 1-12: 1-3 entry flow, 4-11 middle flow, 12 exit flow."""
    if block <= 3:
        return f"entry_flow.{block - 1}"
    if block <= 11:
        return f"middle_flow.{block - 4}"
    if block == 12:
        return "exit_flow.0"
    raise KeyError(f"timm legacy_xception has no block{block}")


def convert_timm(state_dict: StateDict) -> StateDict:
    """timm ``legacy_xception`` state_dict -> cnnlab layout.

    timm's ``block{i}.rep`` is ``[ReLU, SeparableConv, BN] * n`` (block1 without the first ReLU),
    so the j-th conv sits at index ``3j + 1`` (``3j`` in block1) and its BN right after it.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        if m := _TIMM_REP.match(key):
            block, index, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            index += 1 if block == 1 else 0  # realign block1 with the others
            unit, pos = divmod(index, 3)
            kind = {1: "conv", 2: "norm"}[pos]  # KeyError on a ReLU/pool index: not this layout
            rest = rest.replace("conv1.", "depthwise.", 1) if kind == "conv" else rest
            new = f"{_timm_block_path(block)}.residual.{unit}.{kind}.{rest}"
        elif m := _TIMM_SKIP.match(key):
            new = f"{_timm_block_path(int(m.group(1)))}.shortcut.{'conv' if m.group(2) == 'skip' else 'norm'}.{m.group(3)}"
        else:
            new = replace_prefix(key, _TIMM_FIXED, "timm legacy_xception")
        out[new] = value
    return out


XCEPTION = Family(
    name="Xception",
    paper="Chollet: Xception: Deep Learning with Depthwise Separable Convolutions (CVPR 2017)",
    year=2017,
    url="https://arxiv.org/abs/1610.02357",
    converters={"timm": convert_timm},
)


@register_model(
    XCEPTION, default_input=(3, 299, 299), pretrained={"timm": "legacy_xception"},
    notes="Fig. 5; 22,855,952 parameters (Table 3). timm calls it legacy_xception.",
)
def xception(**kwargs) -> Xception:
    return Xception(XCEPTION_BLOCKS, **kwargs)
