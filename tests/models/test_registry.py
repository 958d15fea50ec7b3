"""Registry-parametrized smoke tests over every classifier, and the registry's own behaviour.

``test_forward_backward`` (finite outputs and gradients from the real random init, small input)
and ``test_interface`` run real tensors; the input-error and layer-name checks run on the meta
device, where a model is built without allocating or initialising any weight.
"""
from __future__ import annotations

import pytest
import torch

import cnnlab
from cnnlab import CnnlabError
from cnnlab.models import Classifier, model_info

CLASSIFIERS = cnnlab.list_models(task="classification")
# Smoke inputs stay small; a model that needs more says so through min_input_size.
SMOKE_SIZE = 64


def smoke_input(model: Classifier, size: int = SMOKE_SIZE) -> torch.Tensor:
    # never above the model's own default input (CIFAR nets: 32), never below what it accepts
    size = max(min(size, model_info(model.model_name).default_input[-1]), model.min_input_size)
    return torch.randn(2, model.in_channels, size, size, device=next(model.parameters()).device)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = cnnlab.create_model(name, num_classes=7)
    assert isinstance(model, Classifier)
    assert model.model_name == name and model.num_classes == 7
    model.train()
    x = smoke_input(model)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), "a parameter got no or a non-finite gradient"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_interface(name):
    # real tensors on purpose: on the meta device every op runs PyTorch's Python shape rules,
    # which for these small inputs is slower than computing them
    model = cnnlab.create_model(name, num_classes=5).eval()
    x = smoke_input(model, size=96)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        assert logits.shape == (2, 5) and pre.ndim == 2
        # feature_info describes the real feature maps: channels exactly, and the stride exactly,
        # measured as the input growth that grows a map by one pixel (padding and "valid" convs
        # shift a map's size but not this ratio).
        maps = model.forward_intermediates(x)
        assert len(maps) == len(model.feature_info) >= 1
        top = max(f.stride for f in model.feature_info)
        size = x.shape[-1] + 2 * top
        bigger = model.forward_intermediates(torch.randn(1, model.in_channels, size, size))
        for info, fmap, big in zip(model.feature_info, maps, bigger):
            assert fmap.shape[1] == info.channels, f"{info.module}: {fmap.shape[1]} channels, feature_info says {info.channels}"
            grown = big.shape[-1] - fmap.shape[-1]
            assert grown * info.stride == 2 * top, (
                f"{info.module}: input +{2 * top} px grew the map by {grown} px, so its stride is "
                f"{2 * top / max(grown, 1):g}, but feature_info says {info.stride}"
            )
        assert maps[-1].shape[1] == feats.shape[1]
        strides = [f.stride for f in model.feature_info]
        assert strides == sorted(strides)
        # reset_classifier: a new head, then none at all
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.num_classes == 3
        model.reset_classifier(0)
        assert model(x).shape == pre.shape and pre.shape[1] == model.num_features
        # a model built without a head gets one back
        headless = cnnlab.create_model(name, num_classes=0).eval()
        assert headless(x).shape == pre.shape
        headless.reset_classifier(4)
        assert headless(x).shape == (2, 4) and headless.num_classes == 4


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_bad_input_names_expected_shape(name):
    # the check reads shapes only, so meta tensors take the same path as real ones
    with torch.device("meta"):
        model = cnnlab.create_model(name, num_classes=4).eval()
        wrong_channels = model.in_channels + 1
        with pytest.raises(CnnlabError, match=rf"\(B, {model.in_channels}, H, W\)"):
            model(torch.randn(1, wrong_channels, 64, 64))
        too_small = model.min_input_size - 1
        if too_small >= 1:
            with pytest.raises(CnnlabError, match=f">= {model.min_input_size}"):
                model(torch.randn(1, model.in_channels, too_small, too_small))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_model_info(name):
    info = model_info(name)
    assert info.num_params > 0 and info.paper and info.year > 1980
    assert len(info.default_input) == 3
    with torch.device("meta"):  # create_model's defaults build the model model_info describes
        model = cnnlab.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == info.num_params


def test_in_channels_override():
    model = cnnlab.create_model("simple_cnn", in_channels=3, num_classes=4)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 4)


def test_unknown_model_suggests_closest():
    with pytest.raises(CnnlabError, match="did you mean simple_cnn"):
        cnnlab.create_model("simple_cnm")


def test_unknown_option_lists_accepted():
    with pytest.raises(CnnlabError, match="does not take the option 'dropout'.*drop_rate"):
        cnnlab.create_model("simple_cnn", dropout=0.1)


def test_bad_num_classes():
    with pytest.raises(CnnlabError, match="num_classes"):
        cnnlab.create_model("simple_cnn", num_classes=-1)


def test_duplicate_registration_is_an_error():
    from cnnlab.models.registry import register_model
    from cnnlab.models.simple_cnn import SIMPLE_CNN

    with pytest.raises(CnnlabError, match="registered twice"):
        register_model(SIMPLE_CNN, name="simple_cnn")(lambda **kw: None)


def test_overwrite_param_conflict():
    from cnnlab.models.registry import overwrite_param

    kwargs = {"groups": 4}
    with pytest.raises(CnnlabError, match="conflicts"):
        overwrite_param(kwargs, "groups", 32)
    kwargs = {}
    overwrite_param(kwargs, "groups", 32)
    assert kwargs == {"groups": 32}


def test_list_models_pattern():
    assert cnnlab.list_models("simple_*") == ["simple_cnn", "simple_cnn_bn"]
    assert cnnlab.list_models("nothing_like_this*") == []


def test_simple_cnn_keras_param_count():
    # Keras model.summary() of the notes' model: 1,413,834 trainable parameters
    # (conv 3,200 + 73,856 + 147,584 + 295,168 + 590,080; dense 295,040 + 8,256 + 650).
    assert model_info("simple_cnn").num_params == 1_413_834


def test_layer_names_work_for_every_family_that_takes_layers():
    # create_model turns "groupnorm"/"silu" into factories once, for every family (the README promises it)
    took_norm, took_act = [], []
    for name in CLASSIFIERS:
        for option, value, kind, took in (("norm_layer", "groupnorm", torch.nn.GroupNorm, took_norm),
                                          ("act_layer", "silu", torch.nn.SiLU, took_act)):
            try:
                with torch.device("meta"):
                    model = cnnlab.create_model(name, **{option: value})
            except CnnlabError as e:
                assert "does not take the option" in str(e) or "conflicts" in str(e), (name, option, e)
                continue
            assert any(isinstance(m, kind) for m in model.modules()), (name, option)
            took.append(name)
    assert {"vgg16_bn", "resnet50", "densenet121"} <= set(took_norm)  # the families the README names
    assert {"resnet50", "mobilenet_v2"} <= set(took_act)
    with pytest.raises(CnnlabError, match="unknown norm layer 'grupnorm'.*groupnorm"):
        cnnlab.create_model("resnet18", norm_layer="grupnorm")
