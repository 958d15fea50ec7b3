"""The task interface: classification unchanged, reconstruction as a second task, one rule for the reported model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.engine import TrainConfig, train
from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig
from cnnlab.engine.data_setup import build_data
from cnnlab.engine.ensemble import evaluate_ensemble, load_member
from cnnlab.engine.runs import load_run
from cnnlab.engine.tasks import ClassificationTask, StepOutput, get_task, task_names
from cnnlab.engine.tasks.reconstruction import psnr

from ._tiny import register_tiny, tiny_config


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def recon_config(tmp_path, name="ae", epochs=3, **kw) -> TrainConfig:
    return TrainConfig(model=ModelConfig(name="conv_autoencoder", options={"latent_channels": 4}),
                       data=DataConfig(name="tiny", batch_size=16), optim=OptimConfig(optimizer="adam", lr=3e-3,
                       weight_decay=0.0), epochs=epochs, out_dir=str(tmp_path), name=name, quiet=True, plots=False,
                       device="cpu", threads=1, **kw)


def test_tasks_are_registered_and_chosen_from_the_model():
    assert {"classification", "reconstruction"} <= set(task_names())
    assert get_task(tiny_config("x")).name == "classification"
    assert get_task(recon_config("x")).name == "reconstruction"


def test_a_task_that_does_not_fit_the_model_is_refused(tmp_path):
    config = tiny_config(tmp_path)
    config.task = "reconstruction"
    with pytest.raises(CnnlabError, match=r"task='reconstruction' but fmnist_net is a classification model"):
        train(config)
    config.task = "segmentaton"
    with pytest.raises(CnnlabError, match="unknown task 'segmentaton'"):
        train(config)
    config = tiny_config(tmp_path)
    config.loss = "bce"
    with pytest.raises(CnnlabError, match="loss='bce' is not a loss of the classification task"):
        train(config)
    config = recon_config(tmp_path, monitor="val_acc")
    config.data.val_fraction = 0.2
    with pytest.raises(CnnlabError, match="monitor='val_acc' is not a metric of the reconstruction task; choose "
                                          "val_loss, val_psnr"):
        train(config)
    config = recon_config(tmp_path)
    config.data.mixup = 0.2
    with pytest.raises(CnnlabError, match="mixup and data.cutmix mix class labels"):
        train(config)


def test_psnr_is_the_per_image_formula():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 8, 8, generator=g)
    recon = (target + 0.1 * torch.randn(4, 3, 8, 8, generator=g)).clamp(0, 1)
    t, r = target.double().numpy(), recon.double().numpy()
    expected = [10 * math.log10(1 / np.mean((r[i] - t[i]) ** 2)) for i in range(4)]
    assert psnr(recon, target).tolist() == pytest.approx(expected, rel=1e-5)  # float32 MSE of 192 values
    assert psnr(target, target).tolist() == [100.0] * 4  # exact: clamped, not inf


def test_reconstruction_trains_with_the_shared_engine(tmp_path):
    config = recon_config(tmp_path, epochs=4)
    config.data.val_fraction = 0.25
    config.monitor = "val_psnr"
    config.plots = True
    result = train(config)
    rows = result.history
    assert [set(r) >= {"train_loss", "train_psnr", "val_loss", "val_psnr"} for r in rows] == [True] * 4
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    assert rows[-1]["val_psnr"] > rows[0]["val_psnr"] + 3  # dB
    saved = json.loads((result.run_dir / "results.json").read_text())
    assert saved["task"] == "reconstruction" and saved["loss"] == "mse"
    assert saved["test_psnr"] == pytest.approx(result.test.metrics["psnr"]) and saved["test_psnr"] > 12
    assert saved["test_metrics"] == {"loss": pytest.approx(result.test.loss), "psnr": pytest.approx(saved["test_psnr"])}
    header = (result.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_psnr", "val_psnr"} <= set(header)
    assert (result.run_dir / "reconstructions.png").stat().st_size > 1000
    page = (result.run_dir / "report.html").read_text()
    assert "<h2" in page and "Reconstructions" in page and "PSNR" in page  # the task's section of report.html
    assert page.count("data:image/png;base64,") >= 2  # the curves and the reconstruction grid, embedded
    assert saved["reported_checkpoint"] == "best"
    # the run folder is read back for its task: the same model, the same test PSNR
    run = load_run(result.run_dir)
    assert run.task == "reconstruction" and run.tag == "best"
    data = build_data(config.data, torch.device("cpu"), seed=config.seed)
    again = get_task("reconstruction").evaluate(run.model, data.test, data)
    assert again.metrics["psnr"] == pytest.approx(saved["test_psnr"], rel=1e-5)


def test_reconstruction_with_bce_and_the_target_is_the_unnormalised_image(tmp_path):
    config = recon_config(tmp_path, epochs=1)
    config.loss = "bce"
    data = build_data(config.data, torch.device("cpu"))
    task = get_task(config)
    task.prepare(data)
    x, _ = next(iter(data.train))
    out = task.step(nn.Identity(), (x, None), config)  # an "autoencoder" that returns its (normalised) input
    target = out.target
    raw = x * torch.tensor(data.preprocess.std).view(1, -1, 1, 1) + torch.tensor(data.preprocess.mean).view(1, -1, 1, 1)
    assert torch.allclose(target, raw.clamp(0, 1), atol=1e-6) and target.min() >= 0 and target.max() <= 1
    result = train(config)
    assert json.loads((result.run_dir / "results.json").read_text())["loss"] == "bce"


def test_auxiliary_heads_add_their_loss_at_weight_0_3():
    class WithAux(nn.Module):
        def forward(self, x):
            return x[:, :3], x[:, 3:6], x[:, 6:9]  # (logits, aux1, aux2) as GoogLeNet returns in training

    config = tiny_config("unused")
    config.optim.label_smoothing = 0.0
    x, y = torch.randn(5, 9), torch.tensor([0, 1, 2, 1, 0])
    out = ClassificationTask().step(WithAux(), (x, y), config)
    expected = F.cross_entropy(x[:, :3], y) + 0.3 * (F.cross_entropy(x[:, 3:6], y) + F.cross_entropy(x[:, 6:9], y))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(out.output, x[:, :3])


def test_googlenet_with_aux_logits_trains(tmp_path, monkeypatch):
    from cnnlab.engine.tasks import classification

    seen = []
    real = classification.split_aux
    monkeypatch.setattr(classification, "split_aux", lambda output: seen.append(type(output).__name__) or real(output))
    config = tiny_config(tmp_path, epochs=1)
    config.model = ModelConfig(name="googlenet", options={"aux_logits": True, "init": "kaiming"})
    config.data.image_size = 64  # GoogLeNet's aux heads need 14x14 maps after 4a
    config.data.train_limit = 32
    result = train(config)
    assert "GoogLeNetOutputs" in seen and math.isfinite(result.history[0]["train_loss"])


def test_train_does_not_change_the_config_it_is_given(tmp_path, monkeypatch):
    import datetime as dt

    from cnnlab.engine import trainer

    class Frozen(dt.datetime):  # both runs start "in the same second"
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(trainer, "datetime", Frozen)
    config = tiny_config(tmp_path, epochs=1)
    config.name, config.quiet = "", False
    before = config.to_dict()
    first, second = train(config), train(config)  # one config reused in a loop
    assert config.to_dict() == before
    assert first.run_dir.name == "fmnist_net-tiny-20260102-030405"
    assert second.run_dir.name == "fmnist_net-tiny-20260102-030405-2"


def test_one_rule_for_the_reported_model(tmp_path):
    # no validation split: the run stands for `last` (with EMA: its EMA weights); `best` is not written
    config = tiny_config(tmp_path, name="ema", epochs=2, ema_decay=0.5)
    result = train(config)
    assert not (result.run_dir / "best.json").exists()
    saved = json.loads((result.run_dir / "results.json").read_text())
    assert saved["reported_checkpoint"] == "last"
    run = load_run(result.run_dir)
    assert run.tag == "last+ema"
    data = build_data(config.data, torch.device("cpu"), seed=config.seed, channels_last=True)
    acc = get_task(config).evaluate(run.model, data.test, data).accuracy
    assert acc == saved["test_accuracy"]  # `cnnlab eval` reproduces results.json
    # with a split, the chosen `best`
    config = tiny_config(tmp_path, name="val", epochs=2)
    config.data.val_fraction = 0.25
    result = train(config)
    assert load_run(result.run_dir).tag == "best"
    assert json.loads((result.run_dir / "results.json").read_text())["reported_checkpoint"] == "best"


def test_ema_runs_can_be_ensembled(tmp_path):
    runs = [train(tiny_config(tmp_path, name=f"m{i}", epochs=1, ema_decay=0.5)).run_dir for i in range(2)]
    assert [load_member(r).checkpoint for r in runs] == ["last+ema", "last+ema"]
    result = evaluate_ensemble(runs)
    reported = [json.loads((r / "results.json").read_text())["test_accuracy"] for r in runs]
    assert result.member_accuracy == pytest.approx(reported)  # each member is the model its run reported


def test_weights_that_a_last_step_made_nan_stop_the_run(tmp_path, monkeypatch):
    from cnnlab.engine import trainer

    config = tiny_config(tmp_path, epochs=1)
    real_step = torch.optim.SGD.step
    steps = {"n": 0, "per_epoch": 96 // 16}

    def step(self, closure=None):
        out = real_step(self, closure)
        steps["n"] += 1
        if steps["n"] == steps["per_epoch"]:  # the epoch's last step: no later loss would show it
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(trainer.TrainingDiverged, match="the weights became non-finite during epoch 1"):
        train(config)
    assert not (tmp_path / "run").exists()  # nothing was saved: no folder holding only config.json


def test_results_json_is_valid_json_when_the_test_loss_is_not_finite(tmp_path, monkeypatch):
    from cnnlab.engine.tasks.classification import ClassificationTask

    real = ClassificationTask.evaluate

    def infinite_loss(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        result.loss = float("inf")  # a test loss can overflow where the training loss did not
        return result

    monkeypatch.setattr(ClassificationTask, "evaluate", infinite_loss)
    result = train(tiny_config(tmp_path, epochs=1))
    saved = json.loads((result.run_dir / "results.json").read_text())  # json.loads accepts "Infinity": parse strictly
    json.loads((result.run_dir / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert saved["test_loss"] is None and saved["test_metrics"]["loss"] is None


def test_the_task_meter_matches_a_direct_computation():
    task = ClassificationTask()
    meter = task.meter(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    meter.update(StepOutput(torch.tensor(0.6), logits, y, 3))
    meter.update(StepOutput(torch.tensor(0.3), logits[:1], y[:1], 1))
    assert meter.compute() == {"loss": pytest.approx((0.6 * 3 + 0.3) / 4), "acc": 0.75}


def test_search_and_bagging_folders_stay_inside_out_dir(tmp_path):
    from cnnlab.engine.ensemble import train_bagged
    from cnnlab.engine.search import parse_space, search

    config = tiny_config(tmp_path / "out", name="../escaped", epochs=1)
    with pytest.raises(CnnlabError, match="must be one folder name"):
        train_bagged(config, 2)
    with pytest.raises(CnnlabError, match="must be one folder name"):
        search(tiny_config(tmp_path / "out", epochs=1), parse_space(["optim.lr=0.01,0.1"]), name="../escaped")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()
