"""Checks that several model and layer test files make the same way."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab.models import Classifier


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every Conv2d and Linear for input ``x`` (what the papers call FLOPs).

    A conv costs out elements x (in/groups) x kh x kw, a linear out elements x in_features.
    Works on the meta device, so a full-size count costs no memory.
    """
    total = 0

    def hook(m, _inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def assert_smallest_input(name: str, smallest: int) -> Classifier:
    """``min_input_size`` is ``smallest``, such an input runs, and one pixel less really breaks a layer."""
    model = cnnlab.create_model(name, num_classes=3).eval()
    assert model.min_input_size == smallest
    with torch.no_grad():
        assert model(torch.randn(1, 3, smallest, smallest)).shape == (1, 3)
        with pytest.raises(RuntimeError):
            model.forward_features(torch.randn(1, 3, smallest - 1, smallest - 1))
    return model
