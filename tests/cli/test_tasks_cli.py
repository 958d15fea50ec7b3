"""`cnnlab train/eval/predict/models` for a second task: the reconstruction run of conv_autoencoder."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli.main import main
from tests.engine._tiny import make_tiny, register_tiny


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def test_a_reconstruction_run_from_the_command_line(tmp_path, capsys):
    args = ["train", "--model", "conv_autoencoder", "--data", "tiny", "--epochs", "2", "--batch-size", "16",
            "--out-dir", str(tmp_path), "--name", "ae", "--quiet", "--set", "threads=1", "--set", "plots=false",
            "--set", "optim.optimizer=adam", "--set", "optim.lr=0.003", "--set", "data.val_fraction=0.25",
            "--set", "monitor=val_psnr", "--set", "loss=bce"]
    assert main(args) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "ae" / "results.json").read_text())
    printed = re.search(r"test loss (\d+\.\d+), psnr (\d+\.\d+) on 30 images", out)
    assert printed, out
    assert float(printed[2]) == round(saved["test_psnr"], 4) and saved["loss"] == "bce"
    # eval reproduces results.json (the run's own split fits the normalisation, as in training)
    assert main(["eval", str(tmp_path / "ae")]) == 0
    out = capsys.readouterr().out
    assert "(best checkpoint, epoch" in out and f"psnr {saved['test_psnr']:.4f}" in out
    image = make_tiny().test_images[0, 0].numpy()
    Image.fromarray(image).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "ae"), str(tmp_path / "x.png")]) == 0
    assert re.search(r"x\.png: reconstructed at \d+\.\d\d dB PSNR", capsys.readouterr().out)


def test_models_lists_by_task_and_train_refuses_a_mismatched_task(tmp_path, capsys):
    assert main(["models", "--task", "reconstruction"]) == 0
    out = capsys.readouterr().out
    assert "conv_autoencoder" in out and "resnet50" not in out
    assert main(["train", "--model", "conv_autoencoder", "--data", "tiny", "--out-dir", str(tmp_path),
                 "--set", "task=classification"]) == 2
    assert "conv_autoencoder is a reconstruction model" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_a_classification_eval_reproduces_results_json_with_a_validation_split(tmp_path, capsys):
    assert main(["train", "--model", "fmnist_net", "--data", "tiny", "--epochs", "2", "--batch-size", "16",
                 "--out-dir", str(tmp_path), "--name", "c", "--quiet", "--set", "threads=1", "--set", "plots=false",
                 "--set", "data.val_fraction=0.25"]) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    assert main(["eval", str(tmp_path / "c")]) == 0
    assert f"accuracy {saved['test_accuracy']:.4f}" in capsys.readouterr().out
    assert np.isclose(saved["test_metrics"]["acc"], saved["test_accuracy"])
