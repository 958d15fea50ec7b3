"""Bad input across the CLI and the main API: a CnnlabError naming the value and what is expected, and no file
written or changed. (The CLI prints a CnnlabError as one line and exits 2; anything else is a traceback.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from tests.engine._tiny import register_tiny, train_tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One trained tiny run (1 epoch) shared by the tests that need a run folder."""
    return train_tiny_run(tmp_path_factory.mktemp("runs"), "plots=false")


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect the one-line error exit, return the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cnnlab {argv[0]}: error: ") and "Traceback" not in err
    return err


# --- files the commands write -------------------------------------------------------------------------------------

def test_output_path_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    err = _error(capsys, ["summary", "simple_cnn", "--output", str(folder)])
    assert "--output" in err and "is a folder" in err and "expected a file path" in err
    err = _error(capsys, ["gradflow", "simple_cnn", "--plot", str(folder)])
    assert "--plot" in err and "is a folder" in err
    err = _error(capsys, ["compare", "simple_cnn", "--plot", "", "--csv", str(folder)])
    assert "--csv" in err and "out.csv" in err
    assert list(folder.iterdir()) == []  # nothing written into it


def test_figure_suffix_matplotlib_cannot_write(tmp_path, capsys):
    err = _error(capsys, ["filters", "sample:china", "--out", str(tmp_path / "f.pngg")])
    assert ".pngg" in err and "did you mean png" in err and ".svg" in err
    assert not (tmp_path / "f.pngg").exists()


def test_output_under_a_file_and_missing_parent(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    err = _error(capsys, ["summary", "simple_cnn", "--output", str(tmp_path / "file.txt" / "s.txt")])
    assert "is a file, not a folder" in err
    assert (tmp_path / "file.txt").read_text() == "mine"
    # a missing parent folder is created, as run folders are, but only once there is something to write
    assert main(["summary", "simple_cnn", "--output", str(tmp_path / "new" / "s.txt")]) == 0
    assert "simple_cnn" in (tmp_path / "new" / "s.txt").read_text()


@pytest.mark.parametrize("argv", [
    ["summary", "simple_cnnn", "--output", "{new}/s.txt"],  # the model name is checked after the path
    ["summary", "simple_cnn", "--input", "3x64", "--output", "{new}/s.txt"],
    ["compare", "simple_cnn", "no_such_model", "--plot", "{new}/c.png", "--csv", "{new}/c.csv"],
    ["gradflow", "no_such_model", "--plot", "{new}/g.png"],
    ["filters", "--learned", "no_such_model", "--out", "{new}/f.png"],
])
def test_a_failed_command_creates_no_folders(tmp_path, capsys, argv):
    new = tmp_path / "new" / "deeper"
    _error(capsys, [a.format(new=new) for a in argv])
    assert list(tmp_path.iterdir()) == []  # the output checks used to create new/deeper before the work failed


def test_output_under_a_folder_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    import os

    from cnnlab.cli import _paths

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # chmod does not bind root (CI containers): fake the answer the OS would give
    monkeypatch.setattr(_paths.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    err = _error(capsys, ["summary", "simple_cnn", "--output", str(locked / "new" / "s.txt")])
    assert "--output" in err and f"the folder {locked} (the nearest existing folder" in err and "not writable" in err
    assert list(locked.iterdir()) == []


def test_eval_plot_and_top_checked_before_evaluating(run_dir, tmp_path, capsys):
    err = _error(capsys, ["eval", str(run_dir), "--plot", str(tmp_path / "cm.txt")])
    assert "--plot" in err and ".txt" in err and ".png" in err
    err = _error(capsys, ["eval", str(run_dir), "--top", "-1"])
    assert "--top must be >= 1" in err and "-1" in err
    err = _error(capsys, ["predict", str(run_dir), "sample:china", "--top", "0"])
    assert "--top must be >= 1" in err


# --- run folders -----------------------------------------------------------------------------------------------------

def test_eval_of_things_that_are_not_run_folders(run_dir, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    err = _error(capsys, ["eval", str(tmp_path / "file.txt")])
    assert "is a file, not a run folder" in err and "cnnlab train" in err
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["eval", str(tmp_path / "empty")])
    assert "is not a run folder" in err and "config.json" in err
    started = tmp_path / "started"  # config.json written, stopped before the first checkpoint
    started.mkdir()
    (started / "config.json").write_text((run_dir / "config.json").read_text())
    err = _error(capsys, ["explain", str(started), "sample:china", "--out", str(tmp_path / "e.png")])
    assert "no checkpoint yet" in err and "--resume" in err
    only_last = tmp_path / "only_last"  # a run that never wrote 'best' (whether a run without a validation
    only_last.mkdir()                  # split writes one is the trainer's choice; this folder does not depend on it)
    for f in run_dir.iterdir():
        if not f.name.startswith("best."):
            (only_last / f.name).write_bytes(f.read_bytes())
    err = _error(capsys, ["eval", str(only_last), "--checkpoint", "best"])
    assert "no 'best' checkpoint" in err and "last" in err


def test_train_refuses_a_folder_holding_other_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my own report")
    err = _error(capsys, ["train", "--model", "simple_cnn", "--data", "digits", "--epochs", "1", "--out-dir",
                          str(tmp_path), "--name", "mine", "--quiet"])
    assert "holds files that are not a run" in err and "--name" in err
    assert (mine / "report.html").read_text() == "my own report" and len(list(mine.iterdir())) == 1


def test_train_config_and_resume_and_out_dir_of_the_wrong_kind(tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    err = _error(capsys, ["train", "--config", str(tmp_path / "list.json")])
    assert "JSON list" in err and "config.json" in err
    err = _error(capsys, ["train", "--config", str(tmp_path)])
    assert "is a folder" in err and "config.json" in err
    (tmp_path / "file.txt").write_text("x")
    err = _error(capsys, ["train", "--resume", str(tmp_path / "file.txt")])
    assert "is a file" in err and "run folder" in err
    err = _error(capsys, ["train", "--model", "simple_cnn", "--data", "digits", "--out-dir",
                          str(tmp_path / "file.txt"), "--name", "x"])
    assert "out_dir" in err and "is a file" in err
    assert (tmp_path / "file.txt").read_text() == "x"


# --- other commands --------------------------------------------------------------------------------------------------

def test_compare_repeats_models_task_search_range(capsys):
    err = _error(capsys, ["compare", "simple_cnn", "--bench", "--repeats", "0", "--plot", ""])
    assert "--repeats must be >= 1" in err
    err = _error(capsys, ["models", "--task", "clasification"])
    assert "unknown task 'clasification'" in err and "did you mean classification" in err
    err = _error(capsys, ["search", "--param", "optim.lr=logunifrom(1e-3,1)", "--model", "simple_cnn"])
    assert "unknown range 'logunifrom'" in err and "did you mean loguniform" in err
    err = _error(capsys, ["search", "--param", "optim.lr=uniform(1)", "--model", "simple_cnn"])
    assert "needs exactly two numbers" in err


# --- the Python API --------------------------------------------------------------------------------------------------

def test_evaluate_topk_must_be_positive():
    from cnnlab.engine.evaluate import evaluate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with pytest.raises(CnnlabError, match=r"topk must hold whole numbers >= 1.*\[0\]"):
        evaluate(model, [(torch.rand(2, 1, 2, 2), torch.tensor([0, 1]))], 3, topk=(0,))


def test_measure_latency_needs_a_repeat():
    from cnnlab.analysis.compare import measure_latency

    with pytest.raises(CnnlabError, match="repeats >= 1"):
        measure_latency(torch.nn.Identity(), (1, 4, 4), repeats=0)


def test_load_run_names_the_problem(run_dir, tmp_path):
    from cnnlab.engine.runs import load_run

    meta = json.loads((run_dir / "last.json").read_text())
    del meta["input_shape"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in run_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "last.json").write_text(json.dumps(meta))
    (broken / "best.json").unlink(missing_ok=True)
    with pytest.raises(CnnlabError, match="last.json is corrupt.*input_shape"):
        load_run(broken)
    assert load_run(run_dir).classes == ["tl", "centre", "br"]


def test_gradcam_and_summary_arguments():
    import cnnlab
    from cnnlab.viz import gradcam

    model = cnnlab.create_model("simple_cnn").eval()
    with pytest.raises(CnnlabError, match="torch.Tensor.*got ndarray.*from_numpy"):
        gradcam(model, torch.rand(1, 28, 28).numpy())
    with pytest.raises(CnnlabError, match="string '1x28x28'"):
        cnnlab.summary("simple_cnn", "1x28x28")
    # a registered model passed as a module is summarised at its own default input, not at 3x224x224
    assert cnnlab.summary(model).input_size == (1, 28, 28)
    assert cnnlab.summary(cnnlab.create_model("simple_cnn", in_channels=3)).input_size == (3, 28, 28)


def test_ensemble_member_given_twice(run_dir, capsys):
    err = _error(capsys, ["ensemble", str(run_dir), str(run_dir) + "/"])
    assert "given more than once" in err and "--member-weights" in err


def test_demo_out_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    err = _error(capsys, ["demo", "--quick", "--out-dir", str(tmp_path / "file.txt")])
    assert "is a file" in err and "out_dir" in err


def test_gradflow_train_mode_batch_of_one_at_a_1x1_map(capsys):
    err = _error(capsys, ["gradflow", "resnet18", "--input", "3x32x32", "--batch-size", "1", "--train-mode",
                          "--plot", ""])
    assert "BatchNorm" in err and "batch of 2 or more" in err


def test_report_of_a_run_with_a_damaged_metrics_csv(run_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in run_dir.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "metrics.csv").write_bytes(bytes(range(128, 228)))  # not UTF-8
    err = _error(capsys, ["report", str(damaged), "--out", str(tmp_path / "r.html")])
    assert "metrics.csv is damaged" in err and "UnicodeDecodeError" in err
    (damaged / "metrics.csv").write_text('{"trunc')
    err = _error(capsys, ["report", str(damaged), "--out", str(tmp_path / "r.html")])
    assert "metrics.csv is damaged" in err and "header" in err
    assert not (tmp_path / "r.html").exists()


# --- numbers, names and data paths (issue 13, items 8, 11, 12) ------------------------------------------------------

TRAIN = ["train", "--model", "fmnist_net", "--data", "tiny", "--epochs", "1", "--quiet", "--set", "threads=1"]


def _argument_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect argparse's exit 2 (a bad argument type), return the message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"cnnlab {argv[0]}: error: argument " in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra, words", [
    (["--set", "optim.lr=nan"], "optim.lr: 'nan' is not a finite number"),  # trained to NaN weights, exit 0
    (["--set", "epochs=inf"], "epochs: 'inf' is not a finite number"),  # an OverflowError traceback
    (["--set", "epochs=1e400"], "epochs: '1e400' is not a finite number"),
    (["--time-budget", "nan"], "--time-budget 'nan' is not a duration; expected seconds (300, 90s)"),
    (["--time-budget=-4m"], "--time-budget '-4m' is not a duration"),
    (["--time-budget", "0"], "--time-budget '0' must be a positive, finite duration"),
])
def test_train_refuses_non_finite_numbers_before_any_work(tmp_path, capsys, monkeypatch, extra, words):
    register_tiny(monkeypatch)
    err = _error(capsys, [*TRAIN, "--out-dir", str(tmp_path), "--name", "r", *extra])
    assert words in err
    assert list(tmp_path.iterdir()) == []  # no run folder, no results.json holding NaN


def test_time_budget_reaches_the_config():
    from cnnlab.cli.main import build_parser
    from cnnlab.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--model", "fmnist_net", "--time-budget", "1h30m"])
    assert config_from_args(args).time_budget == 5400.0
    args = build_parser().parse_args(["train", "--model", "fmnist_net"])
    assert config_from_args(args).time_budget == 0.0  # off unless asked


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_float_arguments_refuse_non_finite_numbers(tmp_path, capsys, value):
    err = _argument_error(capsys, [*TRAIN, "--out-dir", str(tmp_path), f"--lr={value}"])
    assert f"argument --lr: {value!r} is not a finite number" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag_value", [["--lr", "inf"], ["--member-weights", "1", "nan"]])
def test_other_commands_refuse_non_finite_numbers(capsys, flag_value):
    err = _argument_error(capsys, ["ensemble", "a", "b", *flag_value])
    assert f"argument {flag_value[0]}:" in err and "is not a finite number" in err


@pytest.mark.parametrize("name", ["../../x", "../x", "sub/x", "..", "/tmp/cnnlab-x"])
def test_a_run_name_cannot_escape_out_dir(tmp_path, capsys, monkeypatch, name):
    register_tiny(monkeypatch)
    out = tmp_path / "a" / "b" / "runs"
    out.mkdir(parents=True)
    err = _error(capsys, [*TRAIN, "--out-dir", str(out), "--name", name])
    assert f"--name {name!r} must be one folder name" in err and "out_dir" in err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/runs"]
    err = _error(capsys, ["search", "--model", "fmnist_net", "--data", "tiny", "--param", "optim.lr=uniform(0.01,0.1)",
                          "--out-dir", str(out), "--name", name])
    assert f"--name {name!r} must be one folder name" in err
    err = _error(capsys, [*TRAIN, "--out-dir", str(out), "--set", f"name={name}"])
    assert f"name {name!r} must be one folder name" in err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/runs"]


def test_data_that_is_a_file_or_no_folder(tmp_path, capsys, run_dir):
    (tmp_path / "notes.txt").write_text("x")
    for command in (TRAIN[:3], ["eval", str(run_dir)]):
        err = _error(capsys, [*command, "--data", str(tmp_path / "notes.txt")])
        assert f"--data {tmp_path / 'notes.txt'} is a file" in err and "does not exist" not in err
        assert "expected a dataset name (fashion_mnist" in err and "folder with one sub-folder of images per class" in err
        err = _error(capsys, [*command, "--data", str(tmp_path / "missing")])
        assert "no such folder" in err and "expected a dataset name" in err
    from cnnlab.data.folder import folder_splits

    with pytest.raises(CnnlabError, match="notes.txt is a file; expected a folder with one sub-folder"):
        folder_splits(tmp_path / "notes.txt")  # the same through the API (--set data.name=FILE)


@pytest.mark.parametrize("text, count", [("3x64", "2 numbers"), ("64", "1 number"), ("1x3x64x64", "4 numbers")])
def test_summary_input_must_be_chw(capsys, text, count):
    err = _error(capsys, ["summary", "simple_cnn", "--input", text])
    assert "--input must look like CxHxW" in err and count in err and "(B," not in err


def test_eval_top_k_that_covers_every_class_says_why(run_dir, capsys, monkeypatch):
    register_tiny(monkeypatch)
    assert main(["eval", str(run_dir), "--top", "3"]) == 0  # tiny has 3 classes
    out = capsys.readouterr().out
    assert "no top-3 accuracy: the run has 3 classes" in out and "1.0 by definition" in out and "--top 2" in out
    assert main(["eval", str(run_dir), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "top-2 " in out and "no top-" not in out
