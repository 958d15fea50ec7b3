"""FCN: bilinear transposed convs against F.interpolate, FCN-32s/16s/8s on VGG-16 with the crops of the paper's
Caffe nets and logits at the input size for any size, the paper's parameter count, torchvision's fcn_resnet50
with the same out/aux logits, FCN on any backbone, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.segmentation.encoder import Encoder
from cnnlab.models.base import FeatureInfo
from cnnlab.segmentation.fcn import FCN, BilinearUpsample, FCNConfig, bilinear_kernel, coordinate_maps
from tests.oracle import randomize_norm_stats


def test_bilinear_kernel_is_the_papers():
    # factor 2: taps 1 - |i - 1.5| / 2 = (1/4, 3/4, 3/4, 1/4), the outer product (Caffe's upsample_filt)
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(bilinear_kernel(2), torch.outer(taps, taps))
    assert bilinear_kernel(3).shape == (5, 5) and bilinear_kernel(3)[2, 2] == 1.0  # odd: centred on a tap


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_upsample_interpolates_ramps_and_constants(factor):
    up = BilinearUpsample(2, factor)
    h, w = 5, 7
    ramp = torch.arange(w, dtype=torch.float32).expand(h, w) * 0.5 + torch.arange(h, dtype=torch.float32)[:, None]
    x = torch.stack([ramp, torch.full((h, w), 3.0)])[None]  # channel 0: a linear ramp, channel 1: a constant
    with torch.no_grad():
        y = up(x)
    assert y.shape[-2:] == ((h - 1) * factor + 2 * factor, (w - 1) * factor + 2 * factor)
    c = factor // 2  # the crop that aligns the transposed conv with interpolation's pixel centres
    y = y[..., c:c + h * factor, c:c + w * factor]
    expected = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    inner = (..., slice(factor, -factor), slice(factor, -factor))  # away from the border (zero padding there)
    torch.testing.assert_close(y[inner], expected[inner], rtol=1e-5, atol=1e-5)
    assert torch.allclose(y[0, 1][inner[1:]], torch.tensor(3.0))  # channels do not mix


class _Chain(torch.nn.Module):
    """A plain chain of convs and pools (linear: all-ones kernels, average pools), strides 2 and 4."""

    def __init__(self) -> None:
        super().__init__()
        self.in_channels = 1
        self.a = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=2), torch.nn.AvgPool2d(2))
        self.b = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 5, padding=1, dilation=2), torch.nn.AvgPool2d(3, 2, 1))
        for m in self.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)

    def forward_features(self, x):
        return self.b(self.a(x))


def test_coordinate_maps_find_the_receptive_fields_centres():
    # the centre of output o's receptive field (the centroid of d out[o] / d input, symmetric for a linear chain
    # of all-ones kernels away from the border) must be a * o + b
    chain = _Chain()
    maps = coordinate_maps(chain, [FeatureInfo("a", 1, 2), FeatureInfo("b", 1, 4)], 1)
    x = torch.zeros(1, 1, 64, 64, requires_grad=True)
    for (a, b), stage in zip(maps, ("a", "b")):
        y = chain.a(x) if stage == "a" else chain.forward_features(x)
        o = 6
        (grad,) = torch.autograd.grad(y[0, 0, o, o], x)
        weights = grad[0, 0].sum(0)  # the receptive field along the width
        centre = (weights * torch.arange(64.0)).sum() / weights.sum()
        assert centre.item() == pytest.approx(a * o + b)


@pytest.fixture(scope="module")
def meta_fcn8s():
    # VGG-16 FCNs compute ~20 GMACs even on a 1x1 image (the input is padded by 100): shapes and gradient
    # paths are checked on the meta device, which computes shapes only
    with torch.device("meta"):
        return cnnlab.create_model("fcn8s", num_classes=3)


def _variant(fcn8s: FCN, skip_strides: tuple[int, ...]) -> FCN:
    encoder = fcn8s.encoder
    kept = [s for s in encoder.stages if s.stride in skip_strides] + [encoder.stages[-1]]
    with torch.device("meta"):
        return FCN(Encoder(encoder.body, kept), 3, FCNConfig(skip_strides=skip_strides))


@pytest.mark.parametrize("skips, offsets, final", [((16, 8), [5, 9], 31), ((16,), [5], 27), ((), [], 19)])
def test_skip_fcn_crops_are_those_of_the_papers_caffe_nets(meta_fcn8s, skips, offsets, final):
    # voc-fcn8s/16s/32s (Long et al.'s code): score_pool4 cropped at 5, score_pool3 at 9, the final up-sampling
    # at 31 (8s), 27 (16s), 19 (32s); here computed from the layers' geometry
    model = meta_fcn8s if skips == (16, 8) else _variant(meta_fcn8s, skips)
    assert model.skip_offsets == offsets and model.final_offset == final
    for size in [(1, 1), (2, 3), (31, 33), (37, 50), (64, 96), (224, 224), (500, 375)]:
        assert model(torch.empty(1, 3, *size, device="meta")).shape == (1, 3, *size)


def test_skip_fcn_upsampling_fixed_final_learnt_2x(meta_fcn8s):
    model = meta_fcn8s
    assert not model.head.upscore.weight.requires_grad and model.head.upscore.factor == 8
    assert all(up.weight.requires_grad and up.factor == 2 for up in model.head.upscore_skips)
    try:
        model(torch.randn(2, 3, 40, 56, device="meta")).sum().backward()
        assert all(score.weight.grad is not None for score in model.head.score)  # fc7, pool4, pool3 scores learn
        assert all(up.weight.grad is not None for up in model.head.upscore_skips)
        assert model.head.upscore.weight.grad is None
    finally:
        model.zero_grad(set_to_none=True)


def test_classifier_fc_layers_become_the_fcns_convolutions(tmp_path):
    # a VGG's fc6 over the 7x7 pool5 map is a 7x7 conv (§3.1): on a 7x7 map the conv gives the classifier's fc6
    torch.manual_seed(0)
    with torch.device("meta"):
        model = cnnlab.create_model("fcn32s", num_classes=3, fc_channels=8)
    model = model.to_empty(device="cpu")
    fc6, fc7 = torch.nn.Linear(512 * 7 * 7, 8), torch.nn.Linear(8, 8)
    state = {"head.fc6.weight": fc6.weight.detach(), "head.fc6.bias": fc6.bias.detach(),
             "head.fc7.weight": fc7.weight.detach(), "head.fc7.bias": fc7.bias.detach()}
    assert len(model.load_classifier_fc(state)) == 4
    pool5 = torch.randn(2, 512, 7, 7)
    with torch.no_grad():
        expected = fc7(fc6(pool5.flatten(1)).relu()).relu()
        got = model.fc7(model.fc6(pool5))
    torch.testing.assert_close(got.flatten(1), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(CnnlabError, match="does not fit"):
        model.load_classifier_fc({"head.fc7.weight": torch.zeros(4, 4), "head.fc7.bias": torch.zeros(8)})


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_skip_fcns_have_the_papers_parameter_count(name):
    # Long et al. 2015, Table 1: FCN-VGG16, 134M parameters (VOC: 21 classes); the fixed final up-sampling
    # (FCN-32s: 21 x 21 x 64 x 64 = 1.8M weights) is not learnt
    with torch.device("meta"):
        model = cnnlab.create_model(name)
    learnt = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(learnt - 134e6) < 0.5e6
    if name == "fcn8s":
        assert abs(cnnlab.model_info(name).num_params - 134e6) < 0.5e6


def test_fcn_resnet50_equals_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3,
                                                             aux_loss=True)
    randomize_norm_stats(reference).eval()
    ours = cnnlab.create_model("fcn_resnet50", num_classes=3, aux_loss=True)
    assert cnnlab.load_weights(ours, reference.state_dict()).layout == "torchvision"
    ours.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(x), reference(x)
    assert set(a) == {"out", "aux"} and a["out"].shape == (2, 3, 64, 96)
    torch.testing.assert_close(a["out"], b["out"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a["aux"], b["aux"], rtol=1e-5, atol=1e-4)
    # torchvision's checkpoint carries the aux head: a model without one still takes it
    plain = cnnlab.create_model("fcn_resnet50", num_classes=3)
    assert cnnlab.load_weights(plain, reference.state_dict()).ok


def test_fcn_resnet50_parameter_count_is_torchvisions():
    # torchvision's docs (FCN_ResNet50_Weights): 35,322,218 parameters, with the aux head, 21 classes
    with torch.device("meta"):
        model = cnnlab.create_model("fcn_resnet50", aux_loss=True)
    assert sum(p.numel() for p in model.parameters()) == 35_322_218


def test_fcn_on_a_dilated_basic_block_resnet():
    model = cnnlab.create_model("fcn", backbone="resnet18", num_classes=4, output_stride=8, aux_loss=True)
    assert model.encoder.strides == [8, 8]  # layer3 (aux) and layer4, dilated
    out = model(torch.randn(2, 3, 50, 70))  # train mode: a dict too, as torchvision
    assert set(out) == {"out", "aux"} and out["out"].shape == out["aux"].shape == (2, 4, 50, 70)
    (out["out"].mean() + out["aux"].mean()).backward()
    model.eval()
    with torch.no_grad():
        single = cnnlab.create_model("fcn", backbone="resnet18", num_classes=4).eval()(torch.randn(1, 3, 33, 47))
    assert isinstance(single, torch.Tensor) and single.shape == (1, 4, 33, 47)


@pytest.mark.parametrize("name, kwargs, message", [
    ("fcn_resnet50", {"num_classes": 1}, "counts the background"),
    ("fcn", {"backbone": "resnet18", "output_stride": 4}, "output_stride must be 8, 16 or 32"),
    ("fcn", {"backbone": "vgg11", "output_stride": 8}, "cannot be dilated"),
    ("fcn8s", {"backbone": "resnet18"}, "plain chain"),
    ("fcn8s", {"fc_chanels": 64}, "fc_chanels"),
])
def test_bad_fcn_options_say_what_is_expected(name, kwargs, message):
    with pytest.raises(CnnlabError, match=message):
        cnnlab.create_model(name, **kwargs)


def _random_small_fcn8s(num_classes: int, seed: int) -> FCN:
    """Every weight random (built on the meta device: the crops' probe forward through VGG costs seconds on CPU)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = cnnlab.create_model("fcn8s", backbone="vgg11", num_classes=num_classes, fc_channels=8)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_weights_for_other_classes_leave_out_exactly_the_class_dependent_layers(tmp_path):
    """Fine-tuning (model.weights=FILE of a 21-class fcn8s into a 3-class one): the head, every layer whose shape
    depends on the class count (score layers and up-samplings), keeps its fresh initialisation; all else loads."""
    from safetensors.torch import save_file

    from cnnlab.engine.tasks._model import load_model_weights

    source = _random_small_fcn8s(21, seed=1).state_dict()
    save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "voc.safetensors")
    target = _random_small_fcn8s(21, seed=2)
    target.reset_classifier(3)  # what create_model(num_classes=3) initialises the head to
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    load_model_weights(target, tmp_path / "voc.safetensors", "fcn8s", default_head="fc")  # the engine's path
    loaded = target.state_dict()
    class_dependent = {k for k in source if source[k].shape != loaded[k].shape}
    assert class_dependent == {k for k in loaded if k == target.head_name or k.startswith(target.head_name + ".")}
    assert len(class_dependent) == 3 * 2 + 2 + 1  # 3 score convs (weight, bias), 2 2x up-samplings, the final one
    for key, value in loaded.items():
        torch.testing.assert_close(value, fresh[key] if key in class_dependent else source[key], rtol=0, atol=0)
    assert (target.head.score[1].weight == 0).all()  # fresh: zero scores, bilinear up-samplings (§3.3, §4.3)
    torch.testing.assert_close(target.head.upscore.weight[2, 2], bilinear_kernel(8))
    # reset_classifier gives the same: a fresh head of the new shapes, nothing else touched
    model = _random_small_fcn8s(21, seed=1)
    model.reset_classifier(3)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in loaded.items()}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, fresh[key] if key in class_dependent else source[key], rtol=0, atol=0)


def test_a_checkpoint_with_the_old_top_level_head_keys_still_loads():
    model = _random_small_fcn8s(3, seed=2)
    new = model.state_dict()
    old = {k.removeprefix("head."): v for k, v in new.items()}  # score.0.weight, upscore_skips.1.weight, ...
    assert "score.0.weight" in old and "upscore.weight" in old
    for load in (lambda m: m.load_state_dict(old), lambda m: cnnlab.load_weights(m, old)):  # run folders, files
        other = _random_small_fcn8s(3, seed=3)
        load(other)
        for key, value in other.state_dict().items():
            torch.testing.assert_close(value, new[key], rtol=0, atol=0)
