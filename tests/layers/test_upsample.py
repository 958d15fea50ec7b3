"""Up-sampling: the transposed-conv size formula against PyTorch, UpsampleConv's sizes, the checkerboard measured."""
import itertools

import pytest
import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.analysis.upsampling import checkerboard_strength, compare_upsampling
from cnnlab.cli.main import main
from cnnlab.layers import conv_transpose_output_size
from cnnlab.layers.upsample import UpsampleConv


def test_the_output_size_formula_equals_pytorch_for_many_settings():
    # (d_in - 1) * stride - 2 * pad + dilation * (k - 1) + output_padding + 1
    checked = 0
    for d, k, s, p, dil, op in itertools.product((1, 2, 5, 8), (1, 2, 3, 4, 5), (1, 2, 3), (0, 1, 2), (1, 2), (0, 1, 2)):
        if op >= max(s, dil):  # PyTorch: output_padding must be smaller than stride or dilation
            continue
        conv = nn.ConvTranspose2d(1, 1, k, stride=s, padding=p, dilation=dil, output_padding=op)
        expected = conv_transpose_output_size(d, k, s, p, dil, op)
        if expected < 1:
            continue
        assert conv(torch.zeros(1, 1, d, d)).shape[-1] == expected, (d, k, s, p, dil, op)
        checked += 1
    assert checked > 500


@pytest.mark.parametrize("mode", ["transposed", "bilinear", "nearest"])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_upsample_conv_multiplies_the_size_exactly(mode, factor):
    block = UpsampleConv(3, 5, factor, mode)
    assert block(torch.randn(2, 3, 7, 10)).shape == (2, 5, 7 * factor, 10 * factor)


def test_parameters_and_macs_by_hand():
    rows = {r.mode: r for r in compare_upsampling(64, 32, factor=2, size=16)}
    assert rows["transposed"].params == 64 * 32 * 4 * 4 + 32        # kernel 2f = 4
    assert rows["bilinear"].params == rows["nearest"].params == 64 * 32 * 3 * 3 + 32
    assert rows["transposed"].macs == 64 * 32 * 4 * 4 * 16 * 16      # every input pixel spreads one 4x4 kernel
    assert rows["bilinear"].macs == 64 * 32 * 3 * 3 * 32 * 32        # a 3x3 conv at the output size


def test_a_random_transposed_conv_makes_a_checkerboard_and_resize_then_conv_does_not():
    assert checkerboard_strength("transposed") > 0.3
    assert checkerboard_strength("bilinear") < 1e-5 and checkerboard_strength("nearest") < 1e-5
    # kernel 3, stride 2 overlaps unevenly even with equal weights: a checkerboard with no randomness at all
    conv = nn.ConvTranspose2d(1, 1, 3, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    y = conv(torch.ones(1, 1, 6, 6))[0, 0, 2:-2, 2:-2]
    assert set(y.unique().tolist()) == {1.0, 2.0, 4.0}


def test_bad_arguments_and_the_cli(tmp_path, capsys):
    with pytest.raises(CnnlabError, match="mode must be one of"):
        UpsampleConv(1, 1, 2, "bicubic")
    with pytest.raises(CnnlabError, match="factor must be an integer >= 2"):
        UpsampleConv(1, 1, 1)
    assert main(["upsampling", "--channels", "8", "--plot", str(tmp_path / "up.png")]) == 0
    out = capsys.readouterr().out
    assert "transposed" in out and "checkerboard" in out and (tmp_path / "up.png").stat().st_size > 5000
