"""Hyper-parameter search: the space syntax, grid/random proposals, coarse-to-fine refinement, table and plot."""
from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from cnnlab.engine import TrainConfig
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


def test_grid_and_random_proposals():
    lr, opt = S.Dimension("optim.lr", "loguniform", 1e-4, 1e-2), S.Dimension("optim.optimizer", "choice", choices=("sgd", "adam"))
    assert lr.grid(3) == ["0.0001", "0.001", "0.01"]  # log-spaced
    assert S.Dimension("x", "uniform", 0, 1).grid(3) == ["0", "0.5", "1"]
    assert S.Dimension("x", "int", 1, 2).grid(5) == ["1", "2"]  # no repeats
    grid = S.propose([lr, opt], "grid", 0, 3, random.Random(0))
    assert len(grid) == 6 and {"optim.lr": "0.001", "optim.optimizer": "adam"} in grid
    samples = [float(lr.sample(random.Random(i))) for i in range(2000)]
    assert all(1e-4 <= v <= 1e-2 for v in samples)
    below = sum(v < 1e-3 for v in samples) / len(samples)
    assert 0.45 < below < 0.55  # half the log range lies below 1e-3 (a linear draw would put 9% there)
    draws = S.propose([lr, opt], "random", 5, 3, random.Random(7))
    assert draws == S.propose([lr, opt], "random", 5, 3, random.Random(7)) and len(draws) == 5
    with pytest.raises(CnnlabError, match="grid or random"):
        S.propose([lr], "bayes", 1, 1, random.Random(0))


def test_narrowing():
    lr = S.Dimension("optim.lr", "loguniform", 1e-4, 1e-2).narrow("0.001", 0.5)
    assert lr.low == pytest.approx(1e-3 / math.sqrt(10)) and lr.high == pytest.approx(1e-3 * math.sqrt(10))
    p = S.Dimension("p", "uniform", 0.0, 1.0).narrow("0.9", 0.5)  # clipped to the first round's range
    assert (p.low, p.high, p.bounds) == (pytest.approx(0.65), 1.0, (0.0, 1.0))
    assert p.narrow("1.0", 0.5).high == 1.0
    assert S.Dimension("o", "choice", choices=("sgd", "adam")).narrow("adam", 0.25).choices == ("adam",)


def _fake_train(seen):
    """A stand-in for train(): val_acc peaks at lr = 1e-2 (log scale); lr > 0.1 diverges."""
    def train(config):
        seen.append(config)
        lr = config.optim.lr
        if lr > 0.1:
            raise TrainingDiverged("loss became nan")
        acc = 1 - abs(math.log10(lr) + 2) / 10 + (0.01 if config.optim.optimizer == "adamw" else 0)
        history = [{"epoch": e + 1, "train_loss": 1.0, "val_loss": 1 - acc, "val_acc": acc * (e + 1) / config.epochs}
                   for e in range(config.epochs)]
        return SimpleNamespace(history=history)
    return train


def test_coarse_to_fine_refines_around_the_best(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(S, "train", _fake_train(seen))
    base = TrainConfig(out_dir=str(tmp_path), quiet=True)
    space = S.parse_space(["optim.lr=loguniform(1e-5,1)", "optim.optimizer=sgd,adamw"])
    result = S.search(base, space, strategy="random", trials=(12, 6), epochs=(1, 3), shrink=0.2, seed=1, name="s")
    first, second = result.trials[:12], result.trials[12:]
    assert [t.epochs for t in result.trials] == [1] * 12 + [3] * 6  # short runs first
    assert all(c.data.val_fraction == 0.1 and c.quiet for c in seen)  # scored on a validation split
    ok = [t for t in first if t.status == "ok"]
    best1 = max(ok, key=lambda t: t.score)
    assert any(t.status == "diverged" and math.isnan(t.score) for t in first)  # lr > 0.1 was sampled, and never wins
    # round 2: the optimizer fixed to round 1's best, the learning rate within 0.2 x 5 decades around it
    assert {t.params["optim.optimizer"] for t in second} == {best1.params["optim.optimizer"]}
    center = math.log10(float(best1.params["optim.lr"]))
    assert all(abs(math.log10(float(t.params["optim.lr"])) - center) <= 0.5 + 1e-3 for t in second)
    assert result.best.score == max(t.score for t in result.trials if t.status == "ok")
    assert abs(math.log10(float(result.best.params["optim.lr"])) + 2) <= abs(center + 2) + 1e-9
    rows = list(csv.DictReader(open(result.csv_path)))
    assert len(rows) == 18 and rows[0].keys() >= {"optim.lr", "optim.optimizer", "score", "status", "run_dir"}
    assert json.loads((result.search_dir / "best.json").read_text())["params"] == result.best.params
    assert result.plot_path.stat().st_size > 10_000
    assert result.best_overrides()[0].startswith("optim.lr=")
    with pytest.raises(CnnlabError, match="already holds a search"):
        S.search(base, space, trials=1, epochs=(1,), name="s")


def test_bad_search_settings(tmp_path):
    base = TrainConfig(out_dir=str(tmp_path))
    space = S.parse_space(["optim.lr=loguniform(1e-3,1)"])
    for kwargs, message in [({"metric": "test_acc"}, "not one of val_acc"), ({"epochs": ()}, "one positive count"),
                            ({"trials": (2, 2), "epochs": (1,)}, "one per round"), ({"shrink": 0}, "shrink")]:
        with pytest.raises(CnnlabError, match=message):
            S.search(base, space, **kwargs)
    with pytest.raises(CnnlabError, match="unknown config key 'optim.lrr'"):
        S.search(base, S.parse_space(["optim.lrr=0.1,0.2"]), trials=1, epochs=(1,))


def test_cli_search_trains_real_short_runs(tmp_path, capsys):
    """Two rounds of real training on sklearn digits: 2 one-epoch trials, then 1 two-epoch trial."""
    args = ["search", "--model", "simple_cnn_bn", "--data", "digits", "--device", "cpu", "--out-dir", str(tmp_path),
            "--name", "s", "--set", "data.batch_size=64", "--set", "data.train_limit=400",
            "--set", 'model.options={"hidden": [32]}', "--set", "optim.optimizer=adamw",
            "--param", "optim.lr=loguniform(1e-4,1e-1)", "--trials", "2,1", "--epochs", "1,2", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train it fully with: cnnlab train --set 'optim.lr=" in out
    folder = tmp_path / "s"
    rows = list(csv.DictReader(open(folder / "search.csv")))
    assert [r["round"] for r in rows] == ["1", "1", "2"] and all(r["status"] == "ok" for r in rows)
    run = Path(rows[2]["run_dir"])
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 2  # round 2 trained longer
    assert json.loads((run / "config.json").read_text())["data"]["val_fraction"] == 0.1
    assert (folder / "search.png").stat().st_size > 10_000
    assert main(["search", "--param", "optim.lr=loguniform(0,1)"]) == 2
    assert "positive range" in capsys.readouterr().err
