"""Weight initialisation: each family's reference scheme, He/Kaiming (MSRA), Xavier/Glorot, and zero-init.

A family's ``init="reference"`` (the default) reproduces the initialisation of the library whose
weights it loads (torchvision's or timm's code, cited beside each function here) or, for a family
neither library has, its paper's. ``"kaiming"`` and ``"xavier"`` are the same scheme for every
family, for experiments that compare schemes; ``"none"`` keeps PyTorch's layer defaults.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from cnnlab._errors import CnnlabError

INIT_SCHEMES = ("reference", "kaiming", "xavier", "none")
InitFn = Callable[[nn.Module], None]
_NORMS = (nn.BatchNorm2d, nn.GroupNorm)


def init_weights(model: nn.Module, scheme: str = "kaiming", reference: InitFn | None = None) -> nn.Module:
    """Initialise convs, linears and norms in place.

    ``reference``: call ``reference(model)``, the family's own scheme (one of the functions below).
    ``kaiming``: He et al. 2015, normal, fan_out, for ReLU networks; linears N(0, 0.01)
    (torchvision's VGG and MobileNet v2). ``xavier``: Glorot & Bengio 2010, uniform, for
    tanh/sigmoid networks. Both set norm layers to weight 1, bias 0 and biases to 0.
    ``none`` leaves PyTorch's defaults.
    """
    if scheme not in INIT_SCHEMES:
        raise CnnlabError(f"unknown init scheme {scheme!r}; choose from {', '.join(INIT_SCHEMES)}")
    if scheme == "none" or _on_meta(model):
        return model
    if scheme == "reference":
        if reference is None:
            raise CnnlabError(f"{type(model).__name__} has no reference initialisation; use init='kaiming' or 'xavier'")
        reference(model)
        return model
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if scheme == "kaiming":
                nn.init.normal_(m.weight, 0, 0.01)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _on_meta(model: nn.Module) -> bool:
    """A model built on the meta device holds no values to initialise (and a meta ``normal_`` runs
    PyTorch's Python reference, ~10 ms a call: 10 s for ResNet-1001's shapes)."""
    first = next(model.parameters(), None)
    return first is not None and first.is_meta


def _ones_zeros(m: nn.Module) -> None:
    if getattr(m, "weight", None) is not None:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# -- the reference schemes -------------------------------------------------------------------------

def kaiming_init(model: nn.Module) -> None:
    """``init_weights(model, "kaiming")``: torchvision's VGG and MobileNet v2 (convs He normal fan_out,
    linears N(0, 0.01), biases 0); also the scheme of the papers that cite He et al. 2015 for it."""
    init_weights(model, "kaiming")


def torchvision_resnet_init(model: nn.Module) -> None:
    """torchvision's ResNet (and timm's ResNet and legacy Xception): conv weights He normal fan_out,
    norms 1/0; conv biases (SE layers) and the linear classifier keep PyTorch's defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, _NORMS):
            _ones_zeros(m)


def torchvision_densenet_init(model: nn.Module) -> None:
    """torchvision's DenseNet ("official init from torch repo"): convs He normal *fan_in*, BN 1/0,
    linear bias 0 (its weight keeps PyTorch's default). Fan_out would blow up the 1x1 bottlenecks,
    whose fan_in (all earlier layers' maps) is far above their fan_out."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            _ones_zeros(m)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def torchvision_googlenet_init(model: nn.Module) -> None:
    """torchvision's GoogLeNet: conv and linear weights truncated normal (std 0.01, cut at +-2,
    i.e. 200 std: practically untruncated), BN 1/0; biases keep PyTorch's defaults."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
        elif isinstance(m, _NORMS):
            _ones_zeros(m)


def torchvision_squeezenet_init(model: nn.Module, final_conv: nn.Module | None = None) -> None:
    """torchvision's SqueezeNet: convs He *uniform* fan_in, the final 1x1 classifier conv N(0, 0.01), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if m is final_conv:
                nn.init.normal_(m.weight, 0.0, 0.01)
            else:
                nn.init.kaiming_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def torchvision_mnasnet_init(model: nn.Module) -> None:
    """torchvision's MNASNet: convs He normal fan_out, BN 1/0, linear He uniform fan_out (gain 1), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            _ones_zeros(m)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="sigmoid")
            nn.init.zeros_(m.bias)


def tf_mobile_init(model: nn.Module) -> None:
    """The TensorFlow TPU code of MnasNet/EfficientNet (timm's ``_init_weight_goog``, also its MobileNet v1):
    convs N(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups (a depthwise 3x3 conv: 9), BN 1/0,
    linears U(+-1/sqrt(out_features)), biases 0. torchvision's EfficientNet counts a depthwise conv's
    fan_out over all its channels, so its depthwise weights start sqrt(channels) times smaller."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            _ones_zeros(m)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def pytorch_default_init(model: nn.Module) -> None:
    """PyTorch's layer defaults, which torchvision's AlexNet and ShuffleNet v2 keep (they set no init)."""


def zero_init_last_norm(model: nn.Module) -> int:
    """Zero the last norm's weight of every residual branch so each block starts as the identity.

    Blocks opt in by defining ``zero_init_last()`` (Goyal et al., 2017). Returns how many blocks did.
    """
    count, meta = 0, _on_meta(model)
    for m in model.modules():
        if m is not model and hasattr(m, "zero_init_last"):
            if not meta:
                m.zero_init_last()
            count += 1
    return count
