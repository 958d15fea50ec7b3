"""Hyper-parameter search on Optuna: the space syntax, the samplers, pruning, the task's metric, storage refusals."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from cnnlab.engine import TrainConfig
from cnnlab.engine.config import DataConfig, ModelConfig
from cnnlab.engine import search as S
from cnnlab.engine.trainer import TrainingDiverged


def test_parse_dimensions():
    assert S.parse_dimension("optim.lr=loguniform(1e-4, 1e-1)") == S.Dimension("optim.lr", "loguniform", 1e-4, 0.1)
    assert S.parse_dimension("optim.momentum = uniform(0.8,0.99)") == S.Dimension("optim.momentum", "uniform", 0.8, 0.99)
    assert S.parse_dimension("data.batch_size=int(32,256)").kind == "int"
    assert S.parse_dimension("optim.optimizer=sgd, adamw").choices == ("sgd", "adamw")
    options = S.parse_dimension('model.options=[{"drop_rate": 0.1}, {"drop_rate": 0.5}]')
    assert options.choices == ('{"drop_rate": 0.1}', '{"drop_rate": 0.5}')
    for bad, message in [("optim.lr", "must look like"), ("optim.lr=loguniform(0,1)", "positive range"),
                         ("optim.lr=uniform(1,0.1)", "low < high"), ("optim.lr=uniform(a,b)", "two numbers"),
                         ("optim.lr=", "no values")]:
        with pytest.raises(CnnlabError, match=message):
            S.parse_dimension(bad)
    with pytest.raises(CnnlabError, match="searched twice"):
        S.parse_space(["optim.lr=0.1,0.2", "optim.lr=0.3"])


def test_grid_values_and_log_sampling():
    lr = S.Dimension("optim.lr", "loguniform", 1e-4, 1e-2)
    assert lr.grid(3) == [1e-4, 0.001, 1e-2]  # log-spaced, the ends exact
    assert S.Dimension("x", "uniform", 0, 1).grid(3) == [0, 0.5, 1]
    assert S.Dimension("x", "int", 1, 2).grid(5) == [1, 2]  # no repeats
    assert lr.text(0.0123456789) == "0.0123456789" and S.Dimension("b", "int", 1, 9).text(4) == "4"
    # Optuna's random sampler through Dimension.suggest: uniform in log space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = []
    for _ in range(1000):
        trial = study.ask()
        samples.append(lr.suggest(trial))
        study.tell(trial, 0.0)
    assert all(1e-4 <= v <= 1e-2 for v in samples)
    below = sum(v < 1e-3 for v in samples) / len(samples)
    assert 0.44 < below < 0.56  # half the log range lies below 1e-3 (a linear draw would put 9% there)


def _fake_train(seen):
    """A stand-in for train(): val_acc peaks at lr = 1e-2 (log scale) and grows with the epochs; lr > 0.1 diverges."""
    def train(config, resume=False, callbacks=()):
        seen.append(config)
        lr = config.optim.lr
        if lr > 0.1:
            raise TrainingDiverged("loss became nan")
        acc = 1 - abs(math.log10(lr) + 2) / 10 + (0.01 if config.optim.optimizer == "adamw" else 0)
        history = []
        for e in range(config.epochs):
            row = {"epoch": e + 1, "train_loss": 1.0, "val_loss": 1 - acc, "val_acc": acc * (e + 1) / config.epochs}
            history.append(row)
            for callback in callbacks:
                callback(row)
        return history
    return train


def test_grid_tries_every_combination_once(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(S, "train", _fake_train(seen))
    base = TrainConfig(model=ModelConfig(name="simple_cnn_bn"), out_dir=str(tmp_path), quiet=True)
    space = S.parse_space(["optim.lr=loguniform(1e-3,1e-1)", "optim.optimizer=sgd,adamw"])
    result = S.search(base, space, sampler="grid", pruner="none", epochs=2, grid_points=3, name="g", plot=False)
    combos = sorted((c.optim.lr, c.optim.optimizer) for c in seen)
    assert combos == sorted((lr, o) for lr in (1e-3, 0.01, 0.1) for o in ("sgd", "adamw"))
    assert all(c.epochs == 2 and c.data.val_fraction == 0.1 and c.quiet for c in seen)  # scored on a validation split
    assert [t.state for t in result.trials] == ["complete"] * 6
    assert result.best.params == {"optim.lr": "0.01", "optim.optimizer": "adamw"} and result.best.score == 1.01
    assert result.direction == "maximize" and result.metric == "val_acc"  # the classification task's first metric
    assert result.best_overrides() == ["optim.lr=0.01", "optim.optimizer=adamw"]


def test_pruning_stops_the_trailing_trials_early(tmp_path, monkeypatch):
    """Successive halving (rungs at epochs 1, 3, 9): short runs first, only the best train all 9 epochs."""
    seen = []
    monkeypatch.setattr(S, "train", _fake_train(seen))
    base = TrainConfig(out_dir=str(tmp_path), quiet=True)
    space = S.parse_space(["optim.lr=loguniform(1e-5,1)", "optim.optimizer=sgd,adamw"])
    result = S.search(base, space, sampler="random", pruner="halving", trials=12, epochs=9, seed=1, name="s")
    states = [t.state for t in result.trials]
    assert len(states) == 12 and states.count("pruned") >= 4 and states.count("complete") >= 1
    assert "diverged" in states  # lr > 0.1 was sampled, and it never wins
    pruned = [t for t in result.trials if t.state == "pruned"]
    assert all(t.epochs in (1, 3) and sorted(t.curve) == list(range(1, t.epochs + 1)) for t in pruned)
    assert all(t.epochs == 9 for t in result.trials if t.state == "complete")
    trained = sum(t.epochs for t in result.trials)
    assert trained < 0.6 * 12 * 9  # what pruning saves
    done = [t for t in result.trials if t.state == "complete"]
    assert result.best.score == max(t.score for t in done)
    # a pruned trial trailed, at its last rung, a trial that went on
    rows = list(csv.DictReader(open(result.csv_path)))
    assert len(rows) == 12 and rows[0].keys() >= {"trial", "optim.lr", "optim.optimizer", "state", "score", "run_dir"}
    assert {r["state"] for r in rows} == set(states)
    best = json.loads((result.search_dir / "best.json").read_text())
    assert best["params"] == result.best.params and best["direction"] == "maximize" and best["trials_done"] == 12
    assert result.plot_path.stat().st_size > 10_000
    with pytest.raises(CnnlabError, match="already holds a search"):
        S.search(base, space, trials=1, epochs=1, name="s")


def test_tpe_proposals_follow_the_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "train", _fake_train([]))
    base = TrainConfig(out_dir=str(tmp_path), quiet=True)
    space = S.parse_space(["optim.lr=loguniform(1e-5,1e-1)"])
    runs = [S.search(base, space, sampler="tpe", pruner="none", trials=9, epochs=1, seed=s, name=n, plot=False)
            for s, n in ((4, "a"), (4, "b"), (5, "c"))]
    params = [[t.params for t in r.trials] for r in runs]
    assert params[0] == params[1] != params[2]
    # after its 3 random start-up trials TPE samples near the best so far: the later trials are closer to 1e-2
    errors = [abs(math.log10(float(t.params["optim.lr"])) + 2) for t in runs[0].trials]
    assert sum(errors[3:]) / 6 < sum(errors[:3]) / 3


def test_metric_and_direction_come_from_the_task(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "train", _fake_train([]))
    base = TrainConfig(out_dir=str(tmp_path), quiet=True)
    space = S.parse_space(["optim.lr=loguniform(1e-4,1e-1)"])
    low = S.search(base, space, metric="val_loss", pruner="none", trials=3, epochs=1, name="l", plot=False)
    assert low.direction == "minimize" and low.best.score == min(t.score for t in low.trials)
    with pytest.raises(CnnlabError, match=r"metric='val_psnr' is not .* classification .* choose val_loss, val_acc"):
        S.search(base, space, metric="val_psnr", name="x")
    assert S.metric_direction(TrainConfig(model=ModelConfig(name="conv_autoencoder")), None) == ("val_psnr", True)


def test_bad_search_settings_name_the_field(tmp_path):
    base = TrainConfig(out_dir=str(tmp_path))
    space = S.parse_space(["optim.lr=loguniform(1e-3,1)"])
    for kwargs, message in [({"sampler": "bayes"}, "sampler='bayes' is not one of tpe, random, grid"),
                            ({"pruner": "hyperbnd"}, "pruner='hyperbnd' is not one of hyperband, halving, none; did you "
                                                     "mean hyperband"),
                            ({"epochs": 0}, "epochs must be a whole number >= 1"),
                            ({"trials": 0}, "trials must be a whole number >= 1"),
                            ({"epochs": 2, "min_epochs": 3}, "min_epochs \\(3\\) must be <= epochs \\(2\\)"),
                            ({"reduction_factor": 1}, "reduction_factor must be a whole number >= 2"),
                            ({"metric": "test_acc"}, "never on test")]:
        with pytest.raises(CnnlabError, match=message):
            S.search(base, space, **kwargs)
    with pytest.raises(CnnlabError, match="unknown config key 'optim.lrr'"):
        S.search(base, S.parse_space(["optim.lrr=0.1,0.2"]), trials=1, epochs=1)
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_storage_that_is_not_this_search_is_refused_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "train", _fake_train([]))
    base = TrainConfig(out_dir=str(tmp_path), quiet=True)
    space = S.parse_space(["optim.lr=loguniform(1e-4,1e-1)"])
    S.search(base, space, pruner="none", trials=2, epochs=1, name="s", plot=False)
    db = tmp_path / "s" / "study.db"
    before = db.read_bytes()
    for other, message in [(dict(space=S.parse_space(["optim.lr=loguniform(1e-5,1e-1)"])), "space \\(saved"),
                           (dict(base=TrainConfig(out_dir=str(tmp_path), quiet=True, data=DataConfig(name="mnist"))),
                            "data.name \\(saved 'fashion_mnist', given 'mnist'\\)"),
                           (dict(sampler="random"), "sampler \\(saved 'tpe', given 'random'\\)")]:
        kwargs = dict(base=base, space=space, pruner="none", trials=2, epochs=1, name="s", plot=False, resume=True) | other
        with pytest.raises(CnnlabError, match="belongs to another search.*" + message):
            S.search(kwargs.pop("base"), kwargs.pop("space"), **kwargs)
        # the same through the study itself: an explicit storage URL of another search
        kwargs = dict(base=base, space=space, pruner="none", trials=2, epochs=1, name="t", plot=False,
                      storage=f"sqlite:///{db}", study_name="s") | other
        with pytest.raises(CnnlabError, match=re.escape(f"study 's' in sqlite:///{db} belongs to another search")):
            S.search(kwargs.pop("base"), kwargs.pop("space"), **kwargs)
    assert db.read_bytes() == before
    # a file that is not a study at all, or a SQLite database of something else, or another study's file
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "study.db").write_bytes(b"not a database, but my notes\n" * 10)
    other = tmp_path / "other"
    other.mkdir()
    con = sqlite3.connect(other / "study.db")
    con.execute("CREATE TABLE notes (t TEXT)")
    con.execute("INSERT INTO notes VALUES ('x')")
    con.commit()
    con.close()
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "study.db").write_bytes(before)
    for folder, message in [(junk, "is not an Optuna study \\(not a SQLite database\\)"),
                            (other, "is a SQLite database but not an Optuna study \\(its tables: notes\\)"),
                            (moved, "holds other studies \\(s\\), not 'moved'")]:
        content = (folder / "study.db").read_bytes()
        with pytest.raises(CnnlabError, match=message):  # as another worker's storage
            S.search(base, space, pruner="none", trials=2, epochs=1, name=folder.name,
                     storage=f"sqlite:///{folder / 'study.db'}")
        shutil.copy(tmp_path / "s" / "search.json", folder / "search.json")
        with pytest.raises(CnnlabError, match=message):  # as the search folder's own study
            S.search(base, space, pruner="none", trials=2, epochs=1, name=folder.name, resume=True)
        assert (folder / "study.db").read_bytes() == content
        assert sorted(p.name for p in folder.iterdir()) == ["search.json", "study.db"]


def test_cli_search_trains_real_short_runs(tmp_path, capsys):
    """Real training on sklearn digits: 3 trials of 2 epochs, scored on validation, then the train command."""
    args = ["search", "--model", "simple_cnn_bn", "--data", "digits", "--device", "cpu", "--out-dir", str(tmp_path),
            "--name", "s", "--set", "data.batch_size=64", "--set", "data.train_limit=400",
            "--set", 'model.options={"hidden": [32]}', "--set", "optim.optimizer=adamw",
            "--param", "optim.lr=loguniform(1e-4,1e-1)", "--trials", "3", "--epochs", "2", "--pruner", "halving",
            "--sampler", "random", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train it fully with: cnnlab train --model simple_cnn_bn --data digits" in out and "--set 'optim.lr=" in out
    folder = tmp_path / "s"
    rows = list(csv.DictReader(open(folder / "search.csv")))
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} <= {"complete", "pruned"}
    run = Path(rows[0]["run_dir"])
    metrics = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(metrics) == 2 and float(rows[0]["score"]) == pytest.approx(max(float(m["val_acc"]) for m in metrics))
    assert json.loads((run / "config.json").read_text())["data"]["val_fraction"] == 0.1
    assert (folder / "search.png").stat().st_size > 10_000
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 'study.db'}")
    assert len(study.trials) == 3 and study.trials[0].intermediate_values.keys() == {1, 2}
    assert main(["search", "--param", "optim.lr=loguniform(0,1)"]) == 2
    assert "positive range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--param", "optim.lr=0.1,0.2", "--sampler", "bayes"])
    err = capsys.readouterr().err  # argparse names the option and the accepted values (quoted from Python 3.12 on)
    assert "--sampler: invalid choice: 'bayes' (choose from" in err and re.search(r"'?tpe'?, '?random'?, '?grid'?", err)
