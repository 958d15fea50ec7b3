"""Binary-weight networks and XNOR-Net (cnnlab.compress.binary): forward by hand, STE, layers kept, storage."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.compress.binary import BinaryConfig, BinaryConv2d, BinaryLinear, binarize, binary_storage_bytes, sign_ste
from tests.engine._tiny import register_tiny, tiny_config


def _hand_conv(x, w, stride=1, padding=0):
    """Direct convolution by loops over the output (no conv op), x (N, C, H, W), w (O, C, kh, kw)."""
    x = F.pad(x, (padding,) * 4)
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = torch.zeros(n, o, ho, wo)
    for i in range(ho):
        for j in range(wo):
            patch = x[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]  # (N, C, kh, kw)
            out[:, :, i, j] = (patch[:, None] * w[None]).sum(dim=(2, 3, 4))
    return out


def _conv(mode, **kw):
    torch.manual_seed(0)
    return BinaryConv2d(3, 4, 3, stride=2, padding=1, bias=True, config=BinaryConfig(mode=mode, **kw))


def test_bwn_conv_is_sign_w_times_channel_mean_abs_by_hand():
    layer = _conv("bwn")
    x = torch.randn(2, 3, 7, 7)
    w = layer.weight.detach()
    alpha = torch.tensor([w[c].abs().sum().item() / w[c].numel() for c in range(4)])  # mean |W| per filter
    signs = torch.where(w >= 0, 1.0, -1.0)
    expected = _hand_conv(x, signs * alpha.view(4, 1, 1, 1), stride=2, padding=1) + layer.bias.detach().view(1, 4, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight.detach(), w)  # the real weights are kept


def test_xnor_conv_uses_the_papers_k_map_by_hand():
    layer = _conv("xnor", input_norm=False)
    x = torch.randn(2, 3, 7, 7)
    w = layer.weight.detach()
    alpha = w.abs().mean(dim=(1, 2, 3)).view(4, 1, 1, 1)
    a = x.abs().mean(dim=1, keepdim=True)  # A: mean over channels of |I|
    k = _hand_conv(a, torch.full((1, 1, 3, 3), 1 / 9), stride=2, padding=1)  # K = A * k, k the 3x3 box of 1/9
    core = _hand_conv(torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0), stride=2, padding=1)
    expected = core * k * alpha.view(1, 4, 1, 1) + layer.bias.detach().view(1, 4, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_xnor_input_norm_feeds_both_the_sign_and_k():
    # the paper's block BN -> sign -> conv: K and sign(I) are both taken from the normalised input I
    layer = _conv("xnor", input_norm=True).eval()
    layer.input_norm.running_mean.copy_(torch.tensor([0.5, -0.2, 0.1]))
    layer.input_norm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(2, 3, 7, 7)
    xn = (x - layer.input_norm.running_mean.view(1, 3, 1, 1)) / torch.sqrt(
        layer.input_norm.running_var.view(1, 3, 1, 1) + layer.input_norm.eps)
    w = layer.weight.detach()
    k = _hand_conv(xn.abs().mean(dim=1, keepdim=True), torch.full((1, 1, 3, 3), 1 / 9), stride=2, padding=1)
    core = _hand_conv(torch.where(xn >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0), stride=2, padding=1)
    expected = core * k * w.abs().mean(dim=(1, 2, 3)).view(1, 4, 1, 1) + layer.bias.detach().view(1, 4, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_xnor_mean_scale_and_linear():
    layer = _conv("xnor", input_norm=False, input_scale="mean")
    x = torch.randn(2, 3, 7, 7)
    w = layer.weight.detach()
    wb = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=(1, 2, 3)).view(4, 1, 1, 1)
    expected = _hand_conv(torch.where(x >= 0, 1.0, -1.0), wb, 2, 1) * x.abs().mean(dim=(1, 2, 3)).view(2, 1, 1, 1)
    torch.testing.assert_close(layer(x), expected + layer.bias.detach().view(1, 4, 1, 1), rtol=1e-5, atol=1e-5)
    lin = BinaryLinear(5, 3, config=BinaryConfig(mode="xnor", input_norm=False))
    v = torch.randn(4, 5)
    wl = lin.weight.detach()
    expected = (torch.where(v >= 0, 1.0, -1.0) @ (torch.where(wl >= 0, 1.0, -1.0) * wl.abs().mean(1, keepdim=True)).T
                * v.abs().mean(1, keepdim=True) + lin.bias.detach())
    torch.testing.assert_close(lin(v), expected, rtol=1e-5, atol=1e-5)


def test_ste_gradient_is_zero_where_abs_x_exceeds_one():
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


def test_xnor_input_gradient_through_the_ste():
    # with no input scale and no input norm, d out / d x = STE mask times the binary weights' back-projection
    lin = BinaryLinear(3, 1, bias=False, config=BinaryConfig(mode="xnor", input_scale="none",
                                                                 input_norm=False))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0, 1.5]]))  # alpha = 1, signs +, -, +
    x = torch.tensor([[0.2, 3.0, -0.7]], requires_grad=True)
    lin(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 1.0]]


def test_binarize_keeps_first_and_last_layers_real_and_copies():
    model = cnnlab.create_model("fmnist_net")
    for mode in ("bwn", "xnor"):
        binary = binarize(model, mode=mode)
        kinds = {n: type(m) for n, m in binary.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        assert kinds["stages.0.0.conv"] is nn.Conv2d and kinds["fc"] is nn.Linear
        assert [n for n, t in kinds.items() if t in (BinaryConv2d, BinaryLinear)] == [
            "stages.1.0.conv", "stages.1.1.conv", "stages.2.0.conv"]
        assert torch.equal(binary.get_submodule("stages.1.0.conv").weight, model.get_submodule("stages.1.0.conv").weight)
        assert binary(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert not any(isinstance(m, BinaryConv2d) for m in model.modules())  # the original is untouched
    everything = binarize(model, keep_first_last=False)
    assert isinstance(everything.fc, BinaryLinear) and isinstance(everything.get_submodule("stages.0.0.conv"), BinaryConv2d)


def test_bad_input_is_refused():
    model = cnnlab.create_model("fmnist_net")
    with pytest.raises(CnnlabError, match="mode 'ternary' is unknown"):
        binarize(model, mode="ternary")
    with pytest.raises(CnnlabError, match="'fcc' is not a Conv2d/Linear layer.*did you mean fc"):
        binarize(model, keep=("fcc",))
    with pytest.raises(CnnlabError, match="no Conv2d/Linear layer left"):
        binarize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)))


def test_storage_ratio_arithmetic():
    model = binarize(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3, bias=False), nn.Flatten(),
                                   nn.Linear(16, 10)))
    storage = binary_storage_bytes(model)
    n = 16 * 8 * 9  # the one binary layer
    assert storage.layers == {"1": (n, 16)}
    assert storage.binary_bits == n + 32 * 16 and storage.fp32_bits == 32 * n
    assert storage.ratio == pytest.approx(32 * 1152 / (1152 + 512))
    other = 32 * (8 * 9 + 8 + 16 * 10 + 10)
    assert storage.other_bits == other
    assert storage.total_ratio == pytest.approx((32 * n + other) / (n + 32 * 16 + other))
    assert storage.binary_bytes == n // 8 + 4 * 16


@pytest.mark.parametrize("mode", ["bwn", "xnor"])
def test_a_binarized_model_learns_on_tiny_data(tmp_path, monkeypatch, mode):
    register_tiny(monkeypatch)
    torch.manual_seed(0)
    model = binarize(cnnlab.create_model("fmnist_net", num_classes=3), mode=mode)
    result = cnnlab.engine.train(tiny_config(tmp_path, epochs=4), model=model)
    assert result.test.accuracy >= 0.8  # chance is 1/3
    assert isinstance(result.model.get_submodule("stages.1.0.conv"), BinaryConv2d)
