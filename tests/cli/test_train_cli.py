"""`cnnlab train`, `eval`, `predict` and `demo` end to end on tiny data."""
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


def _train(tmp_path, *extra):
    return main(["train", "--model", "fmnist_net", "--data", "tiny", "--epochs", "2", "--batch-size", "16",
                 "--out-dir", str(tmp_path), "--name", "r", "--quiet", "--set", "threads=1", "--set", "plots=false", *extra])


def test_train_eval_predict(tmp_path, capsys):
    assert _train(tmp_path, "--set", "optim.lr=0.05", "--set", "data.val_fraction=0.2") == 0
    out = capsys.readouterr().out
    assert f"run folder: {tmp_path / 'r'}" in out
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    printed = re.search(r"test accuracy (\d\.\d{4}).* on (\d+) images", out)
    assert printed and float(printed[1]) == round(saved["test_accuracy"], 4) and int(printed[2]) == 30
    assert saved["test_accuracy"] >= 0.6  # chance is 1/3; 18 of 30 by luck has p < 1e-3 (measured 0.67)
    assert main(["eval", str(tmp_path / "r"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "best checkpoint" in out and "precision" in out and "confusion matrix" in out
    evaluated = re.search(r"accuracy (\d\.\d{4})   top-2 (\d\.\d{4})", out)
    assert evaluated and float(evaluated[1]) == float(printed[1])  # eval of the finished run = what train reported
    assert float(evaluated[1]) <= float(evaluated[2]) <= 1
    image = make_tiny().test_images[1, 0].numpy()  # a 'centre' example, saved as an RGB file of another size
    Image.fromarray(np.stack([image] * 3, -1)).resize((24, 24), Image.NEAREST).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "r"), str(tmp_path / "x.png"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    shown = re.fullmatch(rf"{re.escape(str(tmp_path / 'x.png'))}: (\w+) \((\d+\.\d)%\), (\w+) \((\d+\.\d)%\)\n", out)
    assert shown, out
    assert shown[1] == "centre" and shown[3] != "centre"  # the right class first (the test split's centre: recall 1)
    assert 100 >= float(shown[2]) >= float(shown[4]) >= 0 and float(shown[2]) + float(shown[4]) <= 100.05


def test_resume_from_the_cli(tmp_path, capsys):
    assert _train(tmp_path, "--set", "optim.schedule=step") == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--epochs", "3", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert _train(tmp_path, "--name", "oc") == 0  # one-cycle is laid over the run's length: more epochs refused
    assert main(["train", "--resume", str(tmp_path / "oc"), "--epochs", "3", "--quiet"]) == 2
    assert "epochs: 2 -> 3 (the onecycle schedule is laid over" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lrr=1"], "did you mean optim.lr"),
    (["--set", "epochs=x"], "cannot read 'x' as int"),
    (["--data", "fashon_mnist"], "did you mean fashion_mnist"),
    (["--model", "fmnist_nett"], "did you mean fmnist_net"),
])
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys, args, message):
    assert _train(tmp_path, *args) == 2
    assert message in capsys.readouterr().err


def test_eval_and_predict_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _train(tmp_path) == 0
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main(["predict", str(tmp_path / "r"), str(tmp_path / "bad.png")]) == 2
    assert "bad.png" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "r"), "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "the run was trained on" in err


def test_demo_quick_pipeline_runs(tmp_path, capsys):
    from cnnlab.engine.recipes import demo_config

    full = demo_config()
    assert full.data.name == "fashion_mnist" and full.model.name == "fmnist_fast" and full.epochs == 18
    assert demo_config(quick=True).data.flip is False  # digits: no mirror images
    assert main(["demo", "--quick", "--out-dir", str(tmp_path), "--quiet", "--set", "epochs=1",
                 "--set", "data.train_limit=256", "--set", "plots=false", "--set", "threads=1"]) == 0
    out = capsys.readouterr().out
    assert "fmnist_net on mnist_5k: test accuracy" in out and "1,000 test images" in out and "run folder:" in out


def _image_folder(root, size=(20, 16)):
    rng = np.random.default_rng(0)
    for c, value in (("dark", 30), ("light", 220)):
        (root / c).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(value, 20, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def test_train_on_an_image_folder_then_predict(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs")
    assert main(["train", "--model", "fmnist_net", "--data", str(root), "--epochs", "2", "--batch-size", "4",
                 "--out-dir", str(tmp_path), "--name", "f", "--quiet", "--set", "data.image_size=16",
                 "--set", "data.num_workers=0", "--set", "threads=1", "--set", "data.flip=true"]) == 0
    out = capsys.readouterr().out
    assert "on 4 images" in out  # every 5th of 20 images is test
    assert main(["predict", str(tmp_path / "f"), str(root / "light" / "3.png")]) == 0
    assert capsys.readouterr().out.split(": ", 1)[1].startswith("light (")  # the top class comes first
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out-dir", str(tmp_path), "--quiet"]) == 2
    assert "no class sub-folders" in capsys.readouterr().err


def test_channel_conflict_is_named(tmp_path, capsys):
    assert _train(tmp_path, "--set", 'model.options={"in_channels": 3}') == 2
    assert "in_channels=3" in capsys.readouterr().err
