"""A search killed mid-way resumes to the same table as an uninterrupted one (real training on the tiny dataset)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from cnnlab.engine import search as S

from ._tiny import register_tiny, tiny_config

SPACE = ["optim.lr=loguniform(1e-3,1e-1)", "optim.optimizer=sgd,adamw"]
ARGS = dict(strategy="random", trials=(3, 2), epochs=(2, 2), metric="val_loss", shrink=0.5, seed=3)


def _interrupt_in(name: str, calls: list):
    """A stand-in for train() that records its calls and stops trial ``name`` after its first epoch."""
    from cnnlab.engine.trainer import train as real

    def train(config, **kwargs):
        calls.append((config.name, kwargs.get("resume", False)))
        if config.name == name:
            def stop(row):
                raise KeyboardInterrupt  # as Ctrl-C would, after the epoch's checkpoint is saved
            return real(config, callbacks=[stop], **kwargs)
        return real(config, **kwargs)
    return train


def _table(path):
    """search.csv without the columns that differ between two folders or two timings."""
    return [{k: v for k, v in row.items() if k not in ("time_s", "run_dir")} for row in csv.DictReader(open(path))]


def test_interrupted_search_resumes_to_the_same_table(tmp_path, monkeypatch, capsys):
    register_tiny(monkeypatch)
    base = tiny_config(tmp_path, name="", epochs=1)
    whole = S.search(base, S.parse_space(SPACE), name="whole", **ARGS)

    calls: list = []
    monkeypatch.setattr(S, "train", _interrupt_in("r1-t02", calls))
    with pytest.raises(KeyboardInterrupt):
        S.search(base, S.parse_space(SPACE), name="cut", **ARGS)
    cut = tmp_path / "cut"
    assert len(_table(cut / "search.csv")) == 2  # the table grew trial by trial
    assert json.loads((cut / "best.json").read_text())["trials_done"] == 2
    saved = json.loads((cut / "search.json").read_text())
    assert saved["trials"] == [3, 2] and saved["seed"] == 3 and saved["base"]["data"]["val_fraction"] == 0.1
    assert (cut / "r1-t02" / "last.json").exists() and not (cut / "r1-t02" / "results.json").exists()

    calls.clear()
    monkeypatch.setattr(S, "train", _interrupt_in("none", calls))
    base.quiet = False
    resumed = S.search(base, S.parse_space(SPACE), name="cut", resume=True, **ARGS)
    # finished trials read back, the interrupted one continued from its checkpoint, the rest run
    assert calls == [("r1-t02", True), ("r2-t00", False), ("r2-t01", False)]
    assert [t.source for t in resumed.trials] == ["read", "read", "resumed", "run", "run"]
    assert [t.score for t in resumed.trials] == [t.score for t in whole.trials]  # bit for bit
    assert [t.params for t in resumed.trials] == [t.params for t in whole.trials]
    assert resumed.best.params == whole.best.params and resumed.best.score == whole.best.score
    assert _table(cut / "search.csv") == _table(tmp_path / "whole" / "search.csv")
    assert [row["epoch"] for row in resumed.trials[2].history] == [1, 2]
    out = capsys.readouterr().out
    assert "trial 1/5 r1 t00" in out and "read back" in out and "trial 3/5 r1 t02" in out and "resumed" in out
    assert "elapsed, ~" in out  # a time-left estimate once a trial was trained in this process

    # resuming with other arguments names them; a folder with no search cannot be resumed
    with pytest.raises(CnnlabError, match=r"seed \(saved 3, given 4\).*optim.lr \(saved 0.05, given 0.01\)"):
        other = tiny_config(tmp_path, name="", epochs=1)
        other.optim.lr = 0.01
        S.search(other, S.parse_space(SPACE), name="cut", resume=True, **dict(ARGS, seed=4))
    with pytest.raises(CnnlabError, match="holds no search.json"):
        S.resume_search(tmp_path / "nothing")
    with pytest.raises(CnnlabError, match="already holds a search; continue it with `cnnlab search --resume"):
        S.search(base, S.parse_space(SPACE), name="cut", **ARGS)


def test_diverged_trials_are_not_retrained_on_resume(tmp_path, monkeypatch):
    calls = []

    def fake(config, **kwargs):
        calls.append(config.name)
        if calls == ["r1-t00", "r1-t01"]:
            raise KeyboardInterrupt
        raise S.TrainingDiverged("loss became nan")
    monkeypatch.setattr(S, "train", fake)
    base = tiny_config(tmp_path, name="", epochs=1)
    with pytest.raises(KeyboardInterrupt):
        S.search(base, S.parse_space(["optim.lr=1,2"]), strategy="grid", epochs=(1,), name="d")
    assert (tmp_path / "d" / "r1-t00" / "diverged.json").exists()
    result = S.resume_search(tmp_path / "d", plot=False)
    assert calls == ["r1-t00", "r1-t01", "r1-t01"] and [t.status for t in result.trials] == ["diverged"] * 2


def test_proposals_do_not_depend_on_the_process(tmp_path):
    """The resume recomputes the proposals in a new process: no hash seed or set order may change them."""
    code = ("import random, json; from cnnlab.engine.search import parse_space, propose; "
            "s = parse_space(['optim.lr=loguniform(1e-4,1)', 'optim.optimizer=sgd,adam,adamw', 'data.batch_size=int(8,64)',"
            " 'model.options=[{\"a\": 1}, {\"b\": 2}]']); "
            "print(json.dumps([propose(s, 'random', 6, 3, random.Random(5)), propose(s, 'grid', 0, 2, random.Random(0))]))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={"PYTHONHASHSEED": str(h), "PATH": ""}) for h in (1, 2)]  # in parallel: 2 imports of torch
    outs = {p.communicate()[0] for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(outs) == 1
    random_draws, grid = json.loads(outs.pop())
    assert len(random_draws) == 6 and len(grid) == 2 * 3 * 2 * 2


def test_cli_resume(tmp_path, monkeypatch, capsys):
    register_tiny(monkeypatch)
    calls: list = []
    monkeypatch.setattr(S, "train", _interrupt_in("r1-t01", calls))
    args = ["search", "--model", "fmnist_net", "--data", "tiny", "--device", "cpu", "--out-dir", str(tmp_path),
            "--name", "s", "--set", "data.batch_size=16", "--set", "threads=1", "--param", "optim.lr=loguniform(1e-3,1e-1)",
            "--trials", "3", "--epochs", "1", "--no-plot"]
    assert main(args) == 130
    assert "cnnlab search --resume" in capsys.readouterr().out
    folder = str(tmp_path / "s")
    assert main(["search", "--resume", folder, "--trials", "4", "--set", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "--trials 4 (the search has 3)" in err and "optim.lr (saved 0.05, given 0.5)" in err
    assert main(["search", "--resume", folder, "--trials", "3", "--quiet", "--no-plot"]) == 0  # same values: fine
    out = capsys.readouterr().out
    assert "best: r1" in out and len(list(csv.DictReader(open(tmp_path / "s" / "search.csv")))) == 3
    assert calls[-2:] == [("r1-t01", True), ("r1-t02", False)]
    n = len(calls)
    assert main(args + ["--resume"]) == 0  # the same command with a bare --resume: all trials read back
    assert "trial 3/3" in capsys.readouterr().out and len(calls) == n
