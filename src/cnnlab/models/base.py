"""The interface every cnnlab classifier shares."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnnlab._errors import CnnlabError


@dataclass(frozen=True)
class FeatureInfo:
    """One stage's feature map: where it comes from, its channels, and its stride w.r.t. the input.

    ``module`` is the dotted path (as in ``model.get_submodule``) of the module whose
    output is that feature map, so detection and segmentation can tap any backbone.
    """

    module: str
    channels: int
    stride: int


class Classifier(nn.Module):
    """Base class of every classifier: ``forward = forward_head(forward_features(x))``.

    Subclasses set ``self.num_classes``, ``self.in_channels``, ``self.feature_info``
    (one FeatureInfo per stage, in order), ``self.num_features`` (the pre-logit width) and implement ``forward_features`` and
    ``forward_head``. ``head_name`` names the final classifier layer (a Linear or a 1x1
    Conv2d) so ``reset_classifier`` works without per-family code; ``min_input_size``
    is the smallest input height/width the network accepts.
    """

    head_name: str = "fc"
    min_input_size: int = 32

    def __init__(self) -> None:
        super().__init__()
        self.model_name = type(self).__name__.lower()  # create_model sets the registry name
        self.num_classes = 0
        self.in_channels = 3
        self.feature_info: list[FeatureInfo] = []
        self.num_features = 0  # width of forward_head(x, pre_logits=True): what the classifier sees

    # -- the interface -------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input to the last stage's feature map, before any pooling: (B, C, H, W)."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (B, num_classes); with ``pre_logits`` the vector the classifier sees."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.head_name)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final layer by a freshly initialised one with ``num_classes`` outputs.

        ``num_classes=0`` removes it: ``forward`` then returns the pre-logit features.
        """
        old = self.get_classifier()
        if num_classes <= 0:
            new: nn.Module = nn.Identity()
        elif isinstance(old, nn.Linear):
            new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        elif isinstance(old, nn.Conv2d):
            new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, bias=old.bias is not None)
        elif isinstance(old, nn.Identity) and self.num_features:
            new = nn.Linear(self.num_features, num_classes)
        else:
            raise CnnlabError(f"{self.model_name}: cannot reset a classifier of type {type(old).__name__}")
        first = next(old.parameters(), None)
        if first is not None:
            new = new.to(device=first.device, dtype=first.dtype)
        parent_name, _, child = self.head_name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        setattr(parent, child, new)
        self.num_classes = max(num_classes, 0)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map of every stage listed in ``feature_info``, in order."""
        self.check_input(x)
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        for info in self.feature_info:
            def hook(_m, _i, out, key=info.module):
                outputs[key] = out
            handles.append(self.get_submodule(info.module).register_forward_hook(hook))
        try:
            self.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        return [outputs[info.module] for info in self.feature_info]

    # -- input checking --------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an input this network cannot take."""
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
            return
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[2:]) < self.min_input_size:
            raise CnnlabError(
                f"{self.model_name} expects input of shape (B, {self.in_channels}, H, W) with H, W >= "
                f"{self.min_input_size}; got {tuple(x.shape)}"
            )
