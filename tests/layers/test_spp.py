"""Spatial pyramid pooling: fixed length for any input, equal to a hand loop of adaptive max pooling."""
import pytest
import torch
import torch.nn.functional as F

from cnnlab._errors import CnnlabError
from cnnlab.layers.spp import SpatialPyramidPooling, SPPRoIPool, spp_output_size, spp_roi_pool


def _hand_spp(x: torch.Tensor, levels) -> torch.Tensor:
    """The paper's definition written out: per level, per bin, the max over floor/ceil bin bounds."""
    batch, channels, height, width = x.shape
    out = []
    for level in levels:
        grid = torch.empty(batch, channels, level, level)
        for i in range(level):
            for j in range(level):
                y0, y1 = (i * height) // level, -((-(i + 1) * height) // level)
                x0, x1 = (j * width) // level, -((-(j + 1) * width) // level)
                grid[:, :, i, j] = x[:, :, y0:y1, x0:x1].amax(dim=(2, 3))
        out.append(grid.flatten(1))
    return torch.cat(out, 1)


@pytest.mark.parametrize("size", [(5, 5), (13, 13), (7, 19), (40, 9), (1, 3)])
@pytest.mark.parametrize("levels", [(1, 2, 4), (1, 2, 3, 6)])
def test_spp_fixed_length_and_hand_loop(size, levels):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    out = SpatialPyramidPooling(levels)(x)
    assert out.shape == (2, 3 * sum(level * level for level in levels)) == (2, spp_output_size(3, levels))
    expected = torch.cat([F.adaptive_max_pool2d(x, level).flatten(1) for level in levels], 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, _hand_spp(x, levels), rtol=0, atol=0)


def test_spp_avg_mode_and_bad_levels():
    x = torch.randn(1, 2, 6, 6)
    out = SpatialPyramidPooling((1, 3), mode="avg")(x)
    torch.testing.assert_close(out[:, :2], x.mean(dim=(2, 3)))
    for bad in [(), (0, 2), (1.5,)]:
        with pytest.raises(CnnlabError, match="levels"):
            SpatialPyramidPooling(bad)
    with pytest.raises(CnnlabError, match="max"):
        SpatialPyramidPooling((1,), mode="sum")


def test_spp_roi_pool_equals_adaptive_pool_of_the_window():
    """A region on whole cells pools exactly as adaptive_max_pool2d of its window (roi_pool's bins are the same)."""
    torch.manual_seed(0)
    features = torch.randn(2, 4, 16, 20)
    levels = (1, 2, 3, 6)
    # (batch, x1, y1, x2, y2) in input pixels at stride 4; the window is x1//4 .. x2//4 inclusive
    cells = [(0, 0, 0, 19, 15), (1, 2, 3, 9, 12), (0, 5, 1, 6, 2), (1, 10, 4, 17, 15), (0, 3, 3, 3, 3)]
    rois = torch.tensor([[b, 4 * x1, 4 * y1, 4 * x2, 4 * y2] for b, x1, y1, x2, y2 in cells], dtype=torch.float32)
    out = spp_roi_pool(features, rois, levels, spatial_scale=0.25)
    assert out.shape == (len(cells), 4 * 50)
    for k, (b, x1, y1, x2, y2) in enumerate(cells):
        window = features[b : b + 1, :, y1 : y2 + 1, x1 : x2 + 1]
        expected = torch.cat([F.adaptive_max_pool2d(window, level).flatten(1) for level in levels], 1)[0]
        # a level finer than the window leaves empty bins, which roi_pool fills with 0: compare the rest
        if min(window.shape[-2:]) >= max(levels):
            torch.testing.assert_close(out[k], expected, rtol=0, atol=0)
        else:
            torch.testing.assert_close(out[k, :4], expected[:4], rtol=0, atol=0)  # the 1x1 level: the window's max


def test_spp_roi_pool_list_of_boxes_and_module():
    torch.manual_seed(0)
    features = torch.randn(2, 3, 8, 8)
    boxes = [torch.tensor([[0.0, 0.0, 31.0, 31.0]]), torch.tensor([[4.0, 4.0, 20.0, 28.0], [0.0, 0.0, 8.0, 8.0]])]
    rows = torch.tensor([[0, 0, 0, 31, 31], [1, 4, 4, 20, 28], [1, 0, 0, 8, 8]], dtype=torch.float32)
    a = spp_roi_pool(features, boxes, (1, 2), spatial_scale=0.25)
    torch.testing.assert_close(a, spp_roi_pool(features, rows, (1, 2), spatial_scale=0.25))
    # the module infers stride 4 from a 32 x 32 batch and an 8 x 8 map, as MultiScaleRoIAlign does
    pool = SPPRoIPool((1, 2), featmap_name="0")
    torch.testing.assert_close(pool({"0": features}, boxes, [(32, 32), (30, 28)]), a)
    assert pool.output_size(3) == 15
    with pytest.raises(CnnlabError, match="no feature map named"):
        pool({"x": features}, boxes, [(32, 32)] * 2)
    with pytest.raises(CnnlabError, match="rois of shape"):
        spp_roi_pool(features, torch.zeros(3, 4), (1,))
