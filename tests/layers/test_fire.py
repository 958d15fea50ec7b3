"""Fire module: torchvision's Fire with the same weights, widths and parameter counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.squeezenet import Fire as TVFire

from cnnlab.layers.fire import Fire


def test_same_output_as_torchvision_fire():
    torch.manual_seed(0)
    theirs = TVFire(96, 16, 64, 64)
    ours = Fire(96, 16, 64, 64)
    sd = {k.replace(".weight", ".conv.weight").replace(".bias", ".conv.bias"): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(sd)
    x = torch.randn(2, 96, 13, 13)
    out = ours(x)
    assert out.shape == (2, 128, 13, 13) and ours.out_channels == 128
    torch.testing.assert_close(out, theirs(x), atol=1e-5, rtol=0)
    assert out.abs().sum() > 0


@pytest.mark.parametrize("cin,s,e1,e3", [(96, 16, 64, 64), (512, 64, 256, 256), (10, 3, 5, 7)])
def test_parameter_count(cin, s, e1, e3):
    # squeeze 1x1, expand 1x1 and 3x3 convs, each with a bias (Iandola et al. 2016 §3.1)
    expected = (cin * s + s) + (s * e1 + e1) + (s * 9 * e3 + e3)
    assert sum(p.numel() for p in Fire(cin, s, e1, e3).parameters()) == expected


def test_output_is_expand1x1_then_expand3x3_after_relu():
    fire = Fire(8, 4, 3, 5)
    x = torch.randn(1, 8, 6, 6)
    s = fire.squeeze(x)
    out = fire(x)
    torch.testing.assert_close(out[:, :3], fire.expand1x1(s))
    torch.testing.assert_close(out[:, 3:], fire.expand3x3(s))
    assert (out >= 0).all()


def test_norm_layer_option():
    fire = Fire(8, 4, 3, 5, norm_layer=nn.BatchNorm2d)
    assert isinstance(fire.squeeze.norm, nn.BatchNorm2d) and fire.squeeze.conv.bias is None
