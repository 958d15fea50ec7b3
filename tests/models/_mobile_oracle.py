"""Shared checks for the mobile families: stage-by-stage equality and paper multiply-adds."""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

import cnnlab
from tests.oracle import assert_same_output, randomize_norm_stats

# timm's EfficientNet class holds every MBConvNet table (MobileNet v2, MnasNet, EfficientNet) as
# seven ``blocks`` groups at strides 2, 4, 8, 16, 16, 32, 32, then ``bn2`` after conv_head: the
# deepest map of each stride, i.e. our ``feature_info``.
TIMM_MBCONV_TAPS = ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "bn2"]


def check_converted_stages(name: str, reference: nn.Module, taps: list[str], input_size: int = 64, **overrides) -> None:
    """As ``tests.oracle.check_converted`` (logits within 1e-4), then every ``feature_info`` map
    against the output of the reference's module ``taps[i]``.

    Randomly initialised mobile nets shrink their signal so much that logits alone barely
    notice a wrong mapping deep inside; the stage maps do.
    """
    randomize_norm_stats(reference).eval()
    ours = cnnlab.create_model(name, **overrides).eval()
    result = cnnlab.load_weights(ours, reference.state_dict())
    assert result.ok and result.layout != "cnnlab"
    torch.manual_seed(0)
    x = torch.randn(2, ours.in_channels, input_size, input_size)
    assert_same_output(ours, reference, x)
    seen: dict[str, torch.Tensor] = {}
    handles = [reference.get_submodule(t).register_forward_hook(lambda _m, _i, out, t=t: seen.__setitem__(t, out))
               for t in taps]
    with torch.no_grad():
        reference(x)
        maps = ours.forward_intermediates(x)
    for h in handles:
        h.remove()
    assert len(maps) == len(taps)
    for info, mine, tap in zip(ours.feature_info, maps, taps):
        assert mine.shape == seen[tap].shape, f"{info.module} vs {tap}: {tuple(mine.shape)} vs {tuple(seen[tap].shape)}"
        assert (mine - seen[tap]).abs().max().item() <= 1e-4, f"{info.module} differs from the reference's {tap}"


def mult_adds(model: nn.Module, size: int) -> float:
    """Multiply-adds of convolutions and fully connected layers (the papers' count), by fvcore."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore uses torch.jit, deprecated in torch 2.x
        from fvcore.nn import FlopCountAnalysis

        counter = FlopCountAnalysis(model.eval(), torch.randn(1, 3, size, size))
        counter.unsupported_ops_warnings(False)
        counter.uncalled_modules_warnings(False)
        by_op = counter.by_operator()
    return float(by_op.get("conv", 0) + by_op.get("linear", 0))
