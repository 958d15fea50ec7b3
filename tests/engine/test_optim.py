"""Schedules, the linear scaling rule, parameter groups (no decay on norms, lr multipliers) and freezing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.engine.config import OptimConfig
from cnnlab.engine.optim import build_optimizer, freeze, lr_factor, match_state_layout, penalty, scaled_lr


def test_onecycle_rises_to_peak_then_decays():
    c = OptimConfig(schedule="onecycle", onecycle_pct=0.25)
    f = [lr_factor(c, s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(1 / 25) and max(f) == pytest.approx(1.0) and f.index(max(f)) == 25
    assert f[-1] < 1e-3 and all(a >= b for a, b in zip(f[25:], f[26:]))


def test_warmup_step_and_cosine():
    c = OptimConfig(schedule="step", warmup_epochs=1, step_epochs=2, gamma=0.1)
    assert [lr_factor(c, s, 4, 40) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(c, 4 * 2, 4, 40) == pytest.approx(0.1) and lr_factor(c, 4 * 4, 4, 40) == pytest.approx(0.01)
    c = OptimConfig(schedule="cosine")
    assert lr_factor(c, 0, 10, 100) == 1.0 and lr_factor(c, 50, 10, 100) == pytest.approx(0.5)


def test_linear_scaling_rule():
    assert scaled_lr(OptimConfig(lr=0.1, base_batch_size=256), 1024) == pytest.approx(0.4)
    assert scaled_lr(OptimConfig(lr=0.1), 1024) == 0.1


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_groups_no_decay_on_1d_and_lr_multipliers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=1e-3), 64, {"2": 10.0})
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model[2].weight)]["lr"] == pytest.approx(1.0) and by_id[id(model[0].weight)]["lr"] == pytest.approx(0.1)
    assert by_id[id(model[1].weight)]["weight_decay"] == 0 and by_id[id(model[0].weight)]["weight_decay"] == 1e-3
    with pytest.raises(CnnlabError, match="no parameters under '3'"):
        build_optimizer(model, OptimConfig(), 64, {"3": 2.0})


def test_freeze_by_prefix():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, 2))
    assert freeze(model, ["0"]) == 2
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad
    opt = build_optimizer(model, OptimConfig(optimizer="adamw"), 8)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    with pytest.raises(CnnlabError, match="no parameters under 'stem'"):
        freeze(model, ["stem"])
    freeze(model, ["1"])
    with pytest.raises(CnnlabError, match="every parameter is frozen"):
        build_optimizer(model, OptimConfig(), 8)


def test_l1_l2_penalties_skip_biases():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(5.0)
    assert penalty(model, 0.1, 0.0).item() == pytest.approx(0.3)
    assert penalty(model, 0.0, 0.1).item() == pytest.approx(0.5)
    assert penalty(model, 0.0, 0.0) is None


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_fused_update_equals_the_default_one(name, monkeypatch):
    from cnnlab.engine import optim

    torch.manual_seed(0)
    # no conv bias before the norm: its gradient would be rounding noise alone, which Adam scales up to lr-sized
    # steps whose sign the order of the arithmetic decides
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    twin = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    twin.load_state_dict(model.state_dict())
    start = model[0].weight.detach().clone()
    config = OptimConfig(optimizer=name, lr=0.01, weight_decay=0.05)
    fused = build_optimizer(model, config, batch_size=4)
    monkeypatch.setattr(optim, "implementation", lambda groups: {})
    plain = build_optimizer(twin, config, batch_size=4)
    assert not plain.defaults["fused"]
    assert fused.defaults["fused"] is True
    x = torch.randn(4, 3, 8, 8)
    for _ in range(20):
        for net, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    # the same arithmetic in another order: each of the 20 updates may round differently by a few units in the
    # last place of fp32 (2**-23 relative), so the weights may differ by about 20 * 4 * 2**-23 of their scale
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=80 * 2 ** -23 * float(b.detach().abs().max())), n
    assert (model[0].weight - start).abs().max() > 1e-3  # and both did train


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_loaded_contiguous_gets_the_channels_last_strides_back(name):
    # a checkpoint stores the moment buffers contiguous; the fused kernels index parameter, gradient and state
    # alike, so without the strides restored the resumed update lands on the wrong elements
    torch.manual_seed(0)
    model = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    twin = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    config = OptimConfig(optimizer=name, lr=0.1)
    opts = [build_optimizer(m, config, batch_size=2) for m in (model, twin)]
    assert opts[0].defaults["fused"] is True

    def step(net, opt):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    twin.load_state_dict(model.state_dict())
    step(model, opts[0])
    step(twin, opts[1])
    saved = opts[1].state_dict()  # as a checkpoint loads it back: every tensor contiguous
    saved["state"] = {i: {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                      for i, st in saved["state"].items()}
    opts[1].load_state_dict(saved)
    buffer = "momentum_buffer" if name == "sgd" else "exp_avg"
    assert opts[1].state[twin.weight][buffer].stride() != twin.weight.stride()
    match_state_layout(opts[1])
    assert all(v.stride() == p.stride() for p, st in opts[1].state.items() for v in st.values() if v.shape == p.shape)
    for _ in range(3):
        step(model, opts[0])
        step(twin, opts[1])
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)
