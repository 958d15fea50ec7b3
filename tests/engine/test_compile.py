"""``model.compile=true``: torch.compile (inductor, real C++ kernels on the CPU) trains like eager mode."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from cnnlab._errors import CnnlabError
from cnnlab.engine import apply_overrides, train
from cnnlab.engine.optim import build_optimizer, implementation
from tests.engine._tiny import register_tiny, tiny_config


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


needs_cxx = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                               reason="inductor needs a C++ compiler on the CPU")
EPS32 = torch.finfo(torch.float32).eps


def _train_pair(tmp_path, tag: str, epochs: int, train_limit: int = 0) -> dict[bool, dict[str, torch.Tensor]]:
    """The same tiny run eager and compiled; their final weights."""
    out = {}
    for compiled in (False, True):
        config = tiny_config(tmp_path, name=f"{tag}_{compiled}", epochs=epochs)
        config.model.name = "simple_cnn_bn"
        config.model.options = {"drop_rate": 0.0}  # inductor draws dropout masks from its own generator
        config.model.compile = compiled
        config.data.train_limit = train_limit
        out[compiled] = (train(config), load_file(tmp_path / f"{tag}_{compiled}" / "last.safetensors"))
    return out


@needs_cxx
def test_compiled_run_follows_the_eager_run(tmp_path):
    # ~40 s, nearly all of it inductor compiling forward and backward once (one thread); the second pair of runs
    # has the same graphs and shapes (batches of 16, 30 test images) and reuses the compiled code
    #
    # First step (train_limit=16: one batch of 16, one step), tightly. Inductor and oneDNN vectorise and split
    # float32 sums differently per CPU (AVX-512 vs AVX2), so the eager and compiled gradients differ only by
    # rounding: a sum of n terms is off by about eps * sqrt(n) of its size (a random walk). A weight's gradient
    # sums over the batch and the output positions and, through the layers below, their fan-in: n <= 16 * 12 * 12
    # * fan_in. After one step that bounds the difference by 8 eps sqrt(n) times the weights' scale (measured here:
    # 1e-5 of the scale for the first conv, inside the 1e-4 bound), while a real mismatch (a dropped term, a wrong
    # BN statistic) moves weights by a fair part of the update, lr * |grad| ~ 1e-3.
    first = _train_pair(tmp_path, "step", epochs=1, train_limit=16)
    eager, compiled = first[False][1], first[True][1]
    # its loss is one forward pass at the initial weights: ~eps sqrt(fan_in <= 288) per layer, over ~5 layers
    assert first[False][0].history[0]["train_loss"] == pytest.approx(first[True][0].history[0]["train_loss"],
                                                                     rel=5 * 8 * EPS32 * 288 ** 0.5)
    for key, value in eager.items():
        if not value.is_floating_point():
            assert torch.equal(value, compiled[key]), key  # BN's step counter
            continue
        fan_in = value[0].numel() if value.dim() > 1 else 1
        tol = 8 * EPS32 * (16 * 12 * 12 * fan_in) ** 0.5 * max(value.abs().max().item(), 1e-3)
        assert (value - compiled[key]).abs().max().item() <= tol, (key, (value - compiled[key]).abs().max().item(), tol)

    # The trajectory (12 steps), loosely. The per-step rounding differences are carried along and amplified by
    # the training dynamics by a factor no cheap bound gives: measured 1e-8 (AVX-512) to 1.6e-4 absolute (AVX2).
    # So it is checked relative to each tensor's norm: 1% still tells "the same run, re-rounded" from a different
    # computation (dropout masks, BN statistics), which differs by tens of percent.
    runs = _train_pair(tmp_path, "compile", epochs=2)
    (eager_run, eager), (compiled_run, compiled) = runs[False], runs[True]
    assert eager_run.history[1]["train_loss"] < eager_run.history[0]["train_loss"]  # it trains
    for a, b in zip(eager_run.history, compiled_run.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    # checkpoints hold the plain module's keys (no torch.compile `_orig_mod.` prefix), loadable anywhere
    assert sorted(compiled) == sorted(eager)
    for key, value in eager.items():
        if value.is_floating_point():
            diff = (compiled[key].double() - value.double()).norm().item()
            assert diff <= 1e-2 * max(value.double().norm().item(), 1e-6), (key, diff)
        else:
            assert torch.equal(compiled[key], value), key


def test_compile_mode_is_checked(tmp_path):
    with pytest.raises(CnnlabError, match="compile_mode.*reduce-overhead"):
        train(apply_overrides(tiny_config(tmp_path), ["model.compile=true", "model.compile_mode=fastest"]))


def test_fused_optimizer_for_floating_parameters():
    floating = [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    assert implementation(floating) == {"fused": True}
    integer = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    assert implementation([{"params": [integer]}]) == {}
    assert implementation([]) == {}
    model = torch.nn.Linear(3, 2)
    from cnnlab.engine.config import OptimConfig
    for name in ("sgd", "adam", "adamw"):
        opt = build_optimizer(model, OptimConfig(optimizer=name), 32)
        assert opt.defaults.get("fused") is True
    if torch.cuda.is_available():  # on a GPU machine too
        model = model.cuda()
        for name in ("sgd", "adam", "adamw"):
            assert build_optimizer(model, OptimConfig(optimizer=name), 32).defaults["fused"] is True
