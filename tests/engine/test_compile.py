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


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor needs a C++ compiler on the CPU")
def test_compiled_run_follows_the_eager_run(tmp_path):
    # ~40 s, nearly all of it inductor compiling forward and backward once (one thread)
    runs = {}
    for compiled in (False, True):
        config = tiny_config(tmp_path, name=f"compile_{compiled}", epochs=2)
        config.model.name = "simple_cnn_bn"
        config.model.options = {"drop_rate": 0.0}  # inductor draws dropout masks from its own generator
        config.model.compile = compiled
        runs[compiled] = train(config)
    eager, compiled = runs[False], runs[True]
    # the same batches and initial weights: losses agree to float32 re-association noise
    assert eager.history[1]["train_loss"] < eager.history[0]["train_loss"]  # it trains
    for a, b in zip(eager.history, compiled.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    # checkpoints hold the plain module's keys (no torch.compile `_orig_mod.` prefix), loadable anywhere
    weights = load_file(tmp_path / "compile_True" / "last.safetensors")
    assert sorted(weights) == sorted(load_file(tmp_path / "compile_False" / "last.safetensors"))
    final = load_file(tmp_path / "compile_False" / "last.safetensors")
    assert max((weights[k] - final[k]).abs().max().item() for k in final) < 1e-6  # measured 1e-8


def test_compile_mode_is_checked(tmp_path):
    with pytest.raises(CnnlabError, match="compile_mode.*reduce-overhead"):
        train(apply_overrides(tiny_config(tmp_path), ["model.compile=true", "model.compile_mode=fastest"]))


def test_fused_optimizer_only_for_cuda_parameters():
    cpu = [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    assert implementation(cpu) == {}
    model = torch.nn.Linear(3, 2)
    from cnnlab.engine.config import OptimConfig
    for name in ("sgd", "adam", "adamw"):
        opt = build_optimizer(model, OptimConfig(optimizer=name), 32)
        assert not opt.defaults.get("fused")
    if torch.cuda.is_available():  # on a GPU machine: every optimizer takes the fused path
        model = model.cuda()
        for name in ("sgd", "adam", "adamw"):
            assert build_optimizer(model, OptimConfig(optimizer=name), 32).defaults["fused"] is True
