"""The training loop on a tiny synthetic dataset: learning, run folder, exact resume, faults."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from cnnlab._errors import CnnlabError
from cnnlab.engine import load_checkpoint, train
from cnnlab.engine.trainer import TrainingDiverged
from tests.engine._tiny import register_tiny, tiny_config


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def test_run_learns_and_fills_the_run_folder(tmp_path):
    config = tiny_config(tmp_path, epochs=3, label_smoothing=0.1, ema_decay=0.9)
    config.plots = True
    config.data.val_fraction = 0.25
    config.monitor = "val_acc"
    result = train(config)
    run = tmp_path / "run"
    assert result.test.accuracy > 0.6 and result.test.count == 30  # chance is 1/3
    for name in ("config.json", "metrics.csv", "results.json", "best.safetensors", "last.safetensors", "last.json",
                 "last.state.safetensors", "curves.png", "confusion_matrix.png", "report.html"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and all(r["val_acc"] for r in rows)
    assert json.loads((run / "config.json").read_text())["optim"]["ema_decay"] == 0.9
    assert int(result.test.confusion.sum()) == 30
    with pytest.raises(CnnlabError, match="already holds a run"):
        train(config)


@pytest.mark.parametrize("aug", ["data.mixup=0.2", "data.cutmix=1.0"])
def test_label_mixing_trains(tmp_path, aug):
    from cnnlab.engine import apply_overrides

    config = apply_overrides(tiny_config(tmp_path, epochs=3), [aug, "data.cutout=4", "data.rotate=10", "optim.l2=1e-4"])
    result = train(config)
    # it learns through the mixed labels: chance is 1/3, and 18 of 30 right by luck has p < 1e-3
    # (measured here: mixup 1.0, cutmix 0.67; the training loss falls from ~9 to ~1)
    assert result.test.count == 30 and result.test.accuracy >= 0.6
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]


def test_early_stopping_on_a_flat_validation_metric(tmp_path):
    config = tiny_config(tmp_path, epochs=6)
    config.model.name = "simple_cnn"  # no batch norm: with a negligible lr nothing changes, val_acc stays flat
    config.optim.lr = 1e-30
    config.data.val_fraction = 0.25
    config.monitor, config.patience = "val_acc", 1
    result = train(config)
    assert result.stopped_early and len(result.history) == 2 and result.best_epoch == 1


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    class Interrupted(Exception):
        pass

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Interrupted

    train(tiny_config(tmp_path, "straight", epochs=4, ema_decay=0.9))
    with pytest.raises(Interrupted):  # the same 4-epoch run, interrupted after its second checkpoint
        train(tiny_config(tmp_path, "split", epochs=4, ema_decay=0.9), callbacks=[stop_after_two])
    resumed = train(tiny_config(tmp_path, "split", epochs=4, ema_decay=0.9), resume=True)
    assert len(resumed.history) == 4
    for name in ("last.safetensors", "last.state.safetensors"):  # weights; optimizer state and EMA weights
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bitwise on the CPU
    assert any(k.startswith("ema.") for k in b)
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]


def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_overwritten(tmp_path):
    train(tiny_config(tmp_path, epochs=1))
    weights = tmp_path / "run" / "last.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(CnnlabError, match="last.safetensors is corrupt or truncated"):
        train(tiny_config(tmp_path, epochs=2), resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_torn_checkpoint_set_is_detected(tmp_path):
    train(tiny_config(tmp_path, epochs=1))
    meta = json.loads((tmp_path / "run" / "last.json").read_text())
    meta["token"] = "0" * 32
    (tmp_path / "run" / "last.json").write_text(json.dumps(meta))
    with pytest.raises(CnnlabError, match="inconsistent"):
        load_checkpoint(tmp_path / "run")


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    # epoch 1 at a sane lr, then x1e30 (step schedule): the loss blows up in epoch 2
    config = tiny_config(tmp_path, epochs=3, schedule="step", step_epochs=1, gamma=1e30, weight_decay=0.0)
    with pytest.raises(TrainingDiverged, match="training stopped.*last good checkpoint"):
        train(config)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["epoch"] == 1 and all(torch.isfinite(v.float()).all() for v in ckpt.weights.values())


def test_input_the_model_cannot_take(tmp_path):
    config = tiny_config(tmp_path)
    config.model.name = "lenet5"  # needs 32x32 input, tiny is 12x12
    with pytest.raises(CnnlabError, match=r"shape \(1, 12, 12\).*lenet5 cannot take"):
        train(config)


def test_transfer_learning_from_a_weights_file(tmp_path):
    first = train(tiny_config(tmp_path, "first", epochs=1))
    config = tiny_config(tmp_path, "second", epochs=1)
    config.model.weights = str(first.run_dir / "last.safetensors")
    config.model.freeze = ["stages.0"]
    config.model.lr_mult = {"fc": 10.0}
    second = train(config)
    w1, w2 = load_file(first.run_dir / "last.safetensors"), load_file(second.run_dir / "last.safetensors")
    assert torch.equal(w1["stages.0.0.conv.weight"], w2["stages.0.0.conv.weight"])  # frozen
    assert not torch.equal(w1["fc.weight"], w2["fc.weight"])


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.engine._tiny import make_tiny, tiny_config
    from cnnlab.data import datasets as D
    from cnnlab.engine import train
    import pathlib
    D.DATASETS["tiny"] = lambda root=None, download=False: make_tiny(n_train=960)
    config = tiny_config(pathlib.Path({out!r}), epochs={epochs})
    config.data.batch_size = 16
    if {pause_at_step}:  # announce the step, then wait to be killed there: mid-epoch by construction, not by timing
        import time
        from torch.optim.optimizer import register_optimizer_step_post_hook
        steps = []

        def pause(optimizer, args, kwargs):
            steps.append(1)
            if len(steps) == {pause_at_step}:
                pathlib.Path({out!r}, "paused").write_text(str(len(steps)))
                time.sleep(600)

        register_optimizer_step_post_hook(pause)
    train(config, resume={resume})
""")


def test_sigkill_mid_epoch_then_resume_loses_at_most_that_epoch(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # an epoch is 960 / 16 = 60 steps: step 90 is the middle of epoch 2, after epoch 1's checkpoint
    script = KILL_SCRIPT.format(root=root, out=str(tmp_path), epochs=3, resume=False, pause_at_step=90)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 300
    while not (tmp_path / "paused").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (tmp_path / "paused").is_file(), f"the run never reached step 90 (exit code {proc.poll()})"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    done = load_checkpoint(tmp_path / "run").meta["epoch"]  # a complete, consistent checkpoint survived the kill
    assert done == 1  # epoch 1's, and nothing of the half-done epoch 2
    resume = KILL_SCRIPT.format(root=root, out=str(tmp_path), epochs=3, resume=True, pause_at_step=0)
    subprocess.run([sys.executable, "-c", resume], check=True, timeout=300)
    final = load_checkpoint(tmp_path / "run")
    assert final.meta["epoch"] == 3 and [r["epoch"] for r in final.meta["history"]] == [1, 2, 3]


def test_ema_is_the_exponential_average_of_every_step():
    from cnnlab.engine.trainer import _Ema

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = _Ema(model, decay=0.9)
    expected = {k: v.clone().float() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # train mode: BatchNorm moves its running statistics and counter
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = v.float() if k.endswith("num_batches_tracked") else 0.9 * expected[k] + 0.1 * v
    for k, v in ema.state().items():
        torch.testing.assert_close(v.float(), expected[k], rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())
    # a checkpoint written by torch's AveragedModel (cnnlab <= 0.1) still loads
    legacy = {f"module.{k}": v + 1 if v.is_floating_point() else v for k, v in ema.state().items()}
    ema.load({**legacy, "n_averaged": torch.tensor(3)})
    torch.testing.assert_close(ema.state()["0.weight"], expected["0.weight"] + 1)


def test_resume_refuses_changed_settings_but_may_run_longer(tmp_path):
    train(tiny_config(tmp_path, epochs=1))
    changed = tiny_config(tmp_path, epochs=2)
    changed.optim.lr = 0.2
    changed.data.flip = False
    with pytest.raises(CnnlabError, match=r"data.flip \(saved True, given False\); optim.lr \(saved 0.05, given 0.2\)"):
        train(changed, resume=True)
    # one-cycle is laid over the run's length: more epochs would change the steps already planned
    with pytest.raises(CnnlabError, match=r"epochs: 1 -> 2 \(the onecycle schedule is laid over"):
        train(tiny_config(tmp_path, epochs=2), resume=True)
    train(tiny_config(tmp_path, name="step", epochs=1, schedule="step"))
    longer = train(tiny_config(tmp_path, name="step", epochs=2, schedule="step"), resume=True)
    assert len(longer.history) == 2  # a schedule that does not depend on the length: more epochs allowed


def test_two_runs_racing_for_one_folder_do_not_mix(tmp_path, monkeypatch):
    # two runs under one timestamped name, started in the same second: both find the folder free; the second to
    # reach its first checkpoint must stop instead of writing over the first one's files
    import cnnlab.engine.trainer as trainer

    config = tiny_config(tmp_path, epochs=2)
    run = tmp_path / "run"
    check = trainer._check_run_folder

    def the_other_run_claims_it(run_dir, resume):
        check(run_dir, resume)  # free now...
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text('{"the": "other run"}')  # ...taken before this run's first epoch ends

    monkeypatch.setattr(trainer, "_check_run_folder", the_other_run_claims_it)
    with pytest.raises(CnnlabError, match="was taken by another run"):
        train(config)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert json.loads((run / "config.json").read_text()) == {"the": "other run"}
