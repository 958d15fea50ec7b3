"""Ensembles: probability averaging of trained runs, and bagging on bootstrap samples (sklearn digits, 1 epoch)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from cnnlab.engine import TrainConfig, apply_overrides, train
from cnnlab.engine import ensemble as ensemble_module
from cnnlab.engine import trainer as trainer_module
from cnnlab.engine.data_setup import build_data
from cnnlab.engine.ensemble import (
    bootstrap_data,
    bootstrap_indices,
    evaluate_ensemble,
    load_member,
    predict_proba,
    resume_bagged,
    train_bagged,
)

from ._tiny import register_tiny
from ._tiny import tiny_config as tiny_run_config


def tiny_config(out_dir, name: str = "", seed: int = 0) -> TrainConfig:
    config = TrainConfig()
    return apply_overrides(config, [
        "model.name=simple_cnn_bn", 'model.options={"hidden": [32]}', "data.name=digits", "data.batch_size=64",
        "data.train_limit=512", "epochs=1", "device=cpu", "plots=false", "quiet=true", "optim.optimizer=adamw",
        "optim.lr=0.003", f"out_dir={out_dir}", f"name={name}", f"seed={seed}"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return [train(tiny_config(out, f"m{i}", seed=i)).run_dir for i in range(2)]


def test_ensemble_averages_the_members_probabilities(two_runs):
    result = evaluate_ensemble(two_runs, device="cpu")
    # each member's accuracy is the one its run reported on the same test split
    for run, acc in zip(two_runs, result.member_accuracy):
        assert acc == pytest.approx(json.loads((run / "results.json").read_text())["test_accuracy"], abs=1e-6)
    assert result.count == 360  # digits: every 5th of 1,797 images
    # recompute the average independently, member by member
    probs = []
    for run in two_runs:
        member = load_member(run)
        data = build_data(member.config.data, torch.device("cpu"), seed=member.config.seed, in_channels=1)
        p, labels = predict_proba(member.model, data.test)
        probs.append(p)
    mean = (probs[0] + probs[1]) / 2
    torch.testing.assert_close(result.probabilities, mean)
    torch.testing.assert_close(result.probabilities.sum(1), torch.ones(360))
    assert result.accuracy == pytest.approx((mean.argmax(1) == labels).float().mean().item())
    assert torch.equal(result.labels, labels)
    assert result.nll == pytest.approx(-mean[torch.arange(360), labels].log().mean().item(), rel=1e-5)
    assert result.nll <= sum(result.member_nll) / 2  # Jensen: -log of the mean <= mean of the -logs


def test_weights_select_and_validate(two_runs):
    only_first = evaluate_ensemble(two_runs, device="cpu", weights=[1.0, 0.0])
    assert only_first.accuracy == pytest.approx(only_first.member_accuracy[0])
    with pytest.raises(CnnlabError, match="2 non-negative numbers"):
        evaluate_ensemble(two_runs, device="cpu", weights=[1.0])


def test_members_must_share_the_test_split(two_runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_runs[1], other)
    config = json.loads((other / "config.json").read_text())
    folder = tmp_path / "images"  # a 2-class image folder: its test split is 2 other images
    for i in range(10):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 25 * i, dtype=np.uint8)).save(folder / f"c{i % 2}" / f"{i}.png")
    config["data"]["name"] = str(folder)
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CnnlabError, match="must share the test split"):
        evaluate_ensemble([two_runs[0], other], device="cpu")


def test_cli_ensemble_of_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["ensemble", *map(str, two_runs), "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ensemble (probability average)" in text and "mean of 2 members" in text
    saved = json.loads(out.read_text())
    assert len(saved["members"]) == 2 and 0 <= saved["ensemble"]["test_accuracy"] <= 1
    assert main(["ensemble", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["ensemble"]) == 2


def test_bootstrap_sample_resamples_only_the_training_split():
    idx = bootstrap_indices(10_000, seed=3)
    assert torch.equal(idx, bootstrap_indices(10_000, seed=3)) and not torch.equal(idx, bootstrap_indices(10_000, seed=4))
    assert 0.62 < len(idx.unique()) / 10_000 < 0.645  # 1 - 1/e = 0.632 distinct images
    config = tiny_config("unused")
    config.data.val_fraction = 0.2
    plain = build_data(config.data, torch.device("cpu"))
    boot = bootstrap_data(config, seed=5)
    n = len(plain.train.images)
    assert len(boot.train.images) == n and len(boot.train.images.flatten(1).unique(dim=0)) < 0.75 * n
    want = bootstrap_indices(n, 5)
    assert torch.equal(boot.train.labels, plain.train.labels[want])
    assert torch.equal(boot.val.images, plain.val.images) and torch.equal(boot.test.images, plain.test.images)
    assert boot.preprocess.mean == plain.preprocess.mean  # normalisation fitted on the whole training split


def test_train_bagged(tmp_path, capsys):
    bag = train_bagged(tiny_config(tmp_path, "bag"), 2)
    assert [r.run_dir.name for r in bag.runs] == ["member0", "member1"]
    assert [r.config.seed for r in bag.runs] == [0, 1]
    summary = json.loads((bag.bag_dir / "bagging.json").read_text())
    assert summary["bootstrap_seeds"] == [10_007, 10_008] and summary["test_images"] == 360
    assert summary["ensemble"]["test_accuracy"] == pytest.approx(bag.ensemble.accuracy)
    for run, acc in zip(bag.runs, bag.ensemble.member_accuracy):
        assert acc == pytest.approx(run.test.accuracy, abs=1e-6)
    with pytest.raises(CnnlabError, match="already holds a bag"):
        train_bagged(tiny_config(tmp_path, "bag"), 2)
    with pytest.raises(CnnlabError, match="at least 1 member"):
        train_bagged(tiny_config(tmp_path, "bag2"), 0)


def test_interrupted_bagging_resumes_to_the_same_bag(tmp_path, monkeypatch, capsys):
    """Killed inside member 1: member 0 is reused, member 1 continues from its checkpoint, the bag ends identical."""
    register_tiny(monkeypatch)
    whole = train_bagged(tiny_run_config(tmp_path, "whole", epochs=2), 3)
    calls = []

    def interrupting(config, **kwargs):
        calls.append((config.name, kwargs.get("resume")))
        if config.name == "member1" and not kwargs.get("resume"):
            def stop(row):
                raise KeyboardInterrupt  # as Ctrl-C would, after the first epoch's checkpoint
            return trainer_module.train(config, callbacks=[stop], **kwargs)
        return trainer_module.train(config, **kwargs)

    monkeypatch.setattr(ensemble_module, "train", interrupting)
    cut = tiny_run_config(tmp_path, "cut", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train_bagged(cut, 3)
    saved = json.loads((tmp_path / "cut" / "bagging.json").read_text())
    assert saved["status"] == "training" and saved["n"] == 3 and [m["run"][-7:] for m in saved["members"]] == ["member0"]
    with pytest.raises(CnnlabError, match="already holds a bag of members; continue it with `cnnlab ensemble --resume"):
        train_bagged(cut, 3)
    other = tiny_run_config(tmp_path, "cut", epochs=2, momentum=0.5)
    with pytest.raises(CnnlabError, match=r"n \(saved 3, given 4\); optim.momentum \(saved 0.9, given 0.5\)"):
        train_bagged(other, 4, resume=True)

    cut.quiet = False
    bag = train_bagged(cut, 3, resume=True)
    assert calls[-2:] == [("member1", True), ("member2", False)]  # member0 was not trained again
    assert torch.equal(bag.ensemble.probabilities, whole.ensemble.probabilities)  # bit for bit on the CPU
    assert [r.test.accuracy for r in bag.runs] == [r.test.accuracy for r in whole.runs]
    losses = lambda runs: [[row["train_loss"] for row in r.history] for r in runs]  # noqa: E731
    assert losses(bag.runs) == losses(whole.runs) and len(losses(bag.runs)[0]) == 2
    out = capsys.readouterr().out
    assert "member 1/3 reused" in out and "member 2/3 resumed" in out and "member 3/3 trained" in out and "~" in out
    summary = json.loads((bag.bag_dir / "bagging.json").read_text())
    assert summary["status"] == "done" and summary["ensemble"]["test_accuracy"] == bag.ensemble.accuracy

    # the CLI: options given with --resume must agree with bagging.json
    folder = str(tmp_path / "cut")
    assert main(["ensemble", "--resume", folder, "--bootstrap", "2", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "--bootstrap 2 (the bag has 3)" in err and "epochs (saved 2, given 3)" in err
    assert main(["ensemble", "--resume", "--name", "cut", "--out-dir", str(tmp_path), "--bootstrap", "3", "--quiet"]) == 0
    assert "ensemble (probability average)" in capsys.readouterr().out and len(calls) == 4  # nothing retrained
    assert main(["ensemble", "--resume"]) == 2 and "needs --name" in capsys.readouterr().err
    with pytest.raises(CnnlabError, match="older cnnlab"):
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "bagging.json").write_text('{"members": []}')
        resume_bagged(tmp_path / "old")
