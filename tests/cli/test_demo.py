"""`cnnlab demo`: the recipe per fast path, and the time budget that keeps the whole command within 300 s."""
from __future__ import annotations

import sys
import time

import pytest

from cnnlab.cli import demo
from cnnlab.cli.main import main
from cnnlab.engine.recipes import demo_config

IMPORTED_AT = time.perf_counter()


class _Stop(Exception):
    pass


def _config_of_demo(monkeypatch, *, bf16: bool, args: list[str] = ()):
    """The TrainConfig `cnnlab demo` would train, without training it."""
    seen = {}

    def fake_train(config, **_kwargs):
        seen["config"] = config
        raise _Stop

    monkeypatch.setattr(demo, "cpu_has_bf16", lambda: bf16)
    monkeypatch.setattr("cnnlab.engine.train", fake_train)
    with pytest.raises(_Stop):
        main(["demo", "--device", "cpu", "--out-dir", "unused-runs", *args])
    return seen["config"]


def test_fp32_cpus_train_the_cheaper_network(monkeypatch):
    config = _config_of_demo(monkeypatch, bf16=False)
    assert (config.model.name, config.amp, config.data.name) == ("fmnist_fast", "none", "fashion_mnist")
    assert config.tta_flip and config.data.flip and config.model.channels_last
    assert config.data.crop_padding == 0  # a schedule this short underfits: no pad-crop (RESULTS.md, demo)


def test_bf16_cpus_train_more_epochs_with_pad_crop(monkeypatch):
    config = _config_of_demo(monkeypatch, bf16=True)
    assert (config.model.name, config.amp, config.epochs) == ("fmnist_fast", "bf16", 18)
    assert config.data.crop_padding == 2 and config.optim.lr == 0.3
    assert demo_config().epochs == 18  # the default is the bf16 / GPU recipe


def test_the_budget_counts_from_the_process_start(monkeypatch):
    monkeypatch.setattr(demo, "seconds_since_process_start", lambda: 42.0)
    config = _config_of_demo(monkeypatch, bf16=False)
    assert config.time_budget == pytest.approx(demo.DEMO_SECONDS - 42.0 - demo.DEMO_MARGIN_S)
    # a user's own budget (or 0 = off) wins over the guard
    assert _config_of_demo(monkeypatch, bf16=False, args=["--set", "time_budget=0"]).time_budget == 0
    assert _config_of_demo(monkeypatch, bf16=True, args=["--set", "time_budget=100"]).time_budget == 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (elsewhere it returns 0)")
def test_seconds_since_process_start_includes_the_imports():
    # this process started before this module was imported (interpreter start, pytest, torch)
    since_import = time.perf_counter() - IMPORTED_AT
    elapsed = demo.seconds_since_process_start()
    assert since_import <= elapsed + 0.02  # /proc's clock ticks are 10 ms
    # ...but not long before: pytest collects this module within minutes of starting (a wrong /proc field
    # would give the machine's uptime or a clock-tick count instead)
    assert elapsed < since_import + 600


def test_quick_demo_reports_what_the_budget_allowed(tmp_path, capsys):
    assert main(["demo", "--quick", "--out-dir", str(tmp_path), "--quiet", "--set", "epochs=2",
                 "--set", "data.train_limit=256", "--set", "plots=false", "--set", "threads=1"]) == 0
    out = capsys.readouterr().out
    assert "fmnist_net on mnist_5k: test accuracy" in out
    assert "training steps in 2 epochs (the recipe asks for at most 2)" in out  # 300 s is plenty for 8 steps
