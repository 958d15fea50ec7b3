"""Convolution-deconvolution networks that up-sample with max-unpooling indices: SegNet and DeconvNet.

Both take a VGG-style encoder whose stages end in 2x2 max pooling (VGG-16 with batch norm, the 13 convs
of both papers) and keep, at every pool, the *indices* of the maxima ("pooling switches"). The decoder
mirrors the encoder: each stage first un-pools (``nn.MaxUnpool2d``), putting every value back at the
position its maximum came from and zeros elsewhere, a sparse map at twice the size, then densifies it
with convs. The indices cost 2 bits per pooled value instead of a skip's whole feature map (SegNet's
argument against U-Net-style concatenation), and boundaries land where the encoder saw them.

- :func:`segnet` (Badrinarayanan et al., TPAMI 2017): decoder convs 3x3 + BN + ReLU, 13 of them
  (the last maps to the classes), no fully connected layers: 29.4M parameters with VGG-16.
- :func:`deconvnet` (Noh et al., ICCV 2015): VGG-16's fc6/fc7 as a 7x7 and a 1x1 conv (4096 channels, the
  map shrinks to 1x1 at 224 px), a 7x7 deconvolution back to 7x7, then 13 3x3 deconvolutions (transposed
  convs) + BN + ReLU between the unpoolings, and a 1x1 classifier: 252M parameters, as the SegNet paper's
  Table 6 counts. Its input must be at least ``32 * fc_kernel`` pixels on each side (224 with the 7x7 fc6).

The encoder is taken from any registered classifier (``backbone=``, ``vgg16_bn`` by default) whose
``feature_info`` stages are ``nn.Sequential`` ending in a 2x2 max pool (cnnlab's VGGs): its convs are
reused, so ``backbone_weights`` (a cnnlab run folder or weights file of that classifier) initialise them; in
DeconvNet they also initialise fc6 and fc7 from the classifier's fully connected layers, reshaped into convs
as the paper does (FCN's :func:`~cnnlab.segmentation.fcn.load_fc_as_conv`; with batch norm after them, the
weights only).
Logits come at the input size for any size the pools can halve (odd sizes too: each unpooling restores the
exact size its pool saw).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct
from cnnlab.models.registry import Family, register_model
from cnnlab.segmentation.fcn import classifier_state_dict, load_fc_as_conv

__all__ = ["ConvDeconvNet", "EncoderStage", "DecoderStage", "segnet", "deconvnet", "pooled_stages"]

SEGNET = Family("SegNet", "Badrinarayanan et al., SegNet: A Deep Convolutional Encoder-Decoder Architecture for "
                "Image Segmentation (TPAMI 2017)", 2017, "https://arxiv.org/abs/1511.00561")
DECONVNET = Family("DeconvNet", "Noh et al., Learning Deconvolution Network for Semantic Segmentation (ICCV 2015)",
                   2015, "https://arxiv.org/abs/1505.04366")


class EncoderStage(nn.Module):
    """Convs, then a 2x2 max pool that also returns the argmax indices.

    Args:
        convs: the stage's conv layers (from the backbone).
    """

    def __init__(self, convs: nn.Sequential) -> None:
        super().__init__()
        self.convs = convs
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, torch.Size]:
        x = self.convs(x)
        pooled, indices = self.pool(x)  # (B, C, H, W) -> (B, C, H/2, W/2) and where each maximum was
        return pooled, indices, x.shape


class DecoderStage(nn.Module):
    """Max-unpooling with the encoder's indices, then convs (or transposed convs) that densify the sparse map.

    Args:
        layers: the stage's conv layers, applied after unpooling.
    """

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.convs = layers

    def forward(self, x: Tensor, indices: Tensor, size: torch.Size) -> Tensor:
        x = self.unpool(x, indices, output_size=size[-2:])  # each value back at its argmax, zeros elsewhere
        return self.convs(x)


class ConvDeconvNet(nn.Module):
    """Encoder stages with pooling indices, a bottleneck, mirrored unpooling decoder stages, a classifier.

    Args:
        encoder: :class:`EncoderStage` list, input side first.
        decoder: :class:`DecoderStage` list, deepest first.
        head: the classifier conv, on the last decoder stage's output.
        bottleneck: what runs between the deepest pool and the first unpooling (identity in SegNet, fc6-fc7 and
            the fc6 deconvolution in DeconvNet).
        num_classes: output channels (background included).
        min_size: the smallest input side the network takes.
    """

    def __init__(self, encoder: Sequence[EncoderStage], decoder: Sequence[DecoderStage], head: nn.Module,
                 bottleneck: nn.Module, num_classes: int, min_size: int) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(encoder)
        self.bottleneck = bottleneck
        self.decoder = nn.ModuleList(decoder)
        self.head = head
        self.num_classes, self.min_size = num_classes, min_size

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or min(x.shape[-2:]) < self.min_size:
            raise CnnlabError(f"{getattr(self, 'model_name', 'conv-deconv net')} expects input (B, C, H, W) with H and W "
                              f">= {self.min_size} (its {len(self.encoder)} 2x2 pools and bottleneck), got {tuple(x.shape)}")
        switches = []
        for stage in self.encoder:
            x, indices, size = stage(x)
            switches.append((indices, size))
        x = self.bottleneck(x)
        for stage, (indices, size) in zip(self.decoder, reversed(switches)):
            x = stage(x, indices, size)
        return self.head(x)  # (B, K, H, W): the input's size

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier layer (same kernel) for ``num_classes``, initialised as the builder does."""
        old = self.head
        self.head = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, padding=old.padding)
        nn.init.kaiming_normal_(self.head.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes


# -- the encoder from a registered classifier ------------------------------------------------------------------
def pooled_stages(backbone: str, *, in_channels: int = 3, weights: Any = None, model: str = "segnet") -> list[nn.Sequential]:
    """The conv layers of each ``feature_info`` stage of ``backbone``, whose stages must end in a 2x2 max pool."""
    from cnnlab.models.registry import create_model, model_info

    info = model_info(backbone)
    if info.task != "classification":
        raise CnnlabError(f"{model}: backbone={backbone!r} is a {info.task} model; give a registered classifier")
    device = torch.empty(0).device  # where the caller builds (a torch.device context, meta for counting)
    with torch.device("meta"):  # only the convs are kept: VGG's 120M-parameter head is never allocated
        classifier = create_model(backbone, in_channels=in_channels)
    head = getattr(classifier, "head_name", "head").split(".")[0]
    if hasattr(classifier, head):
        setattr(classifier, head, nn.Identity())
    classifier.to_empty(device=device)  # initialised by the model's builder, or loaded here
    if weights is not None:
        from cnnlab.detection.backbone import load_backbone_weights

        load_backbone_weights(classifier, weights)  # the file's head keys are left out; a missing conv key raises
    stages = []
    for f in getattr(classifier, "feature_info", []):
        stage = classifier.get_submodule(f.module)
        last = list(stage.children())[-1] if isinstance(stage, nn.Sequential) and len(stage) else None
        if not (isinstance(last, nn.MaxPool2d) and last.kernel_size in (2, (2, 2)) and last.stride in (2, (2, 2))):
            raise CnnlabError(f"{model} un-pools with the encoder's max-pooling indices, so every stage of its backbone "
                              f"must end in a 2x2/2 max pool; {backbone}'s stage {f.module!r} ends in "
                              f"{type(last).__name__ if last is not None else 'no layer'}: use a VGG (vgg16_bn, vgg11_bn, ...)")
        stages.append(nn.Sequential(*list(stage.children())[:-1]))
    if not stages:
        raise CnnlabError(f"{model}: backbone={backbone!r} lists no feature_info stages")
    return stages


def _conv_layers(stage: nn.Sequential) -> list[nn.Conv2d]:
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)]


def _mirror(stages: Sequence[nn.Sequential], in_channels: int) -> list[list[tuple[int, int]]]:
    """(in, out) channels of each decoder stage's layers, deepest first: each encoder conv mirrored, the stage's
    last layer going back to the stage's input width (the first stage's back to its own width: the head follows)."""
    out = []
    for i, stage in reversed(list(enumerate(stages))):
        convs = _conv_layers(stage)
        widths = [c.out_channels for c in convs]
        target = convs[0].in_channels if i > 0 else widths[0]
        out.append([(widths[-1], widths[-1])] * (len(convs) - 1) + [(widths[-1], target)])
    return out


def _init(model: nn.Module, skip: Sequence[nn.Module] = ()) -> None:
    """VGG's scheme (He-normal fan-out convs, biases 0; BN at (1, 0)) on the layers this file adds."""
    kept = {id(m) for part in skip for m in part.modules()}
    for m in model.modules():
        if id(m) in kept:
            continue
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
            m.reset_running_stats()


def _check_classes(num_classes: Any, model: str) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise CnnlabError(f"{model}: num_classes must be an int >= 1 (background included), got {num_classes!r}")


@register_model(SEGNET, task="segmentation", default_input=(3, 360, 480),
                notes="VGG-16-BN encoder with max-pooling indices, mirrored decoder of 13 3x3 conv+BN+ReLU after "
                      "each unpooling; 29.4M parameters (the paper's Table 6: 29.5M). backbone= any classifier "
                      "whose stages end in 2x2 max pools; backbone_weights.")
def segnet(*, backbone: str = "vgg16_bn", num_classes: int = 12, in_channels: int = 3,
           norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d, backbone_weights: Any = None) -> ConvDeconvNet:
    """SegNet (default 12 classes: CamVid's 11 and void)."""
    _check_classes(num_classes, "segnet")
    encoder_convs = pooled_stages(backbone, in_channels=in_channels, weights=backbone_weights, model="segnet")
    decoder = []
    for j, layers in enumerate(_mirror(encoder_convs, in_channels)):
        last_stage = j == len(encoder_convs) - 1
        convs = [ConvNormAct(c_in, c_out, 3, norm_layer=norm_layer) for c_in, c_out in layers[:-1 if last_stage else None]]
        decoder.append(DecoderStage(nn.Sequential(*convs)))
    width = _mirror(encoder_convs, in_channels)[-1][-1][1]
    # the last decoder conv "produces ... K feature maps" fed to the soft-max (Sec. 3): a 3x3 conv to the classes
    head = nn.Conv2d(width, num_classes, 3, padding=1)
    model = ConvDeconvNet([EncoderStage(s) for s in encoder_convs], decoder, head, nn.Identity(), num_classes,
                          min_size=2 ** len(encoder_convs))
    _init(model, skip=model.encoder if backbone_weights is not None else ())
    model.model_name, model.in_channels = "segnet", in_channels
    return model


@register_model(DECONVNET, task="segmentation", default_input=(3, 224, 224),
                notes="VGG-16-BN encoder, fc6 (7x7 conv) and fc7 (1x1 conv) of 4096, a 7x7 deconvolution, then "
                      "unpooling + 3x3 deconvolutions (transposed convs) + BN + ReLU, 1x1 classifier; 252M parameters "
                      "(SegNet paper, Table 6). fc_channels, fc_kernel; input >= 32 * fc_kernel.")
def deconvnet(*, backbone: str = "vgg16_bn", num_classes: int = 21, in_channels: int = 3,
              norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d, fc_channels: int = 4096,
              fc_kernel: int = 7, backbone_weights: Any = None) -> ConvDeconvNet:
    """DeconvNet (default 21 classes: Pascal VOC)."""
    _check_classes(num_classes, "deconvnet")
    if not isinstance(fc_kernel, int) or fc_kernel < 1 or not isinstance(fc_channels, int) or fc_channels < 1:
        raise CnnlabError(f"deconvnet: fc_kernel and fc_channels must be positive ints, got {fc_kernel!r}, {fc_channels!r}")
    encoder_convs = pooled_stages(backbone, in_channels=in_channels, weights=backbone_weights, model="deconvnet")
    deepest = _conv_layers(encoder_convs[-1])[-1].out_channels
    # fc6 as a conv over the whole 7x7 map (1x1 out at 224 px), fc7 as a 1x1 conv, then "deconv-fc6" back to 7x7
    bottleneck = nn.Sequential()
    bottleneck.add_module("fc6", ConvNormAct(deepest, fc_channels, fc_kernel, padding=0, norm_layer=norm_layer))
    bottleneck.add_module("fc7", ConvNormAct(fc_channels, fc_channels, 1, norm_layer=norm_layer))
    bottleneck.add_module("deconv_fc6", nn.ConvTranspose2d(fc_channels, deepest, fc_kernel, bias=norm_layer is None))
    if norm_layer is not None:
        bottleneck.add_module("norm", norm_layer(deepest))
    bottleneck.add_module("act", nn.ReLU(inplace=True))
    decoder = []
    for layers in _mirror(encoder_convs, in_channels):
        deconvs: list[nn.Module] = []
        for c_in, c_out in layers:
            deconvs += [nn.ConvTranspose2d(c_in, c_out, 3, padding=1, bias=norm_layer is None),
                        *([norm_layer(c_out)] if norm_layer is not None else []), nn.ReLU(inplace=True)]
        decoder.append(DecoderStage(nn.Sequential(*deconvs)))
    width = _mirror(encoder_convs, in_channels)[-1][-1][1]
    head = nn.Conv2d(width, num_classes, 1)  # the paper's score layer: 1x1 to the classes
    model = ConvDeconvNet([EncoderStage(s) for s in encoder_convs], decoder, head, bottleneck, num_classes,
                          min_size=fc_kernel * 2 ** len(encoder_convs))
    _init(model, skip=model.encoder if backbone_weights is not None else ())
    if backbone_weights is not None:  # Noh et al. start the whole convolution network, fc6/fc7 too, from VGG-16
        load_fc_as_conv({"fc6": bottleneck.fc6.conv, "fc7": bottleneck.fc7.conv},
                        classifier_state_dict(backbone_weights), model="deconvnet")
    model.model_name, model.in_channels = "deconvnet", in_channels
    return model
