"""Feature maps at chosen stages of any classifier."""
from __future__ import annotations

import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.viz import plot_feature_maps, stage_feature_maps
from cnnlab.viz.feature_maps import StageMaps


def test_stage_maps_are_the_stage_outputs():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3).eval()
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    maps = stage_feature_maps(model, image, stages=["layer2", "-1", 0])
    assert [m.module for m in maps] == ["layer2", "layer4", "stem"]
    x = image[None].float() / 255
    stem = model.stem(x)
    assert torch.allclose(maps[2].maps, stem[0], atol=1e-6)  # independent of the hooks: the stem called directly
    layer2 = model.layer2(model.layer1(model.maxpool(stem)))
    assert torch.allclose(maps[0].maps, layer2[0], atol=1e-5)
    assert [m.maps.shape[0] for m in maps] == [info.channels for info in (model.feature_info[2], model.feature_info[4],
                                                                           model.feature_info[0])]
    assert len(stage_feature_maps(model, image)) == len(model.feature_info)


def test_top_channels_are_the_most_active():
    maps = torch.zeros(4, 2, 2)
    maps[2] = 5
    maps[0] = 1
    maps[3, 0, 0] = 8  # mean 2
    channels, means = StageMaps(0, "s", 1, maps).top_channels(3)
    assert channels == [2, 3, 0] and means == [5.0, 2.0, 1.0]


def test_bad_stage_and_channels_are_clear_errors(tmp_path):
    model = create_model("lenet5")
    with pytest.raises(CnnlabError, match="unknown stage 'stages.9'.*did you mean"):
        stage_feature_maps(model, torch.rand(1, 32, 32), ["stages.9"])
    with pytest.raises(CnnlabError, match="stage 7 does not exist"):
        stage_feature_maps(model, torch.rand(1, 32, 32), [7])
    with pytest.raises(CnnlabError, match="expects images with 1 channel, the image has 3"):
        stage_feature_maps(model, torch.rand(3, 32, 32))
    with pytest.raises(CnnlabError, match="feature maps need a cnnlab classifier"):
        stage_feature_maps(torch.nn.Conv2d(1, 2, 3), torch.rand(1, 8, 8))
    image = torch.rand(1, 32, 32)
    path = plot_feature_maps(tmp_path / "m.png", image, stage_feature_maps(model, image), k=4, title="lenet5")
    assert path.read_bytes()[:4] == b"\x89PNG"
