"""``unet``: U-Net (Ronneberger et al. 2015), the paper's network and the encoder-decoder on any backbone.

Without a backbone, :class:`UNet` is the paper's Fig. 1: a contracting path of levels of two 3x3 convs +
ReLU (64, 128, 256, 512, 1024 channels) separated by 2x2 max pools, an expanding path of 2x2 up-convs
that halve the channels, each followed by the concatenation with the contracting path's map of the
same level (centre-cropped: the unpadded convs made it larger) and two 3x3 convs, and a 1x1 conv to
the classes. With ``padding="valid"`` (the paper's, the default) the convs are unpadded and a tile of
572x572 pixels gives 388x388 logits (:func:`unet_output_size`); ``forward`` meets the segmentation
convention (logits at the input size) with the paper's overlap-tile strategy: it extrapolates the
missing context by mirroring the image, runs the smallest tile that covers it, and crops.
``forward_tile`` runs the bare network on one tile. ``padding="same"`` pads every conv (any input size,
no mirroring, cheaper).

With ``backbone=NAME``, :class:`EncoderUNet` is smp's ``Unet`` on a registered classifier: every
``feature_info`` stage of the encoder feeds a decoder block (nearest up-sampling to the next shallower
stage's size, concatenation with it, two 3x3 conv + BN + ReLU), the last block up-samples to the input
size, and a 3x3 conv gives the logits. Its defaults are smp's (decoder channels 256, 128, 64, 32, 16,
batch norm, nearest, encoder depth 5), so smp's ``Unet(NAME, encoder_weights=None, classes=K)``
state_dict loads with ``cnnlab.load_weights`` (layout ``"smp"``) and gives the same logits.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct
from cnnlab.models.registry import Family, register_model
from cnnlab.segmentation._smp import drop_unused_encoder_keys, encoder_with_depth, unet_from_smp

__all__ = ["UNet", "UNetStage", "EncoderUNet", "UNetDecoder", "UNetDecoderConfig", "unet", "unet_output_size",
           "unet_input_size", "valid_input_sizes", "PAPER_STAGES"]

UNET = Family("U-Net", "Ronneberger et al., U-Net: Convolutional Networks for Biomedical Image Segmentation "
              "(MICCAI 2015)", 2015, "https://arxiv.org/abs/1505.04597")


# -- the valid-convolution tile arithmetic ---------------------------------------------------------------------
_SHRINK = 4  # two unpadded 3x3 convs per level take 2 * (3 - 1) pixels off a side's length


def _trace(input_size: int, depth: int) -> tuple[int, str | None]:
    """The output length, or why ``input_size`` does not tile (every 2x2 pool must halve an even length)."""
    n = input_size
    for level in range(depth):
        n -= _SHRINK
        if n < 2 or n % 2:
            return n, f"level {level + 1}'s two convs leave {n} pixels, which a 2x2 max pool cannot halve exactly"
        n //= 2
    n -= _SHRINK
    for _ in range(depth):
        if n < 1:
            break
        n = 2 * n - _SHRINK
    if n < 1:
        return n, "the expanding path's convs leave no pixel"
    return n, None


def _check(value: Any, what: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise CnnlabError(f"{what} must be an int >= {minimum}, got {value!r}")


def unet_input_size(output_size: int, *, depth: int = 4) -> int:
    """The smallest input length whose valid U-Net output is at least ``output_size`` (388 -> 572).

    ``depth`` counts the 2x2 poolings (4 in the paper). The valid inputs are ``2^d (m + 4) + 4 (2^d - 1)``
    for a bottom-level length ``m``, with outputs ``2^d m - 4 (2^d - 1)``: 572 and 388 for m = 28.
    """
    _check(output_size, "output_size", 1)
    _check(depth, "depth (the number of 2x2 poolings)", 0)
    step = 2 ** depth
    m = max(1, -(-(output_size + _SHRINK * (step - 1)) // step))  # the smallest bottom length reaching it
    return step * (m + _SHRINK) + _SHRINK * (step - 1)


def unet_output_size(input_size: int, *, depth: int = 4) -> int:
    """Output length of a valid-convolution U-Net with ``depth`` poolings (572 -> 388 with the paper's 4).

    An input it cannot tile raises a CnnlabError that names the nearest lengths that do.
    """
    _check(input_size, "input_size", 1)
    _check(depth, "depth (the number of 2x2 poolings)", 0)
    out, why = _trace(input_size, depth)
    if why is not None:
        below = valid_input_sizes(input_size - 2 ** (depth + 1), input_size, depth=depth)[-1:]  # one per 2^depth
        above = unet_input_size(max(1, _trace(below[0], depth)[0] + 1) if below else 1, depth=depth)
        near = " or ".join(str(n) for n in below + [above])
        first = unet_input_size(1, depth=depth)
        raise CnnlabError(f"a valid-convolution U-Net with {depth} poolings cannot take a tile of {input_size} "
                          f"pixels: {why}; the nearest sizes that tile are {near} (the sizes that tile are "
                          f"{first}, {first + 2 ** depth}, {first + 2 * 2 ** depth}, ... in steps of {2 ** depth}; "
                          "unet_input_size(n) gives the smallest tile for n output pixels), or use padding='same'")
    return out


def valid_input_sizes(low: int, high: int, *, depth: int = 4) -> list[int]:
    """The input lengths in ``[low, high]`` that a valid U-Net with ``depth`` poolings tiles exactly."""
    return [n for n in range(max(low, 1), high + 1) if _trace(n, depth)[1] is None]


def _mirror_pad(x: Tensor, left: int, right: int, top: int, bottom: int) -> Tensor:
    """Reflect-pad by any amount (the paper's extrapolation by mirroring), reflecting again where one is not
    enough: ``F.pad(mode="reflect")`` takes at most ``size - 1`` pixels per side and pass."""
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        if h == 1 or w == 1:  # nothing to reflect along a length of 1
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        step = [min(p, s - 1) for p, s in ((left, w), (right, w), (top, h), (bottom, h))]
        x = F.pad(x, tuple(step), mode="reflect")
        left, right, top, bottom = (p - s for p, s in zip((left, right, top, bottom), step))
    return x


# -- the paper's network ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetStage:
    """One level of the U: two 3x3 convs with ``out_channels`` maps (Ronneberger et al. 2015, Fig. 1)."""

    out_channels: int


# Fig. 1: 64, 128, 256, 512 on the contracting path, 1024 at the bottom; the expanding path mirrors them
PAPER_STAGES = tuple(UNetStage(c) for c in (64, 128, 256, 512, 1024))


class DoubleConv(nn.Sequential):
    """Two 3x3 convs (+norm) + ReLU: one level of either path."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, norm_layer: Callable[[int], nn.Module] | None,
                 act_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, padding=padding, norm_layer=norm_layer, act_layer=act_layer)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, padding=padding, norm_layer=norm_layer, act_layer=act_layer)


UP_MODES = ("transposed", "bilinear")


class BilinearUp(nn.Sequential):
    """Resize-then-conv (Odena et al. 2016): bilinear x2 (no parameters), then a 1x1 conv to ``out_channels``.

    The same output shape and MACs as the paper's 2x2 stride-2 up-conv (each output pixel sees one tap per input
    channel either way) with a quarter of its weights, and no checkerboard pattern at initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         nn.Conv2d(in_channels, out_channels, 1))


class UpLevel(nn.Module):
    """Expanding-path level: x2 up-sampling halving the channels, ``cat([skip, up])``, two 3x3 convs.

    ``up="transposed"`` is the paper's 2x2 "up-convolution"; ``"bilinear"`` is :class:`BilinearUp`.
    """

    def __init__(self, in_channels: int, out_channels: int, padding: int,
                 norm_layer: Callable[[int], nn.Module] | None, act_layer: Callable[..., nn.Module],
                 up: str = "transposed") -> None:
        super().__init__()
        self.crop = padding == 0
        self.up = (nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2) if up == "transposed"
                   else BilinearUp(in_channels, out_channels))
        self.conv = DoubleConv(2 * out_channels, out_channels, padding, norm_layer, act_layer)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)  # (B, C, h, w) -> (B, C/2, 2h, 2w)
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if self.crop:  # valid convs: the skip is larger; "cropping is necessary due to the loss of border pixels"
            skip = skip[..., dh // 2: dh // 2 + x.shape[-2], dw // 2: dw // 2 + x.shape[-1]]
        elif dh or dw:  # padded convs on an odd length: the pool dropped a row, the up-conv is one short; pad it
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """The U-Net of Ronneberger et al. 2015 (Fig. 1).

    Args:
        num_classes: output channels of the final 1x1 conv (2 in the paper: cell / background).
        in_channels: image channels (1 in the paper: grey microscopy).
        stages: the levels' widths, top first (:data:`PAPER_STAGES`: 64 ... 1024); ``len(stages) - 1`` poolings.
        padding: ``"valid"`` (the paper: unpadded convs, 572 -> 388 tiles, overlap-tile ``forward``) or ``"same"``
            (every conv padded by 1: the output of ``forward_tile`` is already at the input size).
        norm_layer: None in the paper (it predates batch norm's spread); ``nn.BatchNorm2d`` is the common variant.
        act_layer: ReLU in the paper.
        up: the expanding path's x2 up-sampling: ``"transposed"`` (the paper's 2x2 stride-2 up-conv) or
            ``"bilinear"`` (bilinear x2 then a 1x1 conv, :class:`BilinearUp`); docs/upsampling.md compares them.
    """

    def __init__(self, *, num_classes: int = 2, in_channels: int = 1, stages: Sequence[UNetStage] = PAPER_STAGES,
                 padding: str = "valid", norm_layer: Callable[[int], nn.Module] | None = None,
                 act_layer: Callable[..., nn.Module] = nn.ReLU, up: str = "transposed") -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise CnnlabError(f"padding must be 'valid' (the paper's unpadded convs) or 'same', got {padding!r}")
        if up not in UP_MODES:
            raise CnnlabError(f"unet: up must be 'transposed' (the paper's 2x2 up-conv) or 'bilinear' (bilinear x2 "
                              f"+ 1x1 conv), got {up!r}")
        if len(stages) < 1:
            raise CnnlabError("unet needs at least one stage")
        _check(num_classes, "num_classes", 1)
        self.num_classes, self.in_channels, self.padding = num_classes, in_channels, padding
        self.depth = len(stages) - 1  # the number of 2x2 poolings
        pad = 0 if padding == "valid" else 1
        widths = [s.out_channels for s in stages]
        self.encoder = nn.ModuleList(DoubleConv(c_in, c_out, pad, norm_layer, act_layer)
                                     for c_in, c_out in zip([in_channels] + widths[:-1], widths))
        self.pool = nn.MaxPool2d(2, 2)
        self.decoder = nn.ModuleList(UpLevel(c_in, c_out, pad, norm_layer, act_layer, up)
                                     for c_in, c_out in zip(widths[:0:-1], widths[-2::-1]))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        for m in self.modules():
            # Sec. 3: "Gaussian distribution with a standard deviation of sqrt(2/N), N the incoming nodes of one neuron"
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in" if isinstance(m, nn.Conv2d) else "fan_out",
                                        nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``forward_tile``'s output (H, W) for an input (H, W); raises for a valid-conv tile that does not fit."""
        if self.padding == "same":
            return size
        return (unet_output_size(size[0], depth=self.depth), unet_output_size(size[1], depth=self.depth))

    def forward_tile(self, x: Tensor) -> Tensor:
        """The bare network on one tile: (B, C, 572, 572) -> (B, K, 388, 388) with valid convs."""
        self._check_input(x)
        self.output_size(tuple(x.shape[-2:]))  # a tile that does not fit raises here, before any compute
        skips = []
        for i, level in enumerate(self.encoder):
            x = level(x if i == 0 else self.pool(x))
            skips.append(x)
        for level, skip in zip(self.decoder, skips[-2::-1]):
            x = level(x, skip)
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits at the input size: padded convs directly; valid convs with the overlap-tile strategy."""
        if self.padding == "same":
            return self.forward_tile(x)
        self._check_input(x)
        h, w = x.shape[-2:]
        tile_h, tile_w = unet_input_size(h, depth=self.depth), unet_input_size(w, depth=self.depth)
        margin_h = (tile_h - unet_output_size(tile_h, depth=self.depth)) // 2  # 92 in the paper
        margin_w = (tile_w - unet_output_size(tile_w, depth=self.depth)) // 2
        tile = _mirror_pad(x, margin_w, tile_w - w - margin_w, margin_h, tile_h - h - margin_h)
        return self.forward_tile(tile)[..., :h, :w]

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise CnnlabError(f"unet expects input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")


# -- the encoder-decoder on a backbone (smp's Unet) ---------------------------------------------------------------
# smp's Unet defaults (segmentation_models_pytorch 0.6, decoders/unet/model.py): decoder_channels, encoder_depth 5
SMP_DECODER_CHANNELS = (256, 128, 64, 32, 16)


@dataclass(frozen=True)
class UNetDecoderConfig:
    """The decoder of :class:`EncoderUNet`; the defaults are smp's ``Unet``'s.

    ``channels``: each block's output, deepest first (one block per encoder stage); ``interpolation``: the
    up-sampling before each block (``F.interpolate`` mode, smp's ``"nearest"``); ``center``: two more 3x3
    convs on the deepest map before the first block (smp adds them for VGG encoders only).
    """

    channels: tuple[int, ...] = SMP_DECODER_CHANNELS
    interpolation: str = "nearest"
    center: bool = False


class UNetDecoderBlock(nn.Module):
    """Up-sample to the skip's size, ``cat([x, skip])``, two 3x3 conv + norm + ReLU (smp's ``UnetDecoderBlock``)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, interpolation: str,
                 norm_layer: Callable[[int], nn.Module] | None, act_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.interpolation = interpolation
        self.conv1 = ConvNormAct(in_channels + skip_channels, out_channels, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, norm_layer=norm_layer, act_layer=act_layer)

    def forward(self, x: Tensor, size: tuple[int, int], skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, size=size, mode=self.interpolation)  # (B, C, h, w) -> (B, C, H, W) of the skip
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """The expanding path on an encoder's stages: block i joins stage ``n - 1 - i``; the last one reaches the input.

    Args:
        encoder_channels: channels of the encoder's stages, shallow first.
        config: :class:`UNetDecoderConfig`.
        norm_layer, act_layer: of every conv (batch norm and ReLU, as smp).
    """

    def __init__(self, encoder_channels: Sequence[int], config: UNetDecoderConfig = UNetDecoderConfig(),
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] = nn.ReLU) -> None:
        super().__init__()
        if len(config.channels) != len(encoder_channels):
            raise CnnlabError(f"unet: decoder_channels={tuple(config.channels)} has {len(config.channels)} blocks but "
                              f"the encoder returns {len(encoder_channels)} stages; give one width per stage")
        deepest = encoder_channels[-1]
        self.center: nn.Module = DoubleConv(deepest, deepest, 1, norm_layer, act_layer) if config.center else nn.Identity()
        in_channels = [deepest, *config.channels[:-1]]
        skip_channels = [*encoder_channels[-2::-1], 0]  # the shallower stages, deepest first; none at the input size
        self.blocks = nn.ModuleList(
            UNetDecoderBlock(c_in, c_skip, c_out, config.interpolation, norm_layer, act_layer)
            for c_in, c_skip, c_out in zip(in_channels, skip_channels, config.channels))
        self.out_channels = config.channels[-1]

    def forward(self, features: Sequence[Tensor], input_size: tuple[int, int]) -> Tensor:
        skips = [*features[-2::-1], None]
        sizes = [*(f.shape[-2:] for f in features[-2::-1]), input_size]
        x = self.center(features[-1])
        for block, size, skip in zip(self.blocks, sizes, skips):
            x = block(x, tuple(size), skip)
        return x


class EncoderUNet(nn.Module):
    """U-Net on a registered classifier: encoder (``feature_info`` stages), :class:`UNetDecoder`, 3x3 conv head.

    Args:
        encoder: a module returning its stages' maps, shallow first, with ``channels`` (see ``_smp``).
        num_classes: output channels (background included).
        decoder: :class:`UNetDecoderConfig`.
        norm_layer: of the decoder's convs.
    """

    head_name = "head"

    def __init__(self, encoder: nn.Module, num_classes: int, decoder: UNetDecoderConfig = UNetDecoderConfig(),
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d) -> None:
        super().__init__()
        _check(num_classes, "num_classes", 1)
        self.num_classes, self.decoder_config = num_classes, decoder
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.channels, decoder, norm_layer)
        self.head = nn.Conv2d(self.decoder.out_channels, num_classes, 3, padding=1)
        _smp_init(self.decoder, self.head)

    def forward(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        features = list(features.values()) if isinstance(features, dict) else list(features)
        return self.head(self.decoder(features, tuple(x.shape[-2:])))  # (B, K, H, W): the input's size

    def filter_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Called by ``load_weights``: the encoder stages this model does not run are not needed."""
        return drop_unused_encoder_keys(self, state_dict)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.head.in_channels, num_classes, 3, padding=1)
        _smp_init(None, self.head)


def _smp_init(decoder: nn.Module | None, head: nn.Module) -> None:
    """smp's ``initialize_decoder``/``initialize_head``: He-uniform (fan in) decoder convs, Xavier-uniform head."""
    for m in decoder.modules() if decoder is not None else ():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
    for m in head.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# -- the builder -------------------------------------------------------------------------------------------------
@register_model(UNET, task="segmentation", default_input=(1, 572, 572), converters={"smp": unet_from_smp},
                notes="No backbone: the paper's network (valid convs, 572 -> 388 tiles, 31.0M parameters at 2 classes; "
                      "forward mirrors the context so logits are at the input size; padding='same' for padded convs). "
                      "backbone=NAME: smp's Unet on that classifier (decoder 256-128-64-32-16, batch norm, nearest), "
                      "loads smp's state_dict.")
def unet(
    *, backbone: str | None = None, num_classes: int = 2, in_channels: int | None = None,
    padding: str | None = None, stages: Sequence[UNetStage] | None = None, channels: Sequence[int] | None = None,
    norm_layer: Callable[[int], nn.Module] | None = None, act_layer: Callable[..., nn.Module] = nn.ReLU,
    encoder_depth: int | None = None, decoder_channels: Sequence[int] | None = None,
    decoder_interpolation: str = "nearest", decoder_center: bool = False, output_stride: int = 32,
    backbone_weights: Any = None, up: str | None = None,
) -> nn.Module:
    """U-Net: the paper's (no ``backbone``; ``padding``, ``stages`` or ``channels``: the levels' widths, as a table or
    plain ints such as ``(16, 32, 64, 128, 256)`` for a small one; ``norm_layer``; ``up``: ``"transposed"`` up-convs
    as in the paper or ``"bilinear"`` x2 + 1x1 conv) or smp's on ``backbone``
    (``encoder_depth``, ``decoder_channels``, ``decoder_interpolation``, ``decoder_center``, ``output_stride``,
    ``backbone_weights``; ``norm_layer`` of the decoder, batch norm by default)."""
    if channels is not None:
        if stages is not None:
            raise CnnlabError("unet: give stages (UNetStage rows) or channels (ints), not both")
        if not channels or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in channels):
            raise CnnlabError(f"unet: channels must be positive ints, top level first (the paper's 64, 128, 256, 512, "
                              f"1024), got {channels!r}")
        stages = tuple(UNetStage(c) for c in channels)
    if backbone is None:
        given = {k: v for k, v in (("encoder_depth", encoder_depth), ("decoder_channels", decoder_channels),
                                   ("backbone_weights", backbone_weights)) if v is not None}
        if decoder_interpolation != "nearest" or decoder_center or output_stride != 32:
            given["decoder_*/output_stride"] = "..."
        if given:
            raise CnnlabError(f"unet: {', '.join(given)} apply to the encoder-decoder on a backbone; give backbone=NAME "
                              "or leave them out for the paper's network")
        model: nn.Module = UNet(num_classes=num_classes, in_channels=1 if in_channels is None else in_channels,
                                stages=PAPER_STAGES if stages is None else stages,
                                padding="valid" if padding is None else padding, norm_layer=norm_layer,
                                act_layer=act_layer, up="transposed" if up is None else up)
    else:
        if stages is not None or padding not in (None, "same") or up is not None:
            raise CnnlabError(f"unet(backbone={backbone!r}): padding={padding!r}/stages/channels/up are options of the "
                              "paper's network (no backbone); the encoder-decoder pads every conv, up-samples with "
                              "decoder_interpolation (decoder_channels "
                              "sets its widths)")
        encoder = encoder_with_depth(backbone, depth=encoder_depth, output_stride=output_stride,
                                             weights=backbone_weights, in_channels=3 if in_channels is None else in_channels,
                                             model="unet")
        depth = len(encoder.channels)
        channels = tuple(SMP_DECODER_CHANNELS[:depth] if decoder_channels is None else decoder_channels)
        if decoder_interpolation not in ("nearest", "bilinear", "bicubic", "area", "nearest-exact"):
            raise CnnlabError(f"unet: decoder_interpolation={decoder_interpolation!r}; expected nearest, bilinear, "
                              "bicubic, area or nearest-exact")
        model = EncoderUNet(encoder, num_classes, UNetDecoderConfig(channels, decoder_interpolation, decoder_center),
                            norm_layer=nn.BatchNorm2d if norm_layer is None else norm_layer)
    model.model_name = "unet"  # create_model sets it too; direct calls need it for load_weights' converters
    model.in_channels = (1 if backbone is None else 3) if in_channels is None else in_channels
    return model
