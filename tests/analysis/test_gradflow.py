"""``gradient_flow``: gradient norms against autograd, dead ReLUs on constructed cases, the demos."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab import CnnlabError
from cnnlab.analysis import gradient_flow
from cnnlab.analysis.demos import deep_cnn, deep_mlp


def test_norms_match_autograd() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    flow = gradient_flow(model, (x, y))
    nn.functional.cross_entropy(model(x), y).backward()
    for layer, module in zip(flow.layers, (model[0], model[2])):
        expected = torch.cat([module.weight.grad.flatten(), module.bias.grad.flatten()]).norm()
        assert layer.grad_norm == pytest.approx(float(expected), rel=1e-6)
    assert [layer.name for layer in flow.layers] == ["0", "2"]


@pytest.mark.parametrize("bias,dead", [(-100.0, 1.0), (100.0, 0.0)])
def test_dead_relu_fraction(bias: float, dead: float) -> None:
    linear = nn.Linear(4, 8)
    nn.init.constant_(linear.bias, bias)
    flow = gradient_flow(nn.Sequential(linear, nn.ReLU(), nn.Linear(8, 2)), torch.randn(5, 4))
    assert flow.dead_relu == {"1": dead}


def test_half_dead_by_construction() -> None:
    linear = nn.Linear(1, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0], [0.0]]))
        linear.bias.copy_(torch.tensor([10.0, -1.0]))  # unit 1 is always off; unit 0 on for x > -10
    flow = gradient_flow(nn.Sequential(linear, nn.ReLU(), nn.Linear(2, 2)), torch.randn(7, 1))
    assert flow.dead_relu["1"] == 0.5


def test_sigmoid_vanishes_relu_does_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 32)
    sigmoid = gradient_flow(deep_mlp(20, act_layer=nn.Sigmoid, init="xavier"), x).first_last_ratio()
    torch.manual_seed(0)
    relu = gradient_flow(deep_mlp(20, act_layer=nn.ReLU, init="he"), x).first_last_ratio()
    # sigmoid' <= 1/4, so 20 layers shrink the gradient by orders of magnitude; ReLU with He init does not
    assert sigmoid < 1e-6 < 1e-2 < relu


def test_plain_vanishes_residual_does_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    plain = gradient_flow(deep_cnn(20, residual=False).eval(), x).first_last_ratio()
    torch.manual_seed(0)
    residual = gradient_flow(deep_cnn(20, residual=True).eval(), x).first_last_ratio()
    assert plain < 1e-6 < 1e-2 < residual


def test_plot_and_table(tmp_path) -> None:
    flow = gradient_flow(deep_mlp(4), torch.randn(3, 32))
    path = flow.plot(tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dead ReLU" in flow.table() and "first/last" in flow.table()


def test_bad_batch() -> None:
    with pytest.raises(CnnlabError):
        gradient_flow(nn.Linear(2, 2), [[1.0, 2.0]])  # type: ignore[arg-type]
