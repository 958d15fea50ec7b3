"""CIFAR pre-activation ResNets and Wide ResNets: paper parameter counts, depth rules, deep builds."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.layers import SqueezeExcite
from cnnlab.layers.residual import PreActBasicBlock, PreActBottleneck
from cnnlab.models.preact_resnet import preact_resnet, wrn
from tests.oracle import meta_count


def weight_count(model: nn.Module) -> int:
    """Conv and linear parameters only (no norm layers)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())


@pytest.mark.parametrize("name, paper", [
    ("preact_resnet164", 1.7e6),  # He et al. 2016b, Tables 3-4 (CIFAR-10): ResNet-164, 1.7M
    ("wrn_16_8", 11.0e6),  # Zagoruyko & Komodakis 2016, Table 4: WRN-16-8, 11.0M
    ("wrn_28_10", 36.5e6),  # same table: WRN-28-10, 36.5M
    ("wrn_40_4", 8.9e6),  # same table: WRN-40-4, 8.9M
])
def test_paper_param_counts(name, paper):
    count = meta_count(cnnlab.create_model, name)  # 10 classes, as in the papers' CIFAR-10 tables
    assert abs(count - paper) / paper <= 0.01, f"{name}: {count:,} vs paper {paper:,.0f}"


def test_resnet110_paper_count_at_printed_precision():
    # He et al. 2016b, Table 3 (and He et al. 2016, Table 6): ResNet-110, 1.7M. Ours is 1,730,522:
    # 1.8% above the printed figure, which has two significant digits; it still prints as 1.7M.
    count = meta_count(cnnlab.create_model, "preact_resnet110")
    assert count == 1_730_522 and round(count / 1e6, 1) == 1.7


def test_resnet1001_paper_count():
    # He et al. 2016b, Table 4 (CIFAR-10): ResNet-1001, 10.2M. Our conv + classifier weights are
    # 10,178,490 (0.2% off); with BN's scale and shift the total is 10,327,706 (1.3% above), which
    # would print as 10.3M, so the paper's figure counts weights without the BN affine parameters.
    with torch.device("meta"):
        model = cnnlab.create_model("preact_resnet1001")
    assert abs(weight_count(model) - 10.2e6) / 10.2e6 <= 0.01
    assert sum(p.numel() for p in model.parameters()) == 10_327_706


def test_resnet1001_builds_and_runs():
    torch.manual_seed(0)
    model = preact_resnet(depth=1001)
    blocks = [m for m in model.modules() if isinstance(m, PreActBottleneck)]
    assert len(blocks) == 333  # (1001 - 2) / 9 = 111 units per stage, 3 weighted layers each
    # Train mode: BN normalises with batch statistics. (In eval mode at init, BN's running stats are
    # still 0/1, so the 333 un-normalised residual additions roughly double the scale each and overflow.)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("depth, bottleneck, units", [
    (20, False, 3), (56, False, 9), (110, False, 18), (164, True, 18), (1001, True, 111), (29, None, 3)])
def test_depth_rules(depth, bottleneck, units):
    with torch.device("meta"):
        model = preact_resnet(depth=depth, bottleneck=bottleneck)
    block = PreActBottleneck if bottleneck or bottleneck is None else PreActBasicBlock
    assert all(len(model.get_submodule(f"layer{i}")) == units for i in (1, 2, 3))
    assert all(isinstance(b, block) for b in model.layer1)
    stages = [model.get_submodule(f"layer{s}") for s in (1, 2, 3)]
    branch_convs = sum(isinstance(m, nn.Conv2d) for s in stages for b in s for m in b.residual.modules())
    assert 1 + branch_convs + 1 == depth  # stem + every residual branch's convs + the classifier


def test_bad_depth_is_explained():
    with pytest.raises(CnnlabError, match="6n\\+2"):
        preact_resnet(depth=21, bottleneck=False)
    with pytest.raises(CnnlabError, match="9n\\+2"):
        preact_resnet(depth=26, bottleneck=True)
    with pytest.raises(CnnlabError, match="6n\\+4"):
        wrn(depth=27)
    with pytest.raises(CnnlabError, match="conflicts"):
        cnnlab.create_model("preact_resnet56", depth=20)
    with pytest.raises(CnnlabError, match="widen_factor"):
        cnnlab.create_model("wrn_28_10", widen_factor=8)


def test_wrn_structure():
    with torch.device("meta"):
        model = cnnlab.create_model("wrn_28_10")
    assert [(f.channels, f.stride) for f in model.feature_info] == [(160, 1), (320, 2), (640, 4)]
    assert [len(model.get_submodule(f"layer{i}")) for i in (1, 2, 3)] == [4, 4, 4]  # (28 - 4) / 6
    block = model.layer2[1]
    assert block.residual.dropout.p == 0.3  # the paper's dropout between the convs
    with torch.device("meta"):
        no_dropout = cnnlab.create_model("wrn_16_8", block_drop_rate=0.0)
    assert "dropout" not in dict(no_dropout.layer1[0].residual.named_children())
    assert meta_count(cnnlab.create_model, "wrn", depth=22, widen_factor=8) == meta_count(wrn, depth=22, widen_factor=8)


def test_cifar_forward_and_features():
    torch.manual_seed(0)
    model = cnnlab.create_model("preact_resnet20").eval()
    assert model.min_input_size <= 8
    x = torch.randn(2, 3, 32, 32)
    maps = model.forward_intermediates(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert (maps[-1] >= 0).all()  # the last map is taken after the final BN-ReLU
    assert model(x).shape == (2, 10)


def test_zero_init_residual_preact():
    torch.manual_seed(0)
    model = cnnlab.create_model("preact_resnet20", zero_init_residual=True).eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.layer1[1](x), x)  # identity units pass the input through


def test_attn_layer_in_preact_units():
    se = partial(SqueezeExcite, rd_ratio=1 / 4)
    with torch.device("meta"):
        model = cnnlab.create_model("preact_resnet20", attn_layer=se)
    assert sum(isinstance(m, SqueezeExcite) for m in model.modules()) == 9
