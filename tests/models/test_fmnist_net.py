"""The demo's networks: ``fmnist_net`` unchanged, ``fmnist_fast`` counted by hand and shaped as its table says."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab import create_model
from cnnlab._errors import CnnlabError
from cnnlab.models.fmnist_net import FAST_NET, FastCNN, FastNetConfig, FastStage
from tests.models._helpers import macs


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_fmnist_net_is_unchanged():
    # 32@3x3 (288 + BN 64), 64@3x3 (18,432 + 128), 64@3x3 (36,864 + 128), 128@3x3 (73,728 + 256), fc 1152*10 + 10
    model = create_model("fmnist_net")
    assert _params(model) == 288 + 64 + 18_432 + 128 + 36_864 + 128 + 73_728 + 256 + 11_530 == 141_418
    assert list(model.state_dict())[:3] == ["stages.0.0.conv.weight", "stages.0.0.norm.weight", "stages.0.0.norm.bias"]


def test_fmnist_fast_counts_by_hand():
    # stem: PixelUnshuffle(2), no weights; 4->48 (1,728 + BN 96), 48->64 (27,648 + 128), 64->128 (73,728 + 256),
    # dense on 3x3x128: 1152*512 + BN 1,024, fc 512*10 + 10 (convs and the dense layer have no bias: BN follows)
    model = create_model("fmnist_fast").eval()  # eval: one image has no batch statistics for the dense layer's BN
    assert isinstance(model, FastCNN)
    assert _params(model) == 1_728 + 96 + 27_648 + 128 + 73_728 + 256 + 589_824 + 1_024 + 5_130 == 699_562
    # multiply-adds at 28x28: 4*48*9*196 + 48*64*9*196 + 64*128*9*49 + 1152*512 + 512*10, 0.69x fmnist_net's 14.6M
    x = torch.randn(1, 1, 28, 28)
    assert macs(model, x) == 338_688 + 5_419_008 + 3_612_672 + 589_824 + 5_120
    assert macs(model, x) < 0.7 * macs(create_model("fmnist_net"), x)
    assert model.num_features == 512 and model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 512)


def test_fmnist_fast_shapes_follow_the_table():
    model = create_model("fmnist_fast").eval()
    x = torch.randn(2, 1, 28, 28)
    feats = model.forward_intermediates(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(48, 14, 14), (64, 7, 7), (128, 3, 3)]
    assert [(i.channels, i.stride) for i in model.feature_info] == [(48, 2), (64, 4), (128, 8)]
    assert model(x).shape == (2, 10)
    # the stem is space-to-depth: a lossless rearrangement of the pixels (torch's pixel_unshuffle is the oracle)
    torch.testing.assert_close(model.stem(x), torch.nn.functional.pixel_unshuffle(x, 2), rtol=0, atol=0)
    assert sorted(model.stem(x).flatten().tolist()) == sorted(x.flatten().tolist())


def test_fmnist_fast_table_and_options():
    table = FastNetConfig(stem_factor=1, stages=(FastStage(8, num_convs=2), FastStage(16, pool=False)), head_size=1)
    model = create_model("fmnist_fast", config=table, num_classes=3, in_channels=3)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert model.num_features == 16 and model.min_input_size == 2 and len(model.stages[0]) == 3  # 2 convs, pool
    assert model.forward_features(torch.randn(1, 3, 16, 16)).shape == (1, 16, 8, 8)
    assert FAST_NET.stem_factor == 2 and create_model("fmnist_fast").min_input_size == 8
    with pytest.raises(CnnlabError, match="stem_factor"):
        FastCNN(FastNetConfig(stem_factor=0, stages=()))


def test_fmnist_fast_refuses_odd_sizes_clearly():
    model = create_model("fmnist_fast")
    model.check_input(torch.empty(1, 1, 28, 28))
    with pytest.raises(CnnlabError, match="divisible by 2"):
        model.check_input(torch.empty(1, 1, 29, 29))
    with pytest.raises(CnnlabError):
        model.check_input(torch.empty(1, 1, 6, 6))  # below min_input_size


def test_fmnist_fast_trains():
    torch.manual_seed(0)
    model = create_model("fmnist_fast", num_classes=2)
    x = torch.randn(64, 1, 28, 28)
    y = (x[:, 0, :, :14].mean((1, 2)) > x[:, 0, :, 14:].mean((1, 2))).long()  # left half brighter: learnable
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = None
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
