"""Weight initialisation schemes: He/Kaiming (MSRA), Xavier/Glorot, and zero-init of residual branches."""
from __future__ import annotations

from torch import nn

from cnnlab._errors import CnnlabError

INIT_SCHEMES = ("kaiming", "xavier", "none")


def init_weights(model: nn.Module, scheme: str = "kaiming") -> nn.Module:
    """Initialise convs and linears in place.

    ``kaiming``: He et al. 2015, normal, fan_out, for ReLU networks (torchvision's ResNet choice).
    ``xavier``: Glorot & Bengio 2010, uniform, for tanh/sigmoid networks.
    Norm layers get weight 1, bias 0; linear biases 0. ``none`` leaves PyTorch's defaults.
    """
    if scheme not in INIT_SCHEMES:
        raise CnnlabError(f"unknown init scheme {scheme!r}; choose from {', '.join(INIT_SCHEMES)}")
    if scheme == "none":
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
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def zero_init_last_norm(model: nn.Module) -> int:
    """Zero the last norm's weight of every residual branch so each block starts as the identity.

    Blocks opt in by defining ``zero_init_last()`` (Goyal et al., 2017). Returns how many blocks did.
    """
    count = 0
    for m in model.modules():
        if m is not model and hasattr(m, "zero_init_last"):
            m.zero_init_last()
            count += 1
    return count
