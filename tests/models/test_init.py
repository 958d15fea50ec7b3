"""Each family starts from its reference's initialisation: per-layer weight statistics of a fresh
cnnlab model against torchvision's or timm's model of the same configuration, and the papers' own
schemes where no library has the family."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torchvision
from torch import nn

import cnnlab
from cnnlab.models import model_info

# Tolerance from the sampling error: the std s of n i.i.d. draws has relative standard error
# about 1/sqrt(2n) (normal draws; uniform ones are tighter, 0.45/sqrt(n)), so the ratio of two
# independent estimates has relative error sqrt(1/(2n) + 1/(2n)) = 1/sqrt(n); the mean of n draws
# has standard error s/sqrt(n). Z standard errors allowed: over the ~3,000 compared tensors a
# false alarm at 6 sigma has probability ~1e-5, while a wrong scheme is off by factors (fan_in vs
# fan_out of DenseNet's stem: 4.6; He normal vs PyTorch's uniform default: 2.4; a depthwise
# conv's fan_out with or without the groups: sqrt(channels) >= 4).
Z = 6.0

# One variant per init path: ResNeXt, Wide ResNet and SE-ResNeXt share ResNet's code, VGG without BN vgg11_bn's.
TORCHVISION = [
    ("resnet18", lambda: torchvision.models.resnet18()),
    ("resnet50", lambda: torchvision.models.resnet50()),
    ("densenet121", lambda: torchvision.models.densenet121()),
    ("vgg11_bn", lambda: torchvision.models.vgg11_bn()),
    ("alexnet_tv", lambda: torchvision.models.alexnet()),
    ("googlenet", lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True)),
    ("squeezenet1_0", lambda: torchvision.models.squeezenet1_0()),
    ("squeezenet1_1", lambda: torchvision.models.squeezenet1_1()),
    ("shufflenet_v2_x1_0", lambda: torchvision.models.shufflenet_v2_x1_0()),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2()),
]
TIMM = [
    ("seresnet50", "seresnet50"),
    ("xception", "legacy_xception"),
    ("efficientnet_b0", "efficientnet_b0"),
    ("mnasnet1_0", "mnasnet_100"),
    ("semnasnet_100", "semnasnet_100"),
    ("mobilenetv1_100", "mobilenetv1_100"),
]


def assert_same_statistics(name: str, reference: nn.Module, source: str) -> int:
    """Every parameter of a fresh ``name`` has the mean and std of the reference's same tensor
    (paired through the checkpoint converter). Returns how many tensors were compared."""
    torch.manual_seed(0)
    ours = dict(cnnlab.create_model(name).named_parameters())
    convert = model_info(name).converter(source)
    theirs = convert(dict(reference.state_dict()))
    compared, problems = 0, []
    for key, p in ours.items():
        assert key in theirs and theirs[key].shape == p.shape, f"{name}: {key} has no counterpart in {source}'s model"
        a, b = p.detach().double().flatten(), theirs[key].double().flatten()
        n = a.numel()
        sa, sb = (a.std().item(), b.std().item()) if n > 1 else (0.0, 0.0)
        if sb == 0.0 or sa == 0.0:  # constant tensors (BN 1/0, zero biases, zero-init): equal exactly
            if not (sa == sb and math.isclose(a.mean().item(), b.mean().item(), abs_tol=1e-7)):
                problems.append(f"{key}: ours mean {a.mean():.4g} std {sa:.3g}, {source} mean {b.mean():.4g} std {sb:.3g}")
        else:
            ratio_tol = Z / math.sqrt(n)
            mean_tol = Z * math.sqrt((sa**2 + sb**2) / n)
            if abs(sa / sb - 1) > ratio_tol or abs(a.mean().item() - b.mean().item()) > mean_tol:
                problems.append(f"{key} (n={n}): ours std {sa:.4g} mean {a.mean():.3g}, "
                                f"{source} std {sb:.4g} mean {b.mean():.3g}")
        compared += 1
    assert not problems, f"{name} does not start as {source}'s model:\n" + "\n".join(problems[:15])
    return compared


@pytest.mark.parametrize("name,build", TORCHVISION, ids=[n for n, _ in TORCHVISION])
def test_matches_torchvision_init(name, build):
    torch.manual_seed(1)
    assert assert_same_statistics(name, build(), "torchvision") > 10


@pytest.mark.parametrize("name,timm_name", TIMM, ids=[n for n, _ in TIMM])
def test_matches_timm_init(name, timm_name):
    torch.manual_seed(1)
    assert assert_same_statistics(name, timm.create_model(timm_name), "timm") > 10


def test_densenet121_output_scale_matches_torchvision():
    # Kaiming fan_out (the old init) makes the 1x1 bottlenecks, whose fan_in is all earlier maps,
    # amplify: a fresh densenet121 gave logits ~4e4 where torchvision's give ~0.5. Two random
    # networks' logit scales differ by a modest factor; the old scheme was off by ~1e4.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    ours = cnnlab.create_model("densenet121").eval()
    reference = torchvision.models.densenet121().eval()
    with torch.no_grad():
        scale, ref_scale = ours(x).std().item(), reference(x).std().item()
    assert ref_scale / 4 < scale < ref_scale * 4, (scale, ref_scale)


def test_alexnet_and_zfnet_start_as_their_papers():
    torch.manual_seed(0)
    alex = cnnlab.create_model("alexnet")
    for i, conv in enumerate(m.conv for m in alex.features):
        n = conv.weight.numel()
        assert abs(conv.weight.std().item() / 0.01 - 1) < Z / math.sqrt(2 * n)  # §5: N(0, 0.01)
        assert torch.all(conv.bias == (1.0 if i in (1, 3, 4) else 0.0))  # §5: 1 in conv2, conv4, conv5
    assert torch.all(alex.head.fc6.bias == 1) and torch.all(alex.head.fc7.bias == 1) and torch.all(alex.head.fc.bias == 0)
    zf = cnnlab.create_model("zfnet")
    assert all(torch.all(p == 0) for n, p in zf.named_parameters() if n.endswith("bias"))  # ZFNet §3: biases 0
    assert abs(zf.features[0].conv.weight.std().item() / 0.01 - 1) < Z / math.sqrt(2 * zf.features[0].conv.weight.numel())


def test_lenet5_starts_as_the_paper():
    # LeCun et al. 1998, Appendix C: U(-2.4/F, 2.4/F), F the fan-in; its std is 2.4 / (F sqrt(3))
    torch.manual_seed(0)
    model = cnnlab.create_model("lenet5")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            assert m.weight.abs().max() <= 2.4 / fan_in
            assert abs(m.weight.std().item() * fan_in * math.sqrt(3) / 2.4 - 1) < Z * 0.45 / math.sqrt(m.weight.numel())


def test_explicit_schemes_still_override_the_reference():
    torch.manual_seed(0)
    old = cnnlab.create_model("densenet121", init="kaiming")  # the uniform He fan_out scheme, kept as an option
    stem = old.stem.conv.conv.weight
    assert abs(stem.std().item() / math.sqrt(2 / (64 * 49)) - 1) < Z / math.sqrt(2 * stem.numel())
    with pytest.raises(cnnlab.CnnlabError, match="unknown init scheme 'he'.*reference"):
        cnnlab.create_model("densenet121", init="he")
