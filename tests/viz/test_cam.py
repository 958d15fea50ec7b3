"""Grad-CAM and saliency: exact against hand computations on toy nets, and localisation on a trained tiny model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.viz import explain, gradcam, plot_explanation, resolve_target, saliency
from tests.viz._squares import CLASSES, SIZE, make_squares, on_square, square_offset


def _toy_cam_net() -> nn.Sequential:
    """The CAM architecture (Zhou et al. 2016): conv -> ReLU -> global average pool -> linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_gradcam_equals_cam_on_a_global_pooled_head():
    # Selvaraju et al. sec. 3.1: with a GAP head, alpha_k = w_k^c / (h w), so Grad-CAM = ReLU(CAM) / (h w)
    net = _toy_cam_net()
    x = torch.rand(3, 6, 6)
    for c in range(3):
        result = gradcam(net, x, target=c, layer="1")
        activation = F.relu(net[0](x[None]))[0].detach()  # (4, 6, 6)
        cam = F.relu((net[4].weight[c].detach()[:, None, None] * activation).sum(0)) / 36
        assert result.target == c and result.layer == "1"
        assert torch.allclose(result.raw, cam, atol=1e-6)


def test_gradcam_matches_a_hand_implementation_on_a_two_layer_net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(5 * 5 * 5, 3)).eval()  # a dense head: alpha_k is not a weight of the net
    x = torch.rand(2, 10, 10)
    nonzero = 0
    for c in range(3):
        result = gradcam(net, x, target=c, layer="3")
        # by hand, with functional ops and autograd w.r.t. the conv2 activation itself (no hooks)
        a = F.relu(net[2](F.relu(net[0](x[None]))))  # (1, 5, 5, 5)
        logits = F.linear(a.flatten(1), net[5].weight, net[5].bias)
        (grad,) = torch.autograd.grad(logits[0, c], a)
        alpha = grad[0].mean((1, 2))
        cam = F.relu((alpha[:, None, None] * a[0].detach()).sum(0))
        assert result.target == c and torch.allclose(result.raw, cam, atol=1e-6)
        up = F.interpolate(cam[None, None], size=(10, 10), mode="bilinear", align_corners=False)[0, 0]
        expected = up / up.max() if up.max() > 0 else up
        assert result.heatmap.shape == (10, 10) and torch.allclose(result.heatmap, expected, atol=1e-6)
        assert torch.allclose(result.probs, logits[0].detach().softmax(0))
        nonzero += bool(cam.max() > 0)
    assert nonzero >= 1  # the comparison is not vacuous (all-zero maps)
    assert gradcam(net, x, layer="3").target == int(logits.argmax())  # default: the predicted class


def test_gradcam_reads_the_layer_output_before_later_in_place_ops():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    net[1].running_mean.normal_()
    net.eval()
    x = torch.rand(3, 5, 5)
    result = gradcam(net, x, target=1, layer="1")  # the BN output, which ReLU(inplace) overwrites next
    a = net[1](net[0](x[None])).detach().requires_grad_(True)
    score = net[5](F.relu(a).mean((2, 3)))[0, 1]
    (grad,) = torch.autograd.grad(score, a)
    cam = F.relu((grad[0].mean((1, 2))[:, None, None] * a[0].detach()).sum(0))
    assert (a < 0).any()  # the in-place ReLU would have changed these values
    assert torch.allclose(result.raw, cam, atol=1e-6)


def test_saliency_of_a_linear_model_is_its_weight_magnitude():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    result = saliency(net, torch.rand(3, 6, 6), target=2)
    expected = net[1].weight[2].detach().view(3, 6, 6).abs().amax(0)  # d score / dx = w_c exactly
    assert torch.allclose(result.raw, expected) and torch.allclose(result.heatmap, expected / expected.max())


class _WithUnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 1), nn.Linear(2, 2)
        self.aux = nn.Conv2d(2, 2, 1)  # registered but never called, like GoogLeNet's auxiliary heads in eval mode

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_bad_layer_target_and_channels_are_clear_errors():
    model = create_model("resnet18", num_classes=3).train()
    x = torch.rand(3, 32, 32)
    with pytest.raises(CnnlabError, match="unknown layer 'layer5'.*did you mean.*layer[1-4]"):
        gradcam(model, x, layer="layer5")
    with pytest.raises(CnnlabError, match="expects images with 3 channels, the image has 1"):
        gradcam(model, torch.rand(1, 32, 32))
    with pytest.raises(CnnlabError, match="out of range.*0..2"):
        saliency(model, x, target=3)
    with pytest.raises(CnnlabError, match="unknown class 'centr'; did you mean centre"):
        resolve_target("centr", ["tl", "centre", "br"], 3)
    assert resolve_target("br", ["tl", "centre", "br"], 3) == 2 and resolve_target("1", None, 3) == 1
    with pytest.raises(CnnlabError, match="unknown method"):
        explain(model, x, method="cam")
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(3, 2, 1), shared, nn.Conv2d(2, 2, 1), shared, nn.Flatten(), nn.Linear(2 * 32 * 32, 2))
    with pytest.raises(CnnlabError, match="ran 2 times"):
        gradcam(twice, x, layer="1")
    with pytest.raises(CnnlabError, match="layer 'aux' did not run"):
        gradcam(_WithUnusedBranch(), x, layer="aux")
    model.requires_grad_(False)  # frozen weights: the gradient w.r.t. the activation still exists
    assert gradcam(model, x).raw.shape == (1, 1)  # the default layer is the last stage (32 / 32)
    assert model.training  # the model's mode is restored afterwards


# -- the oracle: a model trained to tell where a bright square is must look at the square (tests/viz/_squares.py) ---------
@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_trained_model_looks_at_the_square(squares_run, method):
    run, preprocess, accuracy = squares_run
    assert accuracy >= 0.9  # the task is learned (chance: 1/4)
    data = make_squares()
    hits, counts = torch.zeros(3), torch.zeros(3)
    for image, label in zip(data.test_images, data.test_labels.tolist()):
        if label < 3:  # 'none' has no square to find
            hits[label] += on_square(explain(run.model, image, method, preprocess=preprocess), label)
            counts[label] += 1
    assert (hits / counts >= 0.8).all(), f"{method}: share of peaks on the square per class {hits / counts}"


def _two_square_rate(model, method, preprocess) -> float:
    """Images holding two squares: the map for each class present must peak on that class's square."""
    g = torch.Generator().manual_seed(5)
    hits = n = 0
    for a, b in [(0, 1), (0, 2), (1, 2)] * 4:
        image = torch.randint(0, 60, (1, SIZE, SIZE), generator=g, dtype=torch.uint8)
        for c in (a, b):
            image[0, square_offset(c):square_offset(c) + 4, square_offset(c):square_offset(c) + 4] = 250
        for c in (a, b):
            hits += on_square(explain(model, image, method, target=c, preprocess=preprocess), c)
            n += 1
    return hits / n


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_maps_are_class_discriminative_and_an_untrained_net_is_not(squares_run, method):
    run, preprocess, _ = squares_run
    assert _two_square_rate(run.model, method, preprocess) >= 0.75  # measured: 0.83-1.0 over three seeds
    torch.manual_seed(0)
    untrained = create_model("fmnist_net", num_classes=4, head_size=1).eval()
    assert _two_square_rate(untrained, method, preprocess) <= 0.5  # measured: 0.25-0.33 (chance of a bright blob: 0.5)


def test_overlay_figure(squares_run, tmp_path):
    run, preprocess, _ = squares_run
    image = make_squares().test_images[2]
    result = gradcam(run.model, image, preprocess=preprocess)
    assert result.target == 2 and result.layer == run.model.feature_info[-1].module
    path = plot_explanation(tmp_path / "cam.png", image, result, CLASSES, "squares")
    assert path.read_bytes()[:4] == b"\x89PNG"
