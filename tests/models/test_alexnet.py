"""AlexNet (paper and torchvision layouts) and ZFNet: shapes, parameter counts, torchvision oracle."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.models.alexnet import alexnet, alexnet_tv, zfnet
from tests.models._helpers import assert_smallest_input
from tests.oracle import check_converted, meta_count


def _stage_shapes(name: str, size: int) -> list[tuple[int, ...]]:
    """Output shape of every conv and every pool, computed on the meta device."""
    with torch.device("meta"):
        model = cnnlab.create_model(name).eval()
        shapes = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
                 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
        model.forward_features(torch.empty(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def test_alexnet_paper_shapes():
    # Krizhevsky 2012 Fig. 2 (both towers merged): 227 -> C1 96@55x55 -> pool 27 -> C2 256@27 -> pool 13
    # -> C3 384@13 -> C4 384@13 -> C5 256@13 -> pool 6, so fc6 sees 256*6*6 = 9216 values.
    assert _stage_shapes("alexnet", 227) == [
        (96, 55, 55), (96, 27, 27), (256, 27, 27), (256, 13, 13), (384, 13, 13), (384, 13, 13), (256, 13, 13), (256, 6, 6),
    ]
    model = cnnlab.create_model("alexnet")
    assert model.head.fc6.in_features == 9216 and model.head.fc7.out_features == 4096
    lrn = model.features[0].lrn
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)
    assert isinstance(model.features[1].lrn, nn.LocalResponseNorm) and not hasattr(model.features[2], "lrn")
    pool = model.features[0].pool
    assert (pool.kernel_size, pool.stride) == (3, 2)  # overlapping pooling, §3.4
    assert model.head.drop6.p == model.head.drop7.p == 0.5


def test_alexnet_paper_parameter_count():
    # Krizhevsky 2012 §1: "60 million parameters" (a round figure). The paper's two-GPU network
    # (C2, C4, C5 see only their own tower's maps) is groups=2: 60,965,224, 1.6% above 60M.
    assert meta_count(alexnet) == 62_378_344  # one tower
    two_towers = meta_count(alexnet, groups=2)
    assert two_towers == 60_965_224
    assert abs(two_towers - 60e6) / 60e6 < 0.02
    # fc6 + fc7 + fc8 hold 94% of them
    fc = 9216 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert fc / two_towers > 0.9


def test_alexnet_notes_say_torchvision_differs():
    info = cnnlab.model_info("alexnet")
    assert "alexnet_tv" in info.notes and "torchvision" in info.notes
    assert info.pretrained == {} and cnnlab.model_info("alexnet_tv").pretrained == {"torchvision": "alexnet"}


def test_alexnet_tv_matches_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.alexnet()
    assert meta_count(alexnet_tv) == meta_count(torchvision.models.alexnet) == 61_100_840
    diff = check_converted("alexnet_tv", reference, input_size=64)
    assert diff <= 1e-4
    ours = cnnlab.create_model("alexnet_tv")
    assert cnnlab.load_weights(ours, reference.state_dict()).layout == "torchvision"
    assert torch.equal(ours.features[1].conv.weight, reference.features[3].weight)
    assert torch.equal(ours.head.fc7.bias, reference.classifier[4].bias)


def test_zfnet_shapes_and_count():
    # Zeiler & Fergus 2013 Fig. 3: 224 -> 110 (7x7/2) -> 55 -> 26 (5x5/2) -> 13 -> 13 -> 13 -> 13 -> 6
    assert _stage_shapes("zfnet", 224) == [
        (96, 110, 110), (96, 55, 55), (256, 26, 26), (256, 13, 13), (384, 13, 13), (384, 13, 13), (256, 13, 13), (256, 6, 6),
    ]
    # the paper gives no total; conv1 is 96*(7*7*3)+96 = 14,208 (AlexNet's: 34,944)
    assert meta_count(zfnet) == 62_357_608
    assert meta_count(alexnet) - meta_count(zfnet) == 34_944 - 14_208


@pytest.mark.parametrize("name,smallest", [("alexnet", 67), ("alexnet_tv", 63), ("zfnet", 47)])
def test_min_input_size_is_exact(name, smallest):
    model = assert_smallest_input(name, smallest)  # one pixel less really breaks a pool
    with pytest.raises(CnnlabError, match=f">= {smallest}"):
        model(torch.randn(1, 3, smallest - 1, smallest - 1))


def test_layers_cannot_be_overridden():
    with pytest.raises(CnnlabError, match="conflicts"):
        cnnlab.create_model("zfnet", ceil_mode=False)
