"""Helpers for oracle tests: compare a cnnlab model with a reference model holding the same weights."""
from __future__ import annotations

import torch
from torch import nn

import cnnlab


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine params, so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def assert_same_output(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, atol: float = 1e-4) -> float:
    """Both models in eval mode on the same input: max abs difference of the logits must be <= atol."""
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        a = ours(x)
        b = theirs(x)
        if isinstance(b, tuple):  # e.g. torchvision GoogLeNet's namedtuple in train mode
            b = b[0]
    assert a.shape == b.shape, f"shapes differ: ours {tuple(a.shape)} vs reference {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"
    return diff


def check_converted(name: str, reference: nn.Module, input_size: int = 64, atol: float = 1e-4, **overrides) -> float:
    """Load ``reference``'s state_dict into ``cnnlab.create_model(name)`` and compare outputs.

    The state_dict goes through ``cnnlab.load_weights``, which must recognise the layout itself.
    """
    randomize_norm_stats(reference)
    ours = cnnlab.create_model(name, **overrides)
    result = cnnlab.load_weights(ours, reference.state_dict())
    assert result.ok and result.layout != "cnnlab" or set(reference.state_dict()) == set(ours.state_dict())
    torch.manual_seed(0)
    x = torch.randn(2, ours.in_channels, input_size, input_size)
    return assert_same_output(ours, reference, x, atol)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_count(builder, *args, **kwargs) -> int:
    """Parameter count of a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return count_params(builder(*args, **kwargs))
