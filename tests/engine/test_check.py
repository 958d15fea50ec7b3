"""cnnlab check on real small data: a model that learns passes all three checks; a broken setup fails check 2."""
from __future__ import annotations

import math

import pytest

from cnnlab._errors import CnnlabError
from cnnlab.engine import TrainConfig
from cnnlab.engine.check import check, check_config
from cnnlab.engine.config import apply_overrides

SMALL = ["model.name=simple_cnn_bn", "data.name=digits", 'model.options={"hidden": [32]}', "data.batch_size=64",
         "device=cpu", "threads=1"]


def _config(*extra: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), [*SMALL, *extra])


@pytest.fixture(scope="module")
def learns(tmp_path_factory):
    plot = tmp_path_factory.mktemp("check") / "lr.png"
    return check(_config(), sample_size=16, overfit_steps=150, lr_steps=60, plot_path=plot, say=lambda s: None)


def test_a_model_that_learns_passes(learns):
    initial, overfit, lr = learns.steps
    assert [s.verdict for s in learns.steps[:2]] == ["PASS", "PASS"] and lr.verdict in ("PASS", "WARN")
    # 1: ten classes, so an unsure model's cross-entropy is ln 10 = 2.3026; BN nets start within a few percent
    assert initial.numbers["expected"] == pytest.approx(math.log(10))
    assert abs(initial.numbers["loss"] - math.log(10)) < 0.1 * math.log(10)
    assert initial.numbers["after"] < initial.numbers["loss"]
    # 2: 2 x 16 images fitted: the loss at a tenth of its start or less, every image right
    assert overfit.numbers["images"] == 32 and overfit.numbers["ratio"] <= 0.1
    assert overfit.numbers["train_acc"] == 1.0 and overfit.numbers["steps"] <= 150
    # 3: an exponential sweep from 1e-6; the smoothed loss fell by >10%, the suggestion is a tenth of its minimum
    lrs = learns.lrs
    assert lrs[0] == pytest.approx(1e-6) and all(b / a == pytest.approx(lrs[1] / lrs[0]) for a, b in zip(lrs, lrs[1:]))
    low = min(range(len(learns.smoothed)), key=learns.smoothed.__getitem__)
    assert learns.suggested_lr == pytest.approx(lrs[low] / 10) and lr.numbers["drop"] > 0.02
    assert 1e-4 < learns.suggested_lr < 1.0  # SGD with momentum on a BN net: rates of 1e-3..1e-1 train it
    assert learns.plot_path.stat().st_size > 10_000
    assert not learns.failed


def test_a_far_too_small_rate_fails_the_overfit_check():
    """lr 1e-9: the model cannot move, so 2 batches are not fitted (the range test still finds a working rate)."""
    result = check(_config("optim.lr=1e-9"), sample_size=16, overfit_steps=40, lr_steps=40, say=lambda s: None)
    initial, overfit, lr = result.steps
    assert overfit.verdict == "FAIL" and overfit.numbers["ratio"] > 0.99 and overfit.numbers["lr"] == 1e-9
    assert initial.verdict == "FAIL"  # it does not fall either
    assert result.failed and result.suggested_lr is not None and result.suggested_lr > 1e-5


def test_a_loss_that_falls_slowly_is_a_warning():
    """lr 1e-3 for 5 steps: the loss falls by ~0.5% (smooth in the rate over so few steps, on any CPU): between
    rounding (0.1%) and a healthy start (1%), so check 1 warns instead of failing."""
    result = check(_config("optim.lr=0.001"), sample_size=16, fall_steps=5, overfit_steps=10, lr_steps=10,
                   say=lambda s: None)
    initial = result.steps[0]
    assert initial.verdict == "WARN" and 0.001 < initial.numbers["fell"] < 0.01, initial.line()
    assert "falls only slowly" in initial.message


def test_a_frozen_model_fails():
    frozen = _config('model.freeze=["stages", "dense", "fc"]')
    result = check(frozen, sample_size=16, overfit_steps=20, lr_steps=20, say=lambda s: None)
    assert [s.verdict for s in result.steps] == ["FAIL"] * 3
    assert "no trainable parameters" in result.steps[1].message


def test_check_config_turns_off_augmentation_and_regularisation():
    config = _config("data.flip=true", "data.mixup=0.2", "optim.weight_decay=0.01", "optim.label_smoothing=0.1")
    clean = check_config(config)
    assert (clean.data.flip, clean.data.mixup, clean.optim.weight_decay, clean.optim.label_smoothing) == (False, 0, 0, 0)
    assert clean.data.batch_size == 64 and clean.optim.schedule == "constant"
    assert config.data.flip  # the caller's config is left alone
    for kwargs, message in [({"lr_steps": 3}, "lr_steps must be a whole number >= 10"),
                            ({"lr_min": 1.0, "lr_max": 0.1}, "0 < lr_min < lr_max"),
                            ({"overfit_steps": 0}, "overfit_steps must be")]:
        with pytest.raises(CnnlabError, match=message):
            check(config, **kwargs)


@pytest.mark.parametrize(("aux", "weight"), [(False, 0.0), (True, 0.4)])
def test_a_segmenter_with_an_auxiliary_head_expects_the_loss_of_both_heads(monkeypatch, aux, weight):
    """Uniform logits give ln K per scored pixel from each head (ignored pixels count nowhere): the task's loss
    main + 0.4 x aux is then (1 + 0.4) ln K; an untrained segmenter with ``aux`` must not be called confident."""
    from cnnlab.engine.tasks.segmentation import SegmentationTask
    from tests.engine.test_segmentation_task import CLASSES, MODEL, make_bundle

    monkeypatch.setattr(SegmentationTask, "build_data", lambda self, config, device: make_bundle())
    config = apply_overrides(TrainConfig(), [f"model.name={MODEL}", "data.name=synthetic_seg", "data.batch_size=8",
                                             f'model.options={{"aux_loss": {str(aux).lower()}}}', "device=cpu",
                                             "threads=1", "optim.optimizer=adam", "optim.lr=0.01"])
    result = check(config, sample_size=8, overfit_steps=10, lr_steps=10, say=lambda s: None)
    initial = result.steps[0]
    assert initial.numbers["expected"] == pytest.approx((1 + weight) * math.log(len(CLASSES)), rel=1e-6)
    assert abs(initial.numbers["loss"] / initial.numbers["expected"] - 1) < 0.25
    assert "far from the expected value" not in initial.message


def test_the_uniform_output_keeps_the_models_output_structure():
    """Every kind of output a task reads (GoogLeNet's named tuple of aux logits, a segmenter's dict) comes back with
    the same structure, every tensor zeros (uniform predictions)."""
    import torch

    from cnnlab.engine.check import _zeros_like
    from cnnlab.models.googlenet import GoogLeNetOutputs

    out = GoogLeNetOutputs(torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5))
    zeros = _zeros_like({"out": out, "aux": [torch.ones(1, 3)], "n": 4})
    assert type(zeros["out"]) is GoogLeNetOutputs and zeros["n"] == 4 and isinstance(zeros["aux"], list)
    assert all(t.shape == (2, 5) and not t.any() for t in zeros["out"]) and not zeros["aux"][0].any()
