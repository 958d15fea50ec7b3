"""U-Net: the paper's valid-conv network (572 -> 388 tiles), the padded one, and smp's Unet on a ResNet encoder."""
import numpy as np
import pytest
import torch
from torch import nn

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.segmentation.unet import (
    UNet,
    UNetStage,
    _mirror_pad,
    unet,
    unet_input_size,
    unet_output_size,
    valid_input_sizes,
)
from tests.oracle import assert_same_output, meta_count, randomize_norm_stats

smp = pytest.importorskip("segmentation_models_pytorch")

TINY = tuple(UNetStage(c) for c in (4, 8, 16, 32, 64))  # the paper's 5 levels, 1/16 of the widths


def _paper_trace(n: int) -> int:
    """Ronneberger et al. 2015, Fig. 1, step by step: two unpadded 3x3 convs (-4), 2x2 pool (/2), ..."""
    for _ in range(4):
        n = (n - 4) // 2
    n -= 4
    for _ in range(4):
        n = 2 * n - 4
    return n


def test_tile_arithmetic_is_the_papers():
    # Fig. 1: 572x572 input tile -> 388x388 output segmentation map
    assert unet_output_size(572) == 388 == _paper_trace(572)
    assert unet_input_size(388) == 572
    sizes = valid_input_sizes(150, 700)
    assert sizes[0] == 188 and all(b - a == 16 for a, b in zip(sizes, sizes[1:])) and 572 in sizes
    assert all(unet_output_size(n) == _paper_trace(n) == n - 184 for n in sizes)
    assert all(unet_output_size(unet_input_size(m)) >= m > unet_output_size(unet_input_size(m) - 16)
               for m in (5, 64, 100, 388))
    assert unet_input_size(1) == 188  # the smallest tile: 4 output pixels


def test_paper_network_maps_572_to_388_and_has_31m_parameters():
    with torch.device("meta"):
        model = unet()
        assert model.forward_tile(torch.empty(1, 1, 572, 572)).shape == (1, 2, 388, 388)
    # counted by hand from Fig. 1: (9 c_in + 1) c_out per 3x3 conv, (4 c_in + 1) c_out per 2x2 up-conv, 1x1 head
    widths, total, c_in = (64, 128, 256, 512, 1024), 0, 1
    for c in widths:
        total += (9 * c_in + 1) * c + (9 * c + 1) * c
        c_in = c
    for c_deep, c in zip(widths[:0:-1], widths[-2::-1]):
        total += (4 * c_deep + 1) * c + (9 * 2 * c + 1) * c + (9 * c + 1) * c
    total += (64 + 1) * 2
    assert meta_count(unet) == total
    assert abs(total - 31.03e6) / 31.03e6 < 1e-3  # the figure quoted for the 2-class network (31.0M)


def test_real_tiles_match_the_arithmetic():
    model = UNet(stages=TINY, in_channels=1, num_classes=2)
    for n in (188, 204):
        assert model.forward_tile(torch.randn(1, 1, n, n + 16)).shape == (1, 2, n - 184, n - 168)


def test_a_tile_the_network_cannot_take_is_a_clear_error():
    with pytest.raises(CnnlabError, match=r"cannot take a tile of 570 pixels.*556 or 572"):
        unet_output_size(570)
    with pytest.raises(CnnlabError, match=r"tile of 100 pixels.*188"):
        unet_output_size(100)
    model = UNet(stages=TINY)
    with pytest.raises(CnnlabError, match="cannot take a tile of 190"):
        model.forward_tile(torch.randn(1, 1, 190, 188))
    with pytest.raises(CnnlabError, match=r"expects input of shape \(B, 1, H, W\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(CnnlabError, match="padding must be 'valid'"):
        UNet(padding="reflect")


def test_mirror_padding_equals_numpy_reflect_even_past_the_image_size():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    ours = _mirror_pad(x, 9, 20, 3, 11)  # more than the size: reflected again, as numpy does
    theirs = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 11), (9, 20)), mode="reflect")
    np.testing.assert_array_equal(ours.numpy(), theirs)


def test_valid_forward_returns_logits_at_the_input_size_by_overlap_tiling():
    torch.manual_seed(0)
    model = UNet(stages=TINY, in_channels=3, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        out = model(x)
        # the overlap-tile strategy by hand: mirror 92 px of context (plus what fills the smallest tile), crop
        tile = np.pad(x.numpy(), ((0, 0), (0, 0), (92, 252 - 64 - 92), (92, 268 - 80 - 92)), mode="reflect")
        expected = model.forward_tile(torch.from_numpy(tile))[..., :64, :80]
    assert out.shape == (2, 3, 64, 80)
    torch.testing.assert_close(out, expected)


def test_same_padding_takes_any_size_and_trains():
    model = cnnlab.create_model("unet", channels=(4, 8, 16, 32, 64), in_channels=3, num_classes=4, padding="same",
                                norm_layer="batchnorm")
    assert [level.conv1.conv.out_channels for level in model.encoder] == [4, 8, 16, 32, 64]
    x = torch.randn(2, 3, 67, 81)
    out = model(x)
    assert out.shape == (2, 4, 67, 81) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.randint(0, 4, (2, 67, 81))).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("padding,size", [("same", (33, 40)), ("valid", (20, 24))])
def test_bilinear_up_replaces_each_up_conv_with_the_same_shapes_and_macs(padding, size):
    kw = dict(channels=(4, 8, 16), in_channels=1, num_classes=3, padding=padding)
    torch.manual_seed(0)
    paper, bilinear = cnnlab.create_model("unet", **kw), cnnlab.create_model("unet", up="bilinear", **kw)
    ups = [level.up for level in bilinear.decoder]
    assert all(isinstance(level.up, nn.ConvTranspose2d) for level in paper.decoder)
    assert [(u[0].mode, u[0].scale_factor, u[1].kernel_size) for u in ups] == [("bilinear", 2.0, (1, 1))] * 2
    # a 2x2 kernel has 4 taps per (in, out) pair, a 1x1 conv one: 3/4 of the up-convs' weights go
    up_weights = sum(level.up.weight.numel() for level in paper.decoder)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(paper) - n(bilinear) == up_weights * 3 // 4
    x = torch.randn(2, 1, *size)
    out = bilinear(x)
    assert out.shape == paper(x).shape == (2, 3, *size)
    # one tap per input channel per output pixel either way: the MACs are equal
    assert cnnlab.summary(paper, (1, *size)).totals.macs == cnnlab.summary(bilinear, (1, *size)).totals.macs
    # no checkerboard: on a flat input the bilinear path's first up-sampled map is flat away from the border
    flat = ups[0](torch.ones(1, 16, 6, 6))[..., 2:-2, 2:-2]
    torch.testing.assert_close(flat, flat[..., :1, :1].expand_as(flat))
    with pytest.raises(CnnlabError, match="up must be 'transposed'.*or 'bilinear'.*got 'nearest'"):
        unet(up="nearest")
    with pytest.raises(CnnlabError, match="stages/channels/up are options of the paper's network"):
        unet(backbone="resnet18", up="bilinear")


@pytest.mark.parametrize("backbone,size", [("resnet34", (64, 96)), ("resnet18", (70, 90))])
def test_resnet_unet_takes_smp_weights_and_gives_the_same_logits(backbone, size):
    torch.manual_seed(0)
    theirs = randomize_norm_stats(smp.Unet(backbone, encoder_weights=None, classes=3))
    ours = cnnlab.create_model("unet", backbone=backbone, num_classes=3)  # smp's defaults: no option needed
    result = cnnlab.load_weights(ours, theirs.state_dict())
    assert result.layout == "smp" and result.ok
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert_same_output(ours, theirs, torch.randn(2, 3, *size), atol=1e-4)


def test_shallower_smp_unet_drops_the_unused_stage():
    theirs = randomize_norm_stats(smp.Unet("resnet18", encoder_weights=None, classes=2, encoder_depth=4,
                                           decoder_channels=(128, 64, 32, 16)))
    ours = unet(backbone="resnet18", num_classes=2, encoder_depth=4, decoder_channels=(128, 64, 32, 16))
    assert cnnlab.load_weights(ours, theirs.state_dict()).layout == "smp"
    assert_same_output(ours, theirs, torch.randn(1, 3, 64, 64), atol=1e-4)


def test_backbone_options_are_checked():
    with pytest.raises(CnnlabError, match="encoder_depth=6, but backbone='resnet18' has 5 stages"):
        unet(backbone="resnet18", encoder_depth=6)
    with pytest.raises(CnnlabError, match="decoder_channels=.* has 3 blocks but the encoder returns 5"):
        unet(backbone="resnet18", decoder_channels=(64, 32, 16))
    with pytest.raises(CnnlabError, match="padding='valid'/stages/channels/up are options of the paper's network"):
        unet(backbone="resnet18", padding="valid")
    with pytest.raises(CnnlabError, match="encoder_depth apply to the encoder-decoder on a backbone"):
        unet(encoder_depth=4)
    with pytest.raises(CnnlabError, match="channels must be positive ints"):
        unet(channels=(64, 0))
    with pytest.raises(CnnlabError, match="a detection model"):
        unet(backbone="faster_rcnn")
