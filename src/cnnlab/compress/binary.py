"""Binary networks: binary-weight networks (BWN) and XNOR-Net (Rastegari et al. 2016), on any nn.Module.

BWN (Rastegari et al. 2016 §3.1; BinaryConnect, Courbariaux et al. 2015, without the scale) replaces each
real filter ``W`` (output channel ``c``) by ``alpha_c * sign(W_c)`` with ``alpha_c = mean(|W_c|)``, the
least-squares optimal scale. XNOR-Net (§3.2) binarises the layer's input as well: ``sign(I)`` scaled by the
paper's ``K = A * k``, where ``A = mean_c |I|`` (over the input channels) and ``k`` is the conv's ``h x w``
box filter of ``1/(h w)`` (so ``K`` holds, at every output position, the mean ``|I|`` of the window the
filter sees). Then ``I * W ~ (sign(I) (*) sign(W)) . K alpha``: on binary hardware the convolution is XNOR
and popcount; here it is simulated in floating point (same numbers, no speed-up).

Gradients use the straight-through estimator with the hard-tanh clip (Courbariaux et al. 2016; XNOR-Net
§3.2): ``d sign(x)/dx := 1 if |x| <= 1 else 0``. ``alpha`` and ``K`` are differentiated by autograd. The
real-valued weights stay the layer's ``weight`` parameter: the optimizer updates them, the forward pass
binarises them every call.

The paper's XNOR block is BN -> binary activation -> binary conv -> pooling; the models here are usually
conv -> BN -> ReLU -> pooling, and ``sign`` of a ReLU output is all +1 (or 0). So an XNOR layer, by default,
carries its own BatchNorm on its input (``input_norm``, affine) and binarises the normalised input: each
binary conv sees BN -> sign -> conv whatever the model's order (its original BN/ReLU stay where they are).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError, did_you_mean

MODES = ("bwn", "xnor")
INPUT_SCALES = ("paper", "mean", "none")


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1 (binary values are +-1), gradient by the hard-tanh straight-through estimator."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)  # passed where |x| <= 1, zero where the clip saturates


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` in {-1, +1} (0 maps to +1) with the hard-tanh straight-through gradient ``1[|x| <= 1]``."""
    return _SignSTE.apply(x)


def binary_weight(weight: torch.Tensor) -> torch.Tensor:
    """``alpha_c * sign(W_c)`` per output channel ``c`` (dim 0), ``alpha_c = mean(|W_c|)`` (BWN, eq. 6)."""
    alpha = weight.abs().flatten(1).mean(1).view(-1, *([1] * (weight.dim() - 1)))  # (C_out, 1, ...)
    return sign_ste(weight) * alpha


@dataclass(frozen=True)
class BinaryConfig:
    """How a layer is binarised.

    Args:
        mode: ``"bwn"`` (binary weights, real activations) or ``"xnor"`` (binary weights and inputs).
        input_scale: XNOR only: ``"paper"`` (the paper's ``K`` map, per sample and output position),
            ``"mean"`` (the common simplification: one ``mean |x|`` per sample) or ``"none"``.
        input_norm: XNOR only: a BatchNorm on the layer's input before ``sign`` (the paper's BN -> sign
            -> conv block for models whose order differs; see the module docstring).
    """

    mode: Literal["bwn", "xnor"] = "bwn"
    input_scale: Literal["paper", "mean", "none"] = "paper"
    input_norm: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CnnlabError(f"binarisation mode {self.mode!r} is unknown; expected one of {', '.join(MODES)}")
        if self.input_scale not in INPUT_SCALES:
            raise CnnlabError(f"input_scale {self.input_scale!r} is unknown; expected one of {', '.join(INPUT_SCALES)}")


class _BinaryMixin:
    """The binarised input of an XNOR layer (shared by the conv and the linear layer)."""

    binary: BinaryConfig

    def _setup_input(self, config: BinaryConfig, features: int, norm: type[nn.Module]) -> None:
        self.binary = config
        xnor_norm = config.mode == "xnor" and config.input_norm
        self.input_norm = norm(features, device=self.weight.device, dtype=self.weight.dtype) if xnor_norm else None

    def _binary_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input the binary activation sees (after ``input_norm``: the paper's I) and its sign."""
        if self.input_norm is not None:
            x = self.input_norm(x)
        return x, sign_ste(x)


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """A Conv2d computing with ``alpha * sign(W)`` (and, in XNOR mode, ``K * sign(input)``).

    Same constructor as ``nn.Conv2d`` plus ``config``; ``weight`` (real-valued, updated by the optimizer) and
    ``bias`` keep their names, so a full-precision state_dict loads into it (XNOR adds ``input_norm.*``).

    Args:
        config: a :class:`BinaryConfig` (mode, input scale, input BatchNorm).
    """

    def __init__(self, *args, config: BinaryConfig = BinaryConfig(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_input(config, self.in_channels, nn.BatchNorm2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = binary_weight(self.weight)
        if self.binary.mode == "bwn":
            return self._conv_forward(x, w, self.bias)
        x, xb = self._binary_input(x)  # K is computed from the same (normalised) input
        if self.binary.input_scale == "none":
            return self._conv_forward(xb, w, self.bias)
        if self.binary.input_scale == "mean":
            k = x.abs().mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
            out = self._conv_forward(xb, w, None) * k
        else:  # the paper's K = A * k: the mean |I| of each window the filter sees, (N, 1, H', W')
            a = x.abs().mean(dim=1, keepdim=True)  # A, (N, 1, H, W)
            if self.padding_mode != "zeros":  # pad A as the input is padded, then slide without padding
                a = F.pad(a, self._reversed_padding_repeated_twice, mode=self.padding_mode)
                pad = 0
            else:
                pad = self.padding
            box = torch.full((1, 1, *self.kernel_size), 1.0 / (self.kernel_size[0] * self.kernel_size[1]),
                             dtype=x.dtype, device=x.device)
            k = F.conv2d(a, box, None, self.stride, pad, self.dilation)
            out = self._conv_forward(xb, w, None) * k
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class BinaryLinear(_BinaryMixin, nn.Linear):
    """A Linear layer computing with ``alpha * sign(W)`` per output feature (XNOR: ``K * sign(input)``, with
    ``K = mean |x|`` per sample: the paper's K for a layer whose window is the whole input).

    Args:
        config: a :class:`BinaryConfig`.
    """

    def __init__(self, *args, config: BinaryConfig = BinaryConfig(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_input(config, self.in_features, nn.BatchNorm1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = binary_weight(self.weight)
        if self.binary.mode == "bwn":
            return F.linear(x, w, self.bias)
        x, xb = self._binary_input(x)  # K is computed from the same (normalised) input
        if self.binary.input_scale == "none":
            return F.linear(xb, w, self.bias)
        k = x.abs().mean(dim=-1, keepdim=True)  # "paper" and "mean" coincide for a linear layer
        out = F.linear(xb, w) * k
        return out if self.bias is None else out + self.bias


def _binary_copy(layer: nn.Module, config: BinaryConfig) -> nn.Module:
    """The binary twin of a Conv2d/Linear, holding the same (real) weights."""
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Conv2d):
        new: nn.Module = BinaryConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                      padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                                      bias=layer.bias is not None, padding_mode=layer.padding_mode, config=config,
                                      **factory)
    else:
        new = BinaryLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, config=config, **factory)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    new.train(layer.training)
    return new


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers (binary ones included) in registration order."""
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, BinaryConv2d, BinaryLinear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def binarize(model: nn.Module, *, mode: str = "bwn", keep_first_last: bool = True, keep: tuple[str, ...] = (),
             input_scale: str = "paper", input_norm: bool = True) -> nn.Module:
    """A copy of ``model`` whose Conv2d and Linear layers are :class:`BinaryConv2d` / :class:`BinaryLinear`.

    Args:
        mode: ``"bwn"`` or ``"xnor"`` (see :class:`BinaryConfig`, with ``input_scale`` and ``input_norm``).
        keep_first_last: keep the first and the last Conv2d/Linear layer (in registration order: the stem
            conv and the classifier of a cnnlab classifier) real-valued, as Rastegari et al. do.
        keep: names of further layers to keep real (``named_modules`` names).

    Only exact ``nn.Conv2d``/``nn.Linear`` are replaced (subclasses with their own forward are left alone).
    The model is not changed; the copy is returned in the model's training mode.
    """
    config = BinaryConfig(mode=mode, input_scale=input_scale, input_norm=input_norm)  # type: ignore[arg-type]
    layers = _weight_layers(model)
    names = [n for n, _ in layers]
    unknown = [n for n in keep if n not in names]
    if unknown:
        raise CnnlabError(f"binarize(keep=...): {unknown[0]!r} is not a Conv2d/Linear layer of the model"
                          f"{did_you_mean(unknown[0], names)}")
    kept = set(keep)
    if keep_first_last and layers:
        kept |= {names[0], names[-1]}
    targets = [n for n, m in layers if n not in kept and type(m) in (nn.Conv2d, nn.Linear)]
    if not targets:
        raise CnnlabError(f"binarize: the model has no Conv2d/Linear layer left to binarise ({len(layers)} found, "
                          f"{len(kept)} kept real); pass keep_first_last=False for a model this small")
    binary = copy.deepcopy(model)
    for name in targets:
        _set_module(binary, name, _binary_copy(binary.get_submodule(name), config))
    return binary


@dataclass
class BinaryStorage:
    """Weight storage of a binarised model, in bits.

    Args:
        layers: per binary layer ``{name: (weights, channels)}``.
        binary_bits: the binary layers' weights stored as 1 bit each plus one 32-bit alpha per output channel.
        fp32_bits: the same weights at 32 bits.
        other_bits: every other parameter (real layers, biases, BatchNorm) at 32 bits.
    """

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    binary_bits: int = 0
    fp32_bits: int = 0
    other_bits: int = 0

    @property
    def ratio(self) -> float:
        """fp32 / binary storage of the binarised layers' weights (about 32x)."""
        return self.fp32_bits / self.binary_bits if self.binary_bits else 1.0

    @property
    def total_ratio(self) -> float:
        """fp32 / binary storage of the whole model's parameters (the real layers weigh in)."""
        return (self.fp32_bits + self.other_bits) / (self.binary_bits + self.other_bits)

    @property
    def binary_bytes(self) -> int:
        return sum((n + 7) // 8 + 4 * c for n, c in self.layers.values())  # signs packed per layer

    def __str__(self) -> str:
        mb = 8 * 2 ** 20
        return (f"{len(self.layers)} binary layers, {sum(n for n, _ in self.layers.values()):,} binary weights: "
                f"{self.fp32_bits / mb:.3f} MiB fp32 -> {self.binary_bits / mb:.3f} MiB ({self.ratio:.1f}x); whole "
                f"model {(self.fp32_bits + self.other_bits) / mb:.3f} -> {(self.binary_bits + self.other_bits) / mb:.3f}"
                f" MiB ({self.total_ratio:.1f}x)")


def binary_storage_bytes(model: nn.Module) -> BinaryStorage:
    """Storage of ``model``'s weights binarised (1 bit + 32-bit alpha per channel) vs 32 bits per weight."""
    report = BinaryStorage()
    binary_weights: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, (BinaryConv2d, BinaryLinear)):
            n, c = module.weight.numel(), module.weight.shape[0]
            report.layers[name] = (n, c)
            report.binary_bits += n + 32 * c
            report.fp32_bits += 32 * n
            binary_weights.add(id(module.weight))
    report.other_bits = 32 * sum(p.numel() for p in model.parameters() if id(p) not in binary_weights)
    return report
