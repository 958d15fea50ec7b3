"""Fully convolutional networks (Long, Shelhamer & Darrell 2015): ``fcn32s``, ``fcn16s``, ``fcn8s``, ``fcn``,
``fcn_resnet50``.

A classifier becomes a dense predictor when its fully connected layers become convolutions: VGG-16's fc6
(4096 units over the 7x7x512 pool5 map) is a 7x7 conv, fc7 a 1x1 conv, and a 1x1 "score" conv gives one
logit per class at every position of the stride-32 map. Up-sampling brings the coarse scores back to the
input size, which loses detail; the skip architectures recover some by adding scores from shallower,
finer stages (paper §4.2, Fig. 3):

- ``fcn32s``: score(fc7) up-sampled 32x in one step;
- ``fcn16s``: score(fc7) up-sampled 2x, plus score(pool4), up-sampled 16x;
- ``fcn8s``: then up-sampled 2x again, plus score(pool3), up-sampled 8x.

Up-sampling is a transposed convolution initialised to bilinear interpolation (:func:`bilinear_kernel`,
the paper's §3.3): the 2x steps learn from there, the final 32x/16x/8x one stays fixed (as the paper's
Caffe nets, ``lr_mult: 0``). As in the paper's code, conv1_1 sees the image padded by 100 pixels (here: 99
zeros added around the input plus the conv's own 1) so that the unpadded 7x7 fc6 has room for any input
size, pooling rounds up (Caffe's), and every fused map is cropped to the offset that aligns it with the
other (5 for pool4 and 9 for pool3 on VGG-16, 31/27/19 for the final crop): the offsets are computed here
from the layers' geometry (:func:`coordinate_maps`), so the logits are at the input size and aligned for
every input size.

``fcn`` and ``fcn_resnet50`` are torchvision's simpler FCN: a dilated ResNet (output stride 8) with a
3x3 conv + BN + ReLU + dropout + 1x1 conv head (``FCNHead``), an optional auxiliary head on layer3
(``aux_loss=True``) and bilinear interpolation of the logits to the input size. ``fcn_resnet50`` loads
torchvision's ``fcn_resnet50`` state_dicts (``cnnlab.load_weights``) and gives the same ``out`` and ``aux``.

Output: a ``(N, K, H, W)`` logits tensor at the input size; with ``aux_loss=True`` a dict ``{"out", "aux"}``.

state_dict keys: ``encoder.body.*`` (the classifier's own layout); FCN-Ns: ``fc6.conv.*``, ``fc7.conv.*``, and
under ``head.`` every layer whose shape depends on the class count (``head_name = "head"``: what a checkpoint for
other classes leaves out): ``head.score.{0,1,2}.*`` (fc7, pool4, pool3), ``head.upscore_skips.{0,1}.weight``
(the 2x), ``head.upscore.weight`` (checkpoints with these keys at the top level, before they moved under
``head.``, still load); ``fcn``: ``head.block.conv.weight``, ``head.block.norm.*``, ``head.classifier.*``,
``aux_head.*``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct
from cnnlab.models.base import FeatureInfo
from cnnlab.models.catalog import StateDict
from cnnlab.models.registry import Family, register_model
from cnnlab.segmentation.encoder import Encoder, _StopForward, build_encoder, find_stage, stage_table

__all__ = ["FCN", "FCNConfig", "FCNHead", "SkipScoreHead", "SimpleSegmentationModel", "BilinearUpsample",
           "bilinear_kernel", "coordinate_maps", "check_num_classes", "load_fc_as_conv", "classifier_state_dict",
           "fcn32s", "fcn16s", "fcn8s", "fcn", "fcn_resnet50", "from_torchvision", "FCN_FAMILY"]

FCN_FAMILY = Family("FCN", "Long, Shelhamer & Darrell, Fully Convolutional Networks for Semantic Segmentation "
                    "(CVPR 2015)", 2015, "https://arxiv.org/abs/1411.4038")


def check_num_classes(num_classes: Any, model: str) -> int:
    """``num_classes`` counts the background class 0: at least 2 (background + one class)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise CnnlabError(f"{model}: num_classes counts the background class 0 too (VOC: 21); expected an int "
                          f">= 2, got {num_classes!r}")
    return num_classes


# -- bilinear up-sampling by a transposed convolution ----------------------------------------------------------
def bilinear_kernel(factor: int) -> Tensor:
    """The ``(2f - f % 2)``-square kernel of bilinear interpolation by ``factor`` (Caffe's ``upsample_filt``)."""
    size = 2 * factor - factor % 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    return torch.outer(taps, taps).float()


class BilinearUpsample(nn.ConvTranspose2d):
    """Up-sampling by ``factor``: a ``channels -> channels`` transposed conv (kernel 2f, stride f, no padding, no
    bias) initialised to bilinear interpolation of each channel on its own (zero across channels).

    Output length ``(n - 1) * f + 2f``; the input's pixel i lands at output ``f * i + f - 1/2``, so cropping
    ``f // 2`` pixels from the start gives ``F.interpolate(scale_factor=f, mode="bilinear")`` away from the border.

    Args:
        channels: in and out channels (the classes).
        factor: the up-sampling factor (stride).
        learnable: False keeps the bilinear weights fixed (``requires_grad=False``), as the paper's final up-sampling.
    """

    def __init__(self, channels: int, factor: int, learnable: bool = True) -> None:
        super().__init__(channels, channels, 2 * factor - factor % 2, stride=factor, bias=False)
        self.factor, self.learnable = factor, learnable
        self.reset_parameters()
        self.weight.requires_grad_(learnable)

    def reset_parameters(self) -> None:
        if not hasattr(self, "factor"):  # called by ConvTranspose2d.__init__ before factor is set
            return super().reset_parameters()
        with torch.no_grad():
            self.weight.zero_()
            kernel = bilinear_kernel(self.factor)
            for c in range(self.in_channels):
                self.weight[c, c] = kernel


# -- FCN-32s/16s/8s ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FCNConfig:
    """The skip architecture and the head of FCN-32s/16s/8s (Long et al. 2015, §4.1-4.2).

    Args:
        skip_strides: the strides of the shallower stages fused in, deepest first: () for 32s, (16,) for 16s,
            (16, 8) for 8s (pool4, pool3).
        fc_channels: width of fc6 and fc7 (4096, VGG's fully connected layers).
        fc_kernel: fc6's kernel, the classifier's input grid (7 for VGG's 7x7 pool5).
        drop_rate: dropout after fc6 and fc7 (0.5).
        input_padding: zeros added around the input (99: with conv1_1's own padding of 1, the paper's 100).
        ceil_mode: pooling rounds its output size up (Caffe's, the paper's code).
        learnable_skips: the 2x up-samplings learn (the paper: bilinear-initialised, then learnt).
        learnable_final: the final up-sampling learns (the paper: fixed bilinear).
    """

    skip_strides: tuple[int, ...] = ()
    fc_channels: int = 4096
    fc_kernel: int = 7
    drop_rate: float = 0.5
    input_padding: int = 99
    ceil_mode: bool = True
    learnable_skips: bool = True
    learnable_final: bool = False


def coordinate_maps(body: nn.Module, stages: Sequence[FeatureInfo], in_channels: int, size: int | None = None,
                    model: str = "fcn") -> list[tuple[float, float]]:
    """For each of ``stages``: ``(a, b)`` such that position ``o`` of its map is centred on input pixel ``a*o + b``.

    Composes the maps of the convs and pools in execution order (Caffe's ``coord_map``: a layer of kernel
    k, stride s, padding p, dilation d maps output o to input ``s*o + (d*(k-1))/2 - p``). That holds for a
    plain chain of layers (VGG); a branched network (a ResNet's shortcuts) is refused, its stride would not add up.
    """
    maps: dict[str, tuple[float, float]] = {}
    state = [1.0, 0.0]

    def layer_hook(module: nn.Module, _inputs, _output) -> None:
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        s = module.stride if isinstance(module.stride, int) else module.stride[0]
        p = module.padding if isinstance(module.padding, int) else module.padding[0]
        d = getattr(module, "dilation", 1)
        d = d if isinstance(d, int) else d[0]
        a, b = state
        state[0], state[1] = a * s, a * ((d * (k - 1)) / 2 - p) + b

    handles = [m.register_forward_hook(layer_hook) for m in body.modules()
               if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    for stage in stages:  # before the encoder's own taps (the last one stops the forward)
        handles.append(body.get_submodule(stage.module).register_forward_hook(
            lambda _m, _i, _o, name=stage.module: maps.__setitem__(name, (state[0], state[1])), prepend=True))
    size = size or max(64, int(getattr(body, "min_input_size", 32)))
    was_training = body.training
    body.eval()
    first = next(body.parameters(), None)
    device = first.device if first is not None else None
    try:
        with torch.no_grad():
            body.forward_features(torch.zeros(1, in_channels, size, size, device=device))
    except _StopForward:  # an encoder's last stage was reached: every map is recorded
        pass
    finally:
        for h in handles:
            h.remove()
        body.train(was_training)
    out = [maps[s.module] for s in stages]
    for (a, _), stage in zip(out, stages):
        if a != stage.stride:
            raise CnnlabError(f"{model}: the crop offsets of the skip FCN follow a plain chain of convs and pools "
                              f"(VGG, as Long et al.); the backbone's layers give stride {a:g} at {stage.module}, "
                              f"not its stride {stage.stride} (a branched network); use fcn(backbone=...) instead")
    return out


def _crop_offset(value: float, what: str, model: str) -> int:
    if value < 0 or value != int(value):
        raise CnnlabError(f"{model}: {what} is misaligned by {value:g} pixels (not a whole, non-negative crop); the "
                          "backbone's geometry does not fit the skip FCN")
    return int(value)


class SkipScoreHead(nn.Module):
    """The class-dependent part of FCN-32s/16s/8s: 1x1 score layers on fc7 and on each skip's stage, the 2x
    up-samplings that fuse them (deepest first), the final up-sampling and its crop to the input size.

    Args:
        channels: fc7's width, then the skips' stages' channels, deepest first (pool4, pool3).
        num_classes: classes with the background.
        final_factor: the final up-sampling's factor (the stride of the shallowest map fused).
        skip_offsets, final_offset: the crops that align the maps (:meth:`FCN._offsets`).
        learnable_skips, learnable_final: as :class:`FCNConfig`.
    """

    def __init__(self, channels: Sequence[int], num_classes: int, final_factor: int, skip_offsets: Sequence[int],
                 final_offset: int, *, learnable_skips: bool = True, learnable_final: bool = False) -> None:
        super().__init__()
        self.score = nn.ModuleList([nn.Conv2d(c, num_classes, 1) for c in channels])
        self.upscore_skips = nn.ModuleList(BilinearUpsample(num_classes, 2, learnable_skips) for _ in channels[1:])
        self.upscore = BilinearUpsample(num_classes, final_factor, learnable_final)
        self.skip_offsets, self.final_offset = list(skip_offsets), final_offset
        for conv in self.score:  # the paper zero-initialises the score layers (§4.3)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, skips: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """fc7's map and the skips' maps (deepest first) -> logits cropped to ``size``."""
        y = self.score[0](x)
        for up, score, offset, skip in zip(self.upscore_skips, self.score[1:], self.skip_offsets, skips):
            y = up(y)
            y = y + _crop(score(skip), offset, y.shape[-2:])
        return _crop(self.upscore(y), self.final_offset, size)


_HEAD_KEYS = re.compile(r"^(score|upscore_skips|upscore)\.")  # where the head's layers were before they moved


def _moved_head_keys(state_dict: StateDict, prefix: str = "") -> StateDict:
    """A checkpoint of the FCN-Ns from before the class-dependent layers moved under ``head.``, renamed."""
    return {(prefix + "head." + k[len(prefix):] if k.startswith(prefix) and _HEAD_KEYS.match(k[len(prefix):])
             else k): v for k, v in state_dict.items()}


class FCN(nn.Module):
    """FCN-32s/16s/8s: fc6/fc7 as convs on the deepest stage, score layers, skip fusion, bilinear up-sampling.

    Args:
        encoder: the stages used, shallow first (the stride-8 and -16 stages of the skips, then the deepest).
        num_classes: classes with the background.
        config: the skip architecture (:class:`FCNConfig`).
        model: the name used in errors.
    """

    head_name = "head"  # every layer whose shape depends on the class count: score layers and up-samplings

    def __init__(self, encoder: Encoder, num_classes: int, config: FCNConfig, model: str = "fcn") -> None:
        super().__init__()
        self.encoder, self.config, self.num_classes = encoder, config, num_classes
        if config.ceil_mode:
            for m in encoder.body.modules():
                if isinstance(m, nn.MaxPool2d):
                    m.ceil_mode = True
        self.skip_channels = list(reversed(encoder.channels[:-1]))  # the skips' stages deepest first (pool4, pool3)
        self.final_factor = encoder.strides[0] if self.skip_channels else encoder.strides[-1]
        self._offsets(self.final_factor, model)  # first: a backbone that does not fit fails before the big layers
        deepest = encoder.channels[-1]
        # fc6, fc7 as convolutions (§3.1): no padding, as the paper's (the input padding makes room)
        self.fc6 = ConvNormAct(deepest, config.fc_channels, config.fc_kernel, padding=0, norm_layer=None)
        self.drop6 = nn.Dropout(config.drop_rate)
        self.fc7 = ConvNormAct(config.fc_channels, config.fc_channels, 1, padding=0, norm_layer=None)
        self.drop7 = nn.Dropout(config.drop_rate)
        self.head = self._head(num_classes)
        self.register_load_state_dict_pre_hook(_rename_moved_head_keys)

    def _head(self, num_classes: int) -> SkipScoreHead:
        return SkipScoreHead([self.config.fc_channels, *self.skip_channels], num_classes, self.final_factor,
                             self.skip_offsets, self.final_offset, learnable_skips=self.config.learnable_skips,
                             learnable_final=self.config.learnable_final)

    def _offsets(self, factor: int, model: str) -> None:
        """The crops that align each skip's scores with the up-sampled ones, and the final crop (Caffe's 5, 9, 31)."""
        maps = coordinate_maps(self.encoder.body, self.encoder.stages, self.encoder.body.in_channels, model=model)
        a, b = maps[-1]
        b += a * (self.config.fc_kernel - 1) / 2  # fc6: an unpadded k x k conv; fc7 and score: 1x1
        self.skip_offsets: list[int] = []
        for a_skip, b_skip in reversed(maps[:-1]):
            b, a = b - 0.75 * a, a / 2  # the 2x transposed conv (kernel 4, stride 2): o -> (o - 1.5) / 2
            if a != a_skip:
                raise CnnlabError(f"{model}: the skip stages must halve the stride each "
                                  f"(got {a_skip:g} after {2 * a:g})")
            # the fused map keeps the up-sampled map's frame; the skip's scores are cropped into it
            self.skip_offsets.append(_crop_offset((b - b_skip) / a_skip, f"the stride-{a_skip:g} skip", model))
        # final up-sampling by f = a: o -> (o - (f - 1/2)) / f; the input's pixel j sits at j + input_padding
        self.final_offset = _crop_offset(self.config.input_padding + factor - 0.5 - b, "the final up-sampling", model)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        p = self.config.input_padding
        features = self.encoder(F.pad(x, (p, p, p, p)))  # zeros, as Caffe's conv1_1 padding
        y = self.drop7(self.fc7(self.drop6(self.fc6(features[-1]))))
        return self.head(y, features[-2::-1], size)  # score, fuse the skips deepest first, up-sample

    def load_classifier_fc(self, state_dict: StateDict, prefix: str = "head.") -> list[str]:
        """The classifier's fc6 and fc7 as this FCN's convolutions (:func:`load_fc_as_conv`); the keys loaded."""
        return load_fc_as_conv({"fc6": self.fc6.conv, "fc7": self.fc7.conv}, state_dict, prefix, model="FCN")

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head (score layers and up-samplings, all that depends on the class count) for ``num_classes``."""
        self.head = self._head(num_classes).to(self.head.upscore.weight.device)
        self.num_classes = num_classes

    def filter_state_dict(self, state_dict: StateDict) -> StateDict:
        """``cnnlab.load_weights``: a checkpoint from before the head's layers moved under ``head.``, renamed."""
        return _moved_head_keys(state_dict)


def _rename_moved_head_keys(module: nn.Module, state_dict: StateDict, prefix: str, *_: Any) -> None:
    """``load_state_dict`` pre-hook of :class:`FCN`: old checkpoints' top-level head keys moved under ``head.``."""
    renamed = _moved_head_keys(state_dict, prefix)
    if renamed.keys() != state_dict.keys():
        state_dict.clear()
        state_dict.update(renamed)


def load_fc_as_conv(convs: dict[str, nn.Conv2d], state_dict: StateDict, prefix: str = "head.",
                    model: str = "the network") -> list[str]:
    """A classifier's fully connected layers as convolutions (Long et al.'s "convolutionalization", §3.1).

    ``convs`` maps the classifier's layer names to the convs that take them (``{"fc6": ..., "fc7": ...}``);
    ``state_dict`` is a cnnlab VGG's (``head.fc6.weight`` of shape (4096, 512 * 7 * 7) ...): each row of a fully
    connected layer over a (C, k, k) map is a k x k conv filter. A conv without a bias (a norm layer follows it,
    DeconvNet's) takes the weight only: the norm's mean subtraction removes a constant per channel. Layers the
    state_dict lacks are left as they are. Returns the keys loaded.
    """
    loaded = []
    for fc, conv in convs.items():
        weight, bias = state_dict.get(f"{prefix}{fc}.weight"), state_dict.get(f"{prefix}{fc}.bias")
        if weight is None:
            continue
        if weight.numel() != conv.weight.numel() or (conv.bias is not None and bias is not None
                                                     and bias.shape != conv.bias.shape):
            raise CnnlabError(f"the classifier's {fc} {tuple(weight.shape)} does not fit {model}'s {fc} conv "
                              f"{tuple(conv.weight.shape)}; fc_channels and fc_kernel must match the classifier")
        with torch.no_grad():
            conv.weight.copy_(weight.reshape(conv.weight.shape))  # (out, C*k*k) -> (out, C, k, k): same order
            loaded.append(f"{prefix}{fc}.weight")
            if conv.bias is not None and bias is not None:
                conv.bias.copy_(bias)
                loaded.append(f"{prefix}{fc}.bias")
    return loaded


def _crop(x: Tensor, offset: int, size: Sequence[int]) -> Tensor:
    h, w = size
    if x.shape[-2] < offset + h or x.shape[-1] < offset + w:
        raise CnnlabError(f"FCN: a {tuple(x.shape[-2:])} map cannot be cropped to {tuple(size)} at offset {offset}; "
                          "the input is too small for this network")
    return x[..., offset:offset + h, offset:offset + w]


def _skip_fcn(name: str, skip_strides: tuple[int, ...], *, backbone: str, num_classes: int, in_channels: int,
              backbone_weights: str | os.PathLike | None, norm_layer: Any, options: dict[str, Any]) -> FCN:
    check_num_classes(num_classes, name)
    try:
        config = FCNConfig(skip_strides=skip_strides, **options)
    except TypeError:
        fields = ", ".join(f for f in FCNConfig.__dataclass_fields__ if f != "skip_strides")
        bad = sorted(set(options) - set(FCNConfig.__dataclass_fields__))
        raise CnnlabError(f"{name} does not take the option(s) {bad}; it takes backbone, num_classes, in_channels, "
                          f"backbone_weights, norm_layer, {fields}") from None
    table = stage_table(backbone, in_channels=in_channels)
    deepest = len(table) - 1
    indices = sorted({find_stage(backbone, table, s, model=name) for s in skip_strides} | {deepest})
    if len(indices) != len(skip_strides) + 1:
        raise CnnlabError(f"{name} fuses stages of strides {skip_strides} below the deepest; backbone {backbone!r} "
                          f"has strides {[f.stride for f in table]}")
    encoder = build_encoder(backbone, stages=indices, weights=backbone_weights, in_channels=in_channels,
                            norm_layer=norm_layer)
    model = FCN(encoder, num_classes, config, model=name)
    if backbone_weights is not None:  # the classifier's fc6/fc7 too, as the paper initialises them
        model.load_classifier_fc(classifier_state_dict(backbone_weights))
    model.model_name = name
    return model


def classifier_state_dict(weights: str | os.PathLike) -> StateDict:
    """The state_dict of a cnnlab classification run folder or a weights file."""
    from pathlib import Path

    from cnnlab.models.weights import read_state_dict

    if Path(weights).is_dir():
        from cnnlab.engine.runs import load_run

        return load_run(weights).model.state_dict()
    return read_state_dict(weights)


_SKIP_NOTES = ("VGG-16 as Long et al. 2015: fc6/fc7 as 7x7/1x1 convs, input padded 100, crops computed from the "
               "layers' geometry; logits at the input size for any size. backbone= another plain VGG.")


@register_model(FCN_FAMILY, task="segmentation", default_input=(3, 224, 224),
                notes="FCN-32s: " + _SKIP_NOTES + " 134.3M parameters at 21 classes.")
def fcn32s(*, backbone: str = "vgg16", num_classes: int = 21, in_channels: int = 3,
           backbone_weights: str | os.PathLike | None = None, norm_layer: Any = None, **options: Any) -> FCN:
    """FCN-32s (one 32x up-sampling). ``options``: the fields of :class:`FCNConfig`."""
    return _skip_fcn("fcn32s", (), backbone=backbone, num_classes=num_classes, in_channels=in_channels,
                     backbone_weights=backbone_weights, norm_layer=norm_layer, options=options)


@register_model(FCN_FAMILY, task="segmentation", default_input=(3, 224, 224),
                notes="FCN-16s (pool4 skip): " + _SKIP_NOTES)
def fcn16s(*, backbone: str = "vgg16", num_classes: int = 21, in_channels: int = 3,
           backbone_weights: str | os.PathLike | None = None, norm_layer: Any = None, **options: Any) -> FCN:
    """FCN-16s (fc7 scores 2x + pool4 scores, then 16x). ``options``: the fields of :class:`FCNConfig`."""
    return _skip_fcn("fcn16s", (16,), backbone=backbone, num_classes=num_classes, in_channels=in_channels,
                     backbone_weights=backbone_weights, norm_layer=norm_layer, options=options)


@register_model(FCN_FAMILY, task="segmentation", default_input=(3, 224, 224),
                notes="FCN-8s (pool4 and pool3 skips): " + _SKIP_NOTES + " Long et al.: 134M parameters.")
def fcn8s(*, backbone: str = "vgg16", num_classes: int = 21, in_channels: int = 3,
          backbone_weights: str | os.PathLike | None = None, norm_layer: Any = None, **options: Any) -> FCN:
    """FCN-8s (pool4 then pool3 fused, then 8x). ``options``: the fields of :class:`FCNConfig`."""
    return _skip_fcn("fcn8s", (16, 8), backbone=backbone, num_classes=num_classes, in_channels=in_channels,
                     backbone_weights=backbone_weights, norm_layer=norm_layer, options=options)


# -- torchvision's FCN: a dilated encoder, a conv head, bilinear interpolation ---------------------------------
class FCNHead(nn.Module):
    """torchvision's FCN head: 3x3 conv (in -> in/4) + BN + ReLU, dropout 0.1, 1x1 conv to the classes.

    Args:
        in_channels: of the encoder's map.
        num_classes: classes with the background.
        inner_channels: of the 3x3 conv; None: ``in_channels // 4``.
        drop_rate: dropout before the classifier.
        norm_layer: of the 3x3 conv.
    """

    def __init__(self, in_channels: int, num_classes: int, inner_channels: int | None = None,
                 drop_rate: float = 0.1, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        inner = inner_channels or in_channels // 4
        self.block = ConvNormAct(in_channels, inner, 3, norm_layer=norm_layer)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Conv2d(inner, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.block(x)))


class SimpleSegmentationModel(nn.Module):
    """Encoder, head on the deepest map, optional auxiliary head on the one before, bilinear to the input size.

    torchvision's ``_SimpleSegmentationModel`` (FCN, DeepLabv3). Returns the logits tensor, or
    ``{"out": ..., "aux": ...}`` when there is an auxiliary head (train and eval alike).

    Args:
        encoder: returns ``[aux map, deepest map]`` (or only the deepest without an aux head).
        head: deepest map -> logits; has a ``classifier`` 1x1 conv (``reset_classifier``).
        aux_head: the auxiliary head, or None.
        align_corners: of the final bilinear interpolation (torchvision: False).
    """

    head_name = "head.classifier"
    head_names = ("head.classifier", "aux_head.classifier")  # the class-dependent layers (fine-tuning to new classes)

    def __init__(self, encoder: Encoder, head: nn.Module, aux_head: nn.Module | None = None,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.encoder, self.head, self.aux_head = encoder, head, aux_head
        self.align_corners = align_corners

    @property
    def num_classes(self) -> int:
        return self.head.classifier.out_channels

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.encoder(x)
        out = F.interpolate(self.head(features[-1]), size=size, mode="bilinear", align_corners=self.align_corners)
        if self.aux_head is None:
            return out
        aux = F.interpolate(self.aux_head(features[-2]), size=size, mode="bilinear", align_corners=self.align_corners)
        return {"out": out, "aux": aux}

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh 1x1 classifiers (main and aux) for ``num_classes``."""
        for head in (self.head, self.aux_head):
            if head is not None:
                old = head.classifier
                head.classifier = nn.Conv2d(old.in_channels, num_classes, 1).to(old.weight.device)

    def filter_state_dict(self, state_dict: StateDict) -> StateDict:
        """Drop a checkpoint's aux head when this model has none (torchvision's weights carry one)."""
        if self.aux_head is None:
            return {k: v for k, v in state_dict.items() if not k.startswith("aux_head.")}
        return state_dict


def _head_encoder(name: str, backbone: str, *, output_stride: int, aux_loss: bool, in_channels: int,
                  backbone_weights: str | os.PathLike | None, norm_layer: Any) -> Encoder:
    """The encoder of a head model: the deepest stage, and the one before it for the aux head."""
    if output_stride not in (8, 16, 32):
        raise CnnlabError(f"{name}: output_stride must be 8, 16 or 32, got {output_stride!r}")
    if not isinstance(aux_loss, bool):
        raise CnnlabError(f"{name}: aux_loss must be True or False, got {aux_loss!r}")
    table = stage_table(backbone, output_stride=output_stride, in_channels=in_channels)
    if len(table) < 2:
        raise CnnlabError(f"{name} needs an encoder with at least 2 stages (the aux head reads the one before the "
                          f"last); backbone {backbone!r} has {len(table)}")
    stages = [len(table) - 2, len(table) - 1] if aux_loss else [len(table) - 1]
    return build_encoder(backbone, output_stride=output_stride, stages=stages, weights=backbone_weights,
                         in_channels=in_channels, norm_layer=norm_layer)


def _fcn(name: str, backbone: str, *, num_classes: int, output_stride: int, aux_loss: bool, in_channels: int,
         backbone_weights: str | os.PathLike | None, norm_layer: Any) -> SimpleSegmentationModel:
    check_num_classes(num_classes, name)
    encoder = _head_encoder(name, backbone, output_stride=output_stride, aux_loss=aux_loss, in_channels=in_channels,
                            backbone_weights=backbone_weights, norm_layer=norm_layer)
    aux = FCNHead(encoder.channels[-2], num_classes) if aux_loss else None
    model = SimpleSegmentationModel(encoder, FCNHead(encoder.channels[-1], num_classes), aux)
    model.model_name = name
    return model


# -- torchvision's checkpoint ------------------------------------------------------------------------------------
def _head_from_torchvision(key: str, value: Tensor, out: StateDict, rules: Sequence[tuple[str, str]],
                           model: str) -> None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            out[re.sub(pattern, repl, key)] = value
            return
    raise KeyError(f"{key} is not a key of torchvision's {model}")


# torchvision's FCNHead is Sequential(conv, bn, relu, dropout, conv): children 0, 1 and 4
FCN_HEAD_RULES = (
    (r"^(classifier|aux_classifier)\.0\.weight$", r"\1.block.conv.weight"),
    (r"^(classifier|aux_classifier)\.1\.(.+)$", r"\1.block.norm.\2"),
    (r"^(classifier|aux_classifier)\.4\.(weight|bias)$", r"\1.classifier.\2"),
)


def backbone_from_torchvision(state_dict: StateDict) -> StateDict:
    """torchvision's ``backbone.*`` (an IntermediateLayerGetter over a ResNet) -> ``encoder.body.*``."""
    from cnnlab.models.resnet import from_torchvision as resnet_from_torchvision

    prefix = "backbone."
    body = resnet_from_torchvision({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    return {f"encoder.body.{k}": v for k, v in body.items()}


def _rename_heads(state_dict: StateDict) -> StateDict:
    return {re.sub(r"^classifier\.", "head.", re.sub(r"^aux_classifier\.", "aux_head.", k)): v
            for k, v in state_dict.items()}


def from_torchvision(state_dict: StateDict) -> StateDict:
    """torchvision ``fcn_resnet50`` state_dict -> cnnlab's layout (``backbone.*`` -> ``encoder.body.*``,
    ``classifier``/``aux_classifier`` -> ``head``/``aux_head``)."""
    heads: StateDict = {}
    for key, value in state_dict.items():
        if not key.startswith("backbone."):
            _head_from_torchvision(key, value, heads, FCN_HEAD_RULES, "fcn_resnet50")
    return {**backbone_from_torchvision(state_dict), **_rename_heads(heads)}


@register_model(FCN_FAMILY, task="segmentation", default_input=(3, 520, 520),
                notes="torchvision's FCN on any registered classifier (backbone='resnet50'): output_stride 8 "
                      "(dilated), FCNHead, aux_loss (aux head on the stage before the last), bilinear to the input size.")
def fcn(*, backbone: str = "resnet50", num_classes: int = 21, output_stride: int = 8, aux_loss: bool = False,
        in_channels: int = 3, backbone_weights: str | os.PathLike | None = None,
        norm_layer: Any = None) -> SimpleSegmentationModel:
    """torchvision's FCN on ``backbone``."""
    return _fcn("fcn", backbone, num_classes=num_classes, output_stride=output_stride, aux_loss=aux_loss,
                in_channels=in_channels, backbone_weights=backbone_weights, norm_layer=norm_layer)


@register_model(FCN_FAMILY, task="segmentation", default_input=(3, 520, 520),
                converters={"torchvision": from_torchvision},
                pretrained={"torchvision": "fcn_resnet50"},
                notes="torchvision's layout: ResNet-50 at output stride 8, FCNHead, aux head on layer3 (aux_loss); "
                      "35.3M parameters with aux at 21 classes (torchvision's docs: 35,322,218).")
def fcn_resnet50(*, num_classes: int = 21, aux_loss: bool = False, in_channels: int = 3,
                 backbone_weights: str | os.PathLike | None = None, norm_layer: Any = None) -> SimpleSegmentationModel:
    """torchvision's ``fcn_resnet50``."""
    return _fcn("fcn_resnet50", "resnet50", num_classes=num_classes, output_stride=8, aux_loss=aux_loss,
                in_channels=in_channels, backbone_weights=backbone_weights, norm_layer=norm_layer)
