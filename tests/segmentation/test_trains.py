"""Every segmentation model trains: a forward and backward in training mode at a small size, logits at the input
size, a gradient for every parameter. (Eval-mode oracles do not catch a graph broken only for autograd, such as an
in-place activation of a dropped stage overwriting a tapped map.)"""
import pytest
import torch

import cnnlab

SMALL = {  # the VGG FCNs (134M parameters, 100 px of padding) and DeconvNet (252M) are checked on the meta device
    "unet": [{"padding": "same", "channels": [8, 16, 32, 64, 128]}, {"backbone": "resnet18"}],
    "pspnet": [{"backbone": "resnet18"}, {"backbone": "resnet18", "preset": "paper", "aux_loss": True}],
    "deeplabv3": [{"backbone": "resnet18", "output_stride": 16}, {"backbone": "resnet18", "output_stride": 8,
                                                                    "aux_loss": True}],
    "deeplabv3plus": [{"backbone": "resnet18"}],
    "fcn": [{"backbone": "resnet18"}],
    "segnet": [{"backbone": "vgg11_bn"}],
}


def _cases():
    for name, options in SMALL.items():
        for o in options:
            yield pytest.param(name, o, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in o.items())}")


def test_every_segmentation_model_is_covered_here_or_on_the_meta_device():
    heavy = {"fcn8s", "fcn16s", "fcn32s", "deconvnet", "fcn_resnet50", "deeplabv3_resnet50"}
    ours = {n for n in cnnlab.list_models(task="segmentation")
            if cnnlab.model_info(n).builder.__module__.startswith("cnnlab.")}  # not the tests' stand-ins
    assert ours <= set(SMALL) | heavy


@pytest.mark.parametrize(("name", "options"), list(_cases()))
def test_trains(name, options):
    torch.manual_seed(0)
    model = cnnlab.create_model(name, num_classes=3, in_channels=1, **options).train()
    x = torch.randn(2, 1, 64, 80)
    out = model(x)
    outs = list(out.values()) if isinstance(out, dict) else [out]
    assert all(o.shape == (2, 3, 64, 80) for o in outs)
    sum(o.logsumexp(1).mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())]
    assert not missing, missing[:5]
