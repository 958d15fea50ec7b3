"""Bad input across the CLI and the main API: a CnnlabError naming the value and what is expected, and no file
written or changed. (The CLI prints a CnnlabError as one line and exits 2; anything else is a traceback.)"""
from __future__ import annotations

import json

import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from tests.engine._tiny import register_tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One trained tiny run (1 epoch) shared by the tests that need a run folder."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        register_tiny(mp)
        assert main(["train", "--model", "fmnist_net", "--data", "tiny", "--epochs", "1", "--batch-size", "32",
                     "--out-dir", str(out), "--name", "r", "--quiet", "--set", "threads=1",
                     "--set", "plots=false"]) == 0
    return out / "r"


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
    # a missing parent folder is created, as run folders are
    assert main(["summary", "simple_cnn", "--output", str(tmp_path / "new" / "s.txt")]) == 0
    assert "simple_cnn" in (tmp_path / "new" / "s.txt").read_text()


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
    if not (run_dir / "best.json").exists():  # no validation split: only 'last'
        err = _error(capsys, ["eval", str(run_dir), "--checkpoint", "best"])
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
