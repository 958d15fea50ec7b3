"""The study notes' arithmetic (SPEC.md §2 facts, §7), recomputed with ``summary``.

Claims from the notes are written beside each check with their source; every number on the
left-hand side is computed by the tool from a real module, none is typed in.
"""
from __future__ import annotations

import math

import pytest
from torch import nn

import cnnlab
from cnnlab.analysis import receptive_fields, summary

VGG16_STAGES = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]  # Simonyan & Zisserman 2015, Table 1, column D


def _vgg16_name() -> str:
    assert "vgg16" in cnnlab.list_models(), "vgg16 must be registered"
    return "vgg16"


def test_vgg16_table_and_totals() -> None:
    s = summary(_vgg16_name())
    # notes (seeds/004, cs231n table): "TOTAL params: 138M parameters"
    assert s.totals.params == pytest.approx(138e6, rel=0.01)
    rows = [r for r in s.rows if r.type in ("Conv2d", "MaxPool2d", "Linear")]
    # the cs231n rows, derived independently from the configuration: H*W*C per conv and pool, then the FCs
    expected, side = [], 224
    for channels, convs in VGG16_STAGES:
        expected += [side * side * channels] * convs
        side //= 2
        expected.append(side * side * channels)
    expected += [4096, 4096, 1000]
    assert [r.act_elements for r in rows] == expected
    table_total = s.totals.input_elements + sum(r.act_elements for r in rows)
    # the rows sum to ~15.2M activations = ~61 MB at 4 bytes, not the notes' "24M ~ 96MB"
    assert table_total == pytest.approx(15.2e6, rel=0.01)
    assert table_total * 4 / 1e6 == pytest.approx(61, rel=0.01)
    assert table_total < 0.7 * 24e6
    # "Most memory is in early CONV": the first block (two 224x224x64 convs) holds > 40% of it
    assert (rows[0].act_elements + rows[1].act_elements) / table_total > 0.4
    # "Most params are in late FC": the three FC layers hold > 85% of the parameters
    fc = [r for r in s.rows if r.type == "Linear"]
    assert sum(r.params for r in fc) / s.totals.params > 0.85
    assert fc[0].params == 7 * 7 * 512 * 4096 + 4096  # the notes' 102,760,448 weights + biases


def test_alexnet_output_size_formula() -> None:
    # (N + 2P - F) / S + 1 = (227 - 11) / 4 + 1 = 55; notes: 227x227 input -> C1 96@55x55 (11x11/4)
    s = summary("alexnet")
    assert s.input_size == (3, 227, 227)
    first = next(r for r in s.rows if r.type == "Conv2d")
    assert first.output_shape[1:] == (96, (227 + 0 - 11) // 4 + 1, (227 - 11) // 4 + 1) == (96, 55, 55)
    assert first.rf == (11, 11) and first.jump == (4, 4)


def _params(*layers: nn.Module) -> int:
    return summary(nn.Sequential(*layers), (layers[0].in_channels, 8, 8), training_memory=False).totals.params


def test_bottleneck_17c2_vs_18c2() -> None:
    c = 64  # notes: 256-d in, 64-d inside (He et al. 2016, Fig. 5)
    bottleneck = _params(nn.Conv2d(4 * c, c, 1, bias=False), nn.Conv2d(c, c, 3, bias=False), nn.Conv2d(c, 4 * c, 1, bias=False))
    two_3x3 = _params(nn.Conv2d(c, c, 3, bias=False), nn.Conv2d(c, c, 3, bias=False))
    assert bottleneck / c**2 == 17 and two_3x3 / c**2 == 18


@pytest.mark.parametrize("stacked,equivalent", [(3, 7), (2, 5)])
def test_stacked_3x3_vs_one_large(stacked: int, equivalent: int) -> None:
    c = 32
    convs = [nn.Conv2d(c, c, 3, bias=False) for _ in range(stacked)]
    big = nn.Conv2d(c, c, equivalent, bias=False)
    # notes: three 3x3 see 7x7 with 27C^2 weights vs 49C^2; two 3x3 see 5x5 with 18C^2 vs 25C^2
    assert _params(*convs) / c**2 == 9 * stacked and _params(big) / c**2 == equivalent**2
    rf_stack = receptive_fields(nn.Sequential(*convs), (c, 16, 16))[str(stacked - 1)].size
    rf_big = receptive_fields(nn.Sequential(big), (c, 16, 16))["0"].size
    assert rf_stack == rf_big == (equivalent, equivalent)


@pytest.mark.parametrize("m,n", [(32, 64), (256, 256), (512, 1024)])
def test_depthwise_separable_cost(m: int, n: int) -> None:
    dk, side = 3, 14
    standard = summary(nn.Conv2d(m, n, dk, padding=1, bias=False), (m, side, side), training_memory=False).totals.macs
    separable = summary(nn.Sequential(nn.Conv2d(m, m, dk, padding=1, groups=m, bias=False), nn.Conv2d(m, n, 1, bias=False)),
                        (m, side, side), training_memory=False).totals.macs
    # notes (Howard et al. 2017, eq. 5): separable / standard = 1/N + 1/Dk^2
    assert separable / standard == pytest.approx(1 / n + 1 / dk**2, rel=1e-12)
    if n >= 256:
        assert 8 < standard / separable < 9  # "~8-9x fewer multiply-adds for 3x3"


def test_efficientnet_compound_scaling() -> None:
    alpha, beta, gamma = 1.2, 1.1, 1.15  # Tan & Le 2019, Sec. 3.3
    assert alpha * beta**2 * gamma**2 == pytest.approx(2, abs=0.1)
    names = [f"efficientnet_b{i}" for i in range(8)]
    if not all(n in cnnlab.list_models() for n in names):
        pytest.skip("EfficientNet B0-B7 not registered")
    macs = [summary(n, training_memory=False).totals.macs for n in names]
    steps = [b / a for a, b in zip(macs, macs[1:])]
    assert all(s > 1.2 for s in steps)
    # FLOPs roughly double per step of phi: the geometric mean step over B0..B7 is ~2
    assert math.prod(steps) ** (1 / len(steps)) == pytest.approx(2, abs=0.25)
