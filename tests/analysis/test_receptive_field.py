"""Analytic receptive fields vs the gradient support of one output unit, measured.

For each probed module the analytic window of an output unit (centre and corner, so both
the size and the padding offset are tested), clipped to the image, must equal the
bounding box of the input pixels whose gradient is non-zero.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import cnnlab
from cnnlab.analysis import empirical_receptive_field, receptive_fields


def _build(name: str, torchvision_builder) -> tuple[nn.Module, list[str]]:
    """cnnlab's model when registered (probing its stages), else torchvision's (probing given modules)."""
    torch.manual_seed(0)
    if name in cnnlab.list_models():
        model = cnnlab.create_model(name)
        return model, [f.module for f in model.feature_info]
    model = torchvision_builder()
    return model, [n for n, _ in model.named_children() if n.startswith("layer")] or ["features"]


def _check(model: nn.Module, size: tuple, modules: list[str]) -> int:
    rfs = receptive_fields(model, size)
    checked = 0
    for name in modules:
        rf = rfs[name]
        assert rf is not None, name
        with torch.no_grad():
            out_hw = _output_hw(model, name, size)
        for index in ((out_hw[0] // 2, out_hw[1] // 2), (0, 0)):
            predicted = rf.window(index, size[1:])
            measured = empirical_receptive_field(model, size, name, index, trials=2)
            expected = tuple((math.ceil(lo), math.floor(hi)) for lo, hi in predicted)
            assert measured == expected, (name, index, rf, measured)
            checked += 1
    return checked


def _output_hw(model: nn.Module, name: str, size: tuple) -> tuple[int, int]:
    captured = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
    model.eval()(torch.zeros(1, *size))
    handle.remove()
    return tuple(captured["o"].shape[-2:])


def test_vgg16() -> None:
    model, modules = _build("vgg16", torchvision.models.vgg16)
    # at 64 px the deepest stage sees past the image: its clipped window is checked too
    assert _check(model, (3, 64, 64), modules) >= 8
    rf = receptive_fields(model, (3, 224, 224))
    # conv5_3 of VGG-16: 13 3x3 convs and 4 2x2 pools before it -> 196 px (computed, not assumed)
    sizes = [r.size[0] for r in rf.values() if r is not None and not r.whole]
    assert max(sizes) == 212  # after pool5


@pytest.mark.parametrize("name,builder", [("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)])
def test_resnet(name: str, builder) -> None:
    model, modules = _build(name, builder)
    assert _check(model, (3, 64, 64), modules[:3]) >= 6


def test_dilated_convolutions() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=4, dilation=4),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=3, dilation=3),
    )
    _check(model, (3, 48, 48), ["2", "4", "5", "6"])
    rf = receptive_fields(model, (3, 48, 48))
    # dilation d adds (k - 1) * d * jump: 3 -> +4 -> +8 -> (stride 2) +2 -> +6*2
    assert [rf[n].size[0] for n in ("0", "2", "4", "5", "6")] == [3, 7, 15, 17, 29]


def test_branches_take_the_widest() -> None:
    class TwoBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.Conv2d(2, 2, 3, padding=1)
            self.large = nn.Sequential(nn.Conv2d(2, 2, 5, padding=2), nn.Conv2d(2, 2, 3, padding=1))
            self.out = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.cat([self.small(x), self.large(x)], 1))  # inception-style concat

    model = TwoBranch()
    rf = receptive_fields(model, (2, 24, 24))
    assert rf["small"].size == (3, 3) and rf["large"].size == (7, 7) and rf["out"].size == (7, 7)
    _check(model, (2, 24, 24), ["out"])


def test_transposed_conv_and_global_pool() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ConvTranspose2d(2, 2, 2, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    rf = receptive_fields(model, (1, 16, 16))
    assert rf["1"].jump == (1.0, 1.0)  # up-sampling by 2 brings the stride back to 1 pixel
    _check(model, (1, 16, 16), ["0", "1"])
    assert rf["2"].whole and rf["4"].whole


def test_squeeze_excite_scaling_sees_everything_keeps_stride() -> None:
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * torch.sigmoid(y.mean((2, 3), keepdim=True))  # global context scales every position

    model = SE()
    rf = receptive_fields(model, (2, 16, 16))[""]
    assert rf.whole and rf.jump == (2, 2)
    # gradient support: the centre unit depends on every input pixel
    assert empirical_receptive_field(model, (2, 16, 16)) == ((0, 15), (0, 15))
