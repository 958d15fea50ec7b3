"""A search killed mid-way resumes to the same table as an uninterrupted one (real training on the tiny dataset),
and several processes can work on one study."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
import time

import optuna
import pytest

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from cnnlab.engine import search as S

from ._tiny import register_tiny, tiny_config

SPACE = ["optim.lr=loguniform(1e-3,1e-1)", "optim.optimizer=sgd,adamw"]
# TPE after 2 random trials, successive halving at epochs 1 and 2: both the proposals and the pruning read the scores
ARGS = dict(sampler="tpe", pruner="halving", trials=5, epochs=2, reduction_factor=2, metric="val_loss", seed=2)


def _interrupt_in(name: str, calls: list):
    """A stand-in for train() that records its calls and stops trial ``name`` after its first epoch."""
    from cnnlab.engine.trainer import train as real

    def train(config, **kwargs):
        calls.append((config.name, kwargs.get("resume", False)))
        if config.name == name:
            def stop(row):
                raise KeyboardInterrupt  # as Ctrl-C would, after the epoch's checkpoint is saved
            # before the search's callback: the epoch is checkpointed but not reported (the resume reports it)
            return real(config, callbacks=[stop, *kwargs.pop("callbacks", ())], **kwargs)
        return real(config, **kwargs)
    return train


def _table(path):
    """search.csv without the columns that differ between two folders or two timings."""
    return [{k: v for k, v in row.items() if k not in ("time_s", "run_dir", "worker")}
            for row in csv.DictReader(open(path))]


def test_interrupted_search_resumes_to_the_same_table(tmp_path, monkeypatch, capsys):
    register_tiny(monkeypatch)
    base = tiny_config(tmp_path, name="", epochs=1)
    # one study name for both: Hyperband and the proposals read it; here it keeps the two searches comparable
    whole = S.search(base, S.parse_space(SPACE), name="whole", study_name="s", **ARGS)

    # the first trial after t000 that the pruner let train both epochs is the one interrupted
    k = next(t.number for t in whole.trials[1:] if t.epochs == 2)
    assert [t.state for t in whole.trials].count("pruned") >= 1  # the pruner did work
    calls: list = []
    monkeypatch.setattr(S, "train", _interrupt_in(f"t{k:03d}", calls))
    with pytest.raises(KeyboardInterrupt):
        S.search(base, S.parse_space(SPACE), name="cut", study_name="s", **ARGS)
    cut = tmp_path / "cut"
    assert len(_table(cut / "search.csv")) == k  # the table grew trial by trial
    assert json.loads((cut / "best.json").read_text())["trials_done"] == k
    saved = json.loads((cut / "search.json").read_text())
    assert saved["trials"] == 5 and saved["seed"] == 2 and saved["base"]["data"]["val_fraction"] == 0.1
    assert (cut / f"t{k:03d}" / "last.json").exists() and not (cut / f"t{k:03d}" / "results.json").exists()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{cut / 'study.db'}")
    assert study.trials[k].state.name == "RUNNING" and study.trials[k].user_attrs["interrupted"] is True

    calls.clear()
    monkeypatch.setattr(S, "train", _interrupt_in("none", calls))
    base.quiet = False
    resumed = S.resume_search(cut, quiet=False)
    # finished trials stay, the interrupted one continues from its checkpoint, the rest run
    assert calls == [(f"t{k:03d}", True)] + [(f"t{i:03d}", False) for i in range(k + 1, 5)]
    assert [t.score for t in resumed.trials] == [t.score for t in whole.trials]  # bit for bit
    assert [t.params for t in resumed.trials] == [t.params for t in whole.trials]
    assert [t.state for t in resumed.trials] == [t.state for t in whole.trials]
    assert resumed.best.params == whole.best.params and resumed.best.score == whole.best.score
    assert _table(cut / "search.csv") == _table(tmp_path / "whole" / "search.csv")
    # epoch 1 checkpointed before the interruption (reported by the resume), epoch 2 trained after it
    assert sorted(resumed.trials[k].curve) == [1, 2]
    out = capsys.readouterr().out
    assert "trial 1/5 t000" in out and "read back" in out and f"t{k:03d}" in out and "resumed" in out
    assert "elapsed" in out

    # resuming with other arguments names them; a folder with no search cannot be resumed
    with pytest.raises(CnnlabError, match=r"seed \(saved 2, given 4\).*optim.lr \(saved 0.05, given 0.01\)"):
        other = tiny_config(tmp_path, name="", epochs=1)
        other.optim.lr = 0.01
        S.search(other, S.parse_space(SPACE), name="cut", resume=True, study_name="s", **dict(ARGS, seed=4))
    with pytest.raises(CnnlabError, match="holds no search.json"):
        S.resume_search(tmp_path / "nothing")
    with pytest.raises(CnnlabError, match="already holds a search; continue it with `cnnlab search --resume"):
        S.search(base, S.parse_space(SPACE), name="cut", **ARGS)


def test_diverged_trials_are_not_retrained_on_resume(tmp_path, monkeypatch):
    calls = []

    def fake(config, **kwargs):
        calls.append(config.name)
        if calls == ["t000", "t001"]:
            raise KeyboardInterrupt
        raise S.TrainingDiverged("loss became nan")
    monkeypatch.setattr(S, "train", fake)
    base = tiny_config(tmp_path, name="", epochs=1)
    with pytest.raises(KeyboardInterrupt):
        S.search(base, S.parse_space(["optim.lr=1,2"]), sampler="grid", epochs=1, name="d")
    result = S.resume_search(tmp_path / "d", plot=False)
    assert calls == ["t000", "t001", "t001"] and [t.state for t in result.trials] == ["diverged"] * 2
    assert result.best is None


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cnnlab.engine import TrainConfig, search as S

    me, other = Path(sys.argv[1], "ready-" + sys.argv[2]), Path(sys.argv[1], "ready-" + sys.argv[4])

    def train(config, resume=False, callbacks=()):  # 2 epochs of 0.3 s; val_loss is |log10(lr) + 2|
        import math
        me.touch()
        while not other.exists():  # each worker's first trial waits for the other's: both take part
            time.sleep(0.05)
        for epoch in (1, 2):
            time.sleep(0.3)
            for callback in callbacks:
                callback({"epoch": epoch, "train_loss": 1.0, "val_loss": abs(math.log10(config.optim.lr) + 2)})

    S.train = train
    base = TrainConfig(out_dir=sys.argv[1], quiet=True)
    S.search(base, S.parse_space(["optim.lr=loguniform(1e-4,1)"]), sampler="random", pruner="none", trials=8,
             epochs=2, metric="val_loss", name=sys.argv[2], storage=sys.argv[3], study_name="shared", plot=False)
""")


def test_two_processes_share_one_study(tmp_path):
    """Two workers on one SQLite study (as two machines on one database): 8 trials in all, each run once."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    def start(i):
        return subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), f"w{i}", url, f"w{1 - i}"],
                                stderr=subprocess.PIPE, text=True)

    procs = [start(0)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and procs[0].poll() is None:  # the second worker joins the study once it exists
        if (tmp_path / "w0" / "search.json").exists():
            break
        time.sleep(0.2)
    procs.append(start(1))
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    study = optuna.load_study(study_name="shared", storage=url)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 8 and len({t.params["optim.lr"] for t in done}) == 8
    workers = {t.user_attrs["worker"] for t in done}
    assert len(workers) == 2  # both processes trained trials
    # Each worker's table holds every trial of the study as it stood when that worker stopped: the worker that
    # stops first may still see the other's last trial running; the one that stops last sees all 8 complete.
    states = [[r["state"] for r in csv.DictReader(open(tmp_path / f"w{i}" / "search.csv"))] for i in range(2)]
    assert all(len(s) == 8 and set(s) <= {"complete", "running"} for s in states), states
    assert max(s.count("complete") for s in states) == 8, states


def test_cli_resume(tmp_path, monkeypatch, capsys):
    register_tiny(monkeypatch)
    calls: list = []
    monkeypatch.setattr(S, "train", _interrupt_in("t001", calls))
    args = ["search", "--model", "fmnist_net", "--data", "tiny", "--device", "cpu", "--out-dir", str(tmp_path),
            "--name", "s", "--set", "data.batch_size=16", "--set", "threads=1", "--param", "optim.lr=loguniform(1e-3,1e-1)",
            "--trials", "3", "--epochs", "1", "--sampler", "random", "--pruner", "none", "--no-plot"]
    assert main(args) == 130
    assert "cnnlab search --resume" in capsys.readouterr().out
    folder = str(tmp_path / "s")
    assert main(["search", "--resume", folder, "--trials", "4", "--set", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "--trials 4 (the search has 3)" in err and "optim.lr (saved 0.05, given 0.5)" in err
    assert main(["search", "--resume", folder, "--trials", "3", "--quiet", "--no-plot"]) == 0  # same values: fine
    out = capsys.readouterr().out
    assert "best: t00" in out and len(list(csv.DictReader(open(tmp_path / "s" / "search.csv")))) == 3
    assert calls[-2:] == [("t001", True), ("t002", False)]
    n = len(calls)
    assert main(args + ["--resume"]) == 0  # the same command with a bare --resume: all trials read back
    assert "trial 3/3" in capsys.readouterr().out and len(calls) == n
