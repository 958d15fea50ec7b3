"""Inception module: torchvision's Inception with the same weights, widths, attention hook."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.googlenet import Inception as TVInception

from cnnlab.layers import SqueezeExcite
from cnnlab.layers.inception import InceptionModule
from tests.oracle import randomize_norm_stats

ARGS_3A = (192, 64, 96, 128, 16, 32, 32)  # Szegedy et al. 2014 Table 1, inception (3a)


def _tv_like(**kwargs) -> InceptionModule:
    from functools import partial

    return InceptionModule(*ARGS_3A, large_kernel_size=3, norm_layer=partial(nn.BatchNorm2d, eps=1e-3), **kwargs)


def test_same_output_as_torchvision_inception():
    torch.manual_seed(0)
    theirs = randomize_norm_stats(TVInception(*ARGS_3A)).eval()
    ours = _tv_like().eval()
    ours.load_state_dict({k.replace(".bn.", ".norm."): v for k, v in theirs.state_dict().items()})
    x = torch.randn(2, 192, 7, 7)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, theirs(x), atol=1e-5, rtol=0)
    assert out.shape == (2, 256, 7, 7) and ours.out_channels == 256  # 64 + 128 + 32 + 32


def test_paper_module_parameter_count():
    # Table 1, inception (3a), weights only: 192*64 + 192*96 + 96*9*128 + 192*16 + 16*25*32 + 192*32
    # = 163,328 = "159K" in the table (K = 1024). Biases add 64+96+128+16+32+32.
    m = InceptionModule(*ARGS_3A, large_kernel_size=5, norm_layer=None)
    assert sum(p.numel() for p in m.parameters()) == 163_328 + 368
    assert 163_328 // 1024 == 159


def test_branches_concatenate_in_order():
    m = InceptionModule(16, 2, 3, 4, 5, 6, 7, norm_layer=None).eval()
    x = torch.randn(1, 16, 5, 5)
    out = m(x)
    assert out.shape == (1, 2 + 4 + 6 + 7, 5, 5)
    torch.testing.assert_close(out[:, :2], m.branch1(x))
    torch.testing.assert_close(out[:, 2:6], m.branch2(x))
    torch.testing.assert_close(out[:, 6:12], m.branch3(x))
    torch.testing.assert_close(out[:, 12:], m.branch4(x))


def test_attn_layer_gates_the_concatenated_output():
    torch.manual_seed(0)
    seen = []

    def se(channels: int) -> nn.Module:
        seen.append(channels)
        return SqueezeExcite(channels)

    m = InceptionModule(16, 2, 3, 4, 5, 6, 7, norm_layer=None, attn_layer=se).eval()
    assert seen == [19]  # called once, with the concatenated width (SE-Inception, Hu et al. Fig. 2)
    x = torch.randn(1, 16, 5, 5)
    plain = torch.cat([m.branch1(x), m.branch2(x), m.branch3(x), m.branch4(x)], 1)
    torch.testing.assert_close(m(x), m.attn(plain))
    assert not torch.allclose(m(x), plain)
