"""``pspnet``: the Pyramid Scene Parsing Network (Zhao et al., CVPR 2017) on any registered classifier.

The encoder's last map goes through the pyramid pooling module (:class:`cnnlab.layers.pyramid_pooling.
PyramidPooling`, bins 1, 2, 3, 6), a conv to 512 channels, dropout and a conv to the classes; the logits
are up-sampled bilinearly to the input size. With ``aux_loss`` a second head (3x3 conv to 256, dropout,
1x1 conv) on the encoder's penultimate stage gives deep supervision (the paper's auxiliary loss on
res4b22, weighted 0.4) and the output is ``{"out": ..., "aux": ...}``, both at the input size, in train
and eval mode alike (torchvision's convention).

Two presets (:class:`PSPNetConfig`), because smp's PSPNet is not the paper's:

- :data:`PAPER` (``pspnet()``, no backbone: ResNet-50): the encoder dilated to output stride 8 and used to
  its last stage, a 3x3 bottleneck conv, dropout 0.1, a 1x1 classifier, batch norm on every bin, the
  auxiliary head on;
- :data:`SMP` (``pspnet(backbone=NAME)``): smp's ``PSPNet`` defaults (segmentation_models_pytorch 0.6):
  ``encoder_depth=3`` (the encoder cut after its stride-8 stage, ``layer2`` of a ResNet, not dilated),
  ``psp_out_channels=512`` by a 1x1 conv, ``Dropout2d(0.2)``, a 3x3 classifier, no batch norm on the 1x1
  bin (a conv bias instead), ``upsampling=8`` with ``align_corners=True``; so smp's
  ``PSPNet(NAME, encoder_weights=None, classes=K)`` state_dict loads with ``cnnlab.load_weights``
  (layout ``"smp"``) and gives the same logits. ``preset="paper"`` takes the paper's settings on any backbone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct
from cnnlab.layers.pyramid_pooling import PyramidPooling
from cnnlab.models.registry import Family, register_model
from cnnlab.segmentation._smp import drop_unused_encoder_keys, encoder_with_depth, pspnet_from_smp

__all__ = ["PSPNet", "PSPNetConfig", "PSPDecoder", "PAPER", "SMP", "pspnet"]

PSPNET = Family("PSPNet", "Zhao et al., Pyramid Scene Parsing Network (CVPR 2017)", 2017,
                "https://arxiv.org/abs/1612.01105")


@dataclass(frozen=True)
class PSPNetConfig:
    """What differs between the paper's PSPNet and smp's.

    ``encoder_depth``: encoder stages used (None: all); ``output_stride``: 8 or 16 dilates the encoder, 32 not;
    ``bins``: the pyramid; ``out_channels``, ``bottleneck_kernel``: the conv after the pyramid; ``dropout``:
    ``Dropout2d`` before the classifier; ``head_kernel``: the classifier conv's; ``global_norm``: batch norm on the
    1x1 bin too; ``align_corners``: of every bilinear up-sampling; ``aux_loss``: the auxiliary head on the
    penultimate stage, ``aux_channels`` wide.
    """

    encoder_depth: int | None = None
    output_stride: int = 8
    bins: tuple[int, ...] = (1, 2, 3, 6)
    out_channels: int = 512
    bottleneck_kernel: int = 3
    dropout: float = 0.1
    head_kernel: int = 1
    global_norm: bool = True
    align_corners: bool = True
    aux_loss: bool = True
    aux_channels: int = 256


# Zhao et al. 2017, Sec. 3.3 and 4.1 (dilated ResNet, "the final feature map size is 1/8 of the input image",
# deep supervision on res4b22 with weight 0.4); the Caffe release: 3x3 conv to 512, dropout 0.1, 1x1 classifier
PAPER = PSPNetConfig()
# segmentation_models_pytorch 0.6, decoders/pspnet/model.py defaults
SMP = PSPNetConfig(encoder_depth=3, output_stride=32, bottleneck_kernel=1, dropout=0.2, head_kernel=3,
                   global_norm=False, align_corners=True, aux_loss=False)
PRESETS = {"paper": PAPER, "smp": SMP}


class PSPDecoder(nn.Module):
    """Pyramid pooling, a conv (+BN+ReLU) to ``out_channels``, ``Dropout2d``.

    Args:
        in_channels: channels of the encoder's last map.
        config: :class:`PSPNetConfig` (bins, out_channels, bottleneck_kernel, dropout, global_norm, align_corners).
        norm_layer: of every conv.
    """

    def __init__(self, in_channels: int, config: PSPNetConfig,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.psp = PyramidPooling(in_channels, config.bins, norm_layer=norm_layer, global_norm=config.global_norm,
                                  align_corners=config.align_corners)
        self.bottleneck = ConvNormAct(self.psp.out_channels, config.out_channels, config.bottleneck_kernel,
                                      norm_layer=norm_layer)
        self.dropout = nn.Dropout2d(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.bottleneck(self.psp(x)))  # (B, C, h, w) -> (B, 512, h, w)


class PSPNet(nn.Module):
    """Encoder, :class:`PSPDecoder`, classifier conv, bilinear up-sampling; optionally the auxiliary head.

    Args:
        encoder: a module returning its stages' maps, shallow first, with ``channels``
            (:func:`cnnlab.segmentation.encoder.build_encoder`).
        num_classes: output channels (background included).
        config: :class:`PSPNetConfig` (:data:`PAPER` or :data:`SMP`).
        norm_layer: of the decoder's and the auxiliary head's convs.
    """

    head_name = "head"
    head_names = ("head", "aux_head.classifier")  # the class-dependent layers (fine-tuning to new classes)
    aux_loss_weight = 0.4  # Zhao et al. 2017, Sec. 3.3: "the weight of the auxiliary loss ... 0.4"

    def __init__(self, encoder: nn.Module, num_classes: int, config: PSPNetConfig = PAPER,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise CnnlabError(f"pspnet: num_classes must be an int >= 1, got {num_classes!r}")
        if config.aux_loss and len(encoder.channels) < 2:
            raise CnnlabError("pspnet: aux_loss=True puts the auxiliary head on the encoder's penultimate stage, but "
                              f"the encoder returns {len(encoder.channels)} stage; use a deeper encoder_depth")
        self.num_classes, self.config = num_classes, config
        self.encoder = encoder
        self.decoder = PSPDecoder(encoder.channels[-1], config, norm_layer)
        self.head = nn.Conv2d(config.out_channels, num_classes, config.head_kernel, padding=config.head_kernel // 2)
        self.aux_head: nn.Module | None = None
        if config.aux_loss:
            self.aux_head = nn.Sequential()
            self.aux_head.add_module("conv", ConvNormAct(encoder.channels[-2], config.aux_channels, 3,
                                                         norm_layer=norm_layer))
            self.aux_head.add_module("dropout", nn.Dropout2d(0.1))
            self.aux_head.add_module("classifier", nn.Conv2d(config.aux_channels, num_classes, 1))
        _init(self)

    def _upsample(self, x: Tensor, size: Sequence[int]) -> Tensor:
        # = smp's nn.Upsample(scale_factor=8, align_corners=True) where the input divides by 8 (with align_corners
        # the sampling grid depends only on the two sizes); elsewhere it still reaches the input's size exactly
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=self.config.align_corners)

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        features = self.encoder(x)
        out = self._upsample(self.head(self.decoder(features[-1])), x.shape[-2:])  # (B, K, H, W)
        if self.aux_head is None:
            return out
        return {"out": out, "aux": self._upsample(self.aux_head(features[-2]), x.shape[-2:])}

    def filter_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Called by ``load_weights``: smp keeps the encoder stages it does not run (layer3, layer4 at depth 3)."""
        return drop_unused_encoder_keys(self, state_dict)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.head.in_channels, num_classes, self.config.head_kernel,
                              padding=self.config.head_kernel // 2)
        if self.aux_head is not None:
            self.aux_head.classifier = nn.Conv2d(self.config.aux_channels, num_classes, 1)
        _init(self, heads_only=True)


def _init(model: PSPNet, heads_only: bool = False) -> None:
    """smp's scheme: He-uniform (fan in) decoder convs, BN at (1, 0); Xavier-uniform classifiers."""
    convs = [] if heads_only else [model.decoder] + ([model.aux_head.conv] if model.aux_head is not None else [])
    for m in (m for part in convs for m in part.modules()):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
    for head in [model.head] + ([model.aux_head.classifier] if model.aux_head is not None else []):
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)


@register_model(PSPNET, task="segmentation", default_input=(3, 473, 473), converters={"smp": pspnet_from_smp},
                notes="No backbone: the paper's PSPNet on a dilated ResNet-50 (output stride 8, aux head). "
                      "backbone=NAME: smp's PSPNet defaults (encoder_depth 3, 1x1 conv to 512, upsampling 8), loads "
                      "smp's state_dict; preset='paper' for the paper's settings on any backbone.")
def pspnet(
    *, backbone: str | None = None, num_classes: int = 21, in_channels: int = 3, preset: str | None = None,
    aux_loss: bool | None = None, encoder_depth: int | None = None, output_stride: int | None = None,
    bins: Sequence[int] | None = None, psp_out_channels: int | None = None, psp_dropout: float | None = None,
    norm_layer: Callable[[int], nn.Module] | None = None, backbone_weights: Any = None,
) -> PSPNet:
    """PSPNet: ``preset`` ``"paper"`` (the default without a backbone, on resnet50) or ``"smp"`` (the default with
    one); the other options override the preset's fields (:class:`PSPNetConfig`)."""
    if preset is None:
        preset = "paper" if backbone is None else "smp"
    if preset not in PRESETS:
        raise CnnlabError(f"pspnet: preset={preset!r}; expected 'paper' (Zhao et al.) or 'smp' (smp's PSPNet defaults)")
    config = PRESETS[preset]
    overrides = {"aux_loss": aux_loss, "output_stride": output_stride,
                 "bins": tuple(bins) if bins is not None else None, "out_channels": psp_out_channels,
                 "dropout": psp_dropout}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if encoder_depth is not None:
        config = replace(config, encoder_depth=encoder_depth)
    name = "resnet50" if backbone is None else backbone
    encoder = encoder_with_depth(name, depth=config.encoder_depth, output_stride=config.output_stride,
                                 weights=backbone_weights, in_channels=in_channels, model="pspnet")
    model = PSPNet(encoder, num_classes, config, norm_layer=nn.BatchNorm2d if norm_layer is None else norm_layer)
    model.model_name = "pspnet"  # create_model sets it too; direct calls need it for load_weights' converters
    model.in_channels = in_channels
    return model
