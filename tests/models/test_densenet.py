"""DenseNet: exact parameter counts and outputs against torchvision, checkpoints old and new, options."""
from __future__ import annotations

import re

import pytest
import torch
import torchvision

import cnnlab
from cnnlab import CnnlabError
from cnnlab.models.densenet import DenseNet, DenseNetConfig
from tests.oracle import assert_same_output, check_converted, meta_count, randomize_norm_stats


@pytest.mark.parametrize("name", ["densenet121", "densenet169", "densenet201", "densenet161"])
def test_param_count_matches_torchvision(name):
    # torchvision's weight metadata: 7,978,856 / 14,149,480 / 20,013,928 / 28,681,000
    assert meta_count(cnnlab.create_model, name) == meta_count(getattr(torchvision.models, name))


@pytest.fixture(scope="module")
def tv_densenet121():
    torch.manual_seed(0)
    return randomize_norm_stats(torchvision.models.densenet121()).eval()


def test_torchvision_weights_give_same_output(tv_densenet121):
    assert check_converted("densenet121", tv_densenet121, input_size=64, init="none") <= 1e-4


def test_old_torchvision_checkpoint_through_create_model(tv_densenet121, monkeypatch):
    """torchvision's released files use 'norm.1'/'conv.2' and predate num_batches_tracked."""
    old = {}
    for key, value in tv_densenet121.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            old[re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    # what torchvision's downloader would hand back, without the network
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda *args, **kwargs: dict(old))
    ours = cnnlab.create_model("densenet121", weights="torchvision", init="none")
    torch.manual_seed(1)
    assert_same_output(ours, tv_densenet121, torch.randn(1, 3, 64, 64))


def test_foreign_state_dict_is_refused():
    with pytest.raises(CnnlabError, match="missing"):
        cnnlab.load_weights(cnnlab.create_model("densenet121", init="none"), torchvision.models.squeezenet1_1().state_dict())


def test_feature_info_follows_table1_channel_arithmetic():
    model = cnnlab.create_model("densenet121")
    # 64 + 6*32 = 256 -> /2 = 128 + 12*32 = 512 -> 256 + 24*32 = 1024 -> 512 + 16*32 = 1024
    assert [(f.module, f.channels, f.stride) for f in model.feature_info] == [
        ("stem.conv", 64, 2), ("stages.0", 256, 4), ("stages.1", 512, 8), ("stages.2", 1024, 16), ("final_norm", 1024, 32),
    ]
    assert model.fc.in_features == 1024


def test_growth_rate_bn_size_and_compression_options():
    model = cnnlab.create_model("densenet121", growth_rate=12, bn_size=2, compression=0.75)
    assert model.stages[0].block.layers[0].conv1.conv.out_channels == 24  # bn_size * k
    assert model.feature_info[1].channels == 64 + 6 * 12
    assert model.stages[1].transition.conv.out_channels == int(0.75 * (64 + 6 * 12))
    with pytest.raises(CnnlabError, match="compression"):
        cnnlab.create_model("densenet121", compression=0.0)


def test_memory_efficient_matches_plain():
    config = DenseNetConfig((2, 2, 2, 2), growth_rate=8, stem_channels=16)
    torch.manual_seed(0)
    plain = DenseNet(config, num_classes=5)
    efficient = DenseNet(config, num_classes=5, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out1, out2 = plain(x), efficient(x)
    torch.testing.assert_close(out1, out2)
    out1.sum().backward()
    out2.sum().backward()
    for (name, p1), p2 in zip(plain.named_parameters(), efficient.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)
