"""A ZCA/PCA run keeps its whitening in the checkpoint: eval, predict, explain and featuremaps use it afterwards."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from cnnlab.data.bundle import preprocess_from_state
from cnnlab.data.preprocess import PCAWhiten
from cnnlab.engine.checkpoint import load_checkpoint, save_checkpoint
from cnnlab.engine.runs import load_run
from tests.engine._tiny import make_tiny, register_tiny


@pytest.fixture
def zca_run(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    assert main(["train", "--model", "fmnist_net", "--data", "tiny", "--epochs", "1", "--batch-size", "16",
                 "--out-dir", str(tmp_path), "--name", "z", "--quiet", "--set", "threads=1", "--set", "plots=false",
                 "--set", "data.normalize=zca"]) == 0
    image = make_tiny().test_images[1, 0].numpy()
    Image.fromarray(image).save(tmp_path / "x.png")
    return tmp_path / "z", tmp_path / "x.png"


def test_zca_run_is_usable_after_training(zca_run, tmp_path, capsys):
    run_dir, png = zca_run
    stored = load_file(run_dir / "last.state.safetensors")
    # the stored whitening is the one fitted on the training split (oracle: fit it again)
    ref = PCAWhiten.fit(make_tiny().train_images, zca=True)
    assert torch.equal(stored["preprocess.matrix"], ref.matrix) and torch.equal(stored["preprocess.mean"], ref.mean)
    run = load_run(run_dir)
    whiten = preprocess_from_state(run.preprocess)
    x = make_tiny().test_images[:4].float() / 255
    assert torch.equal(whiten(x), ref(x))
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["predict", str(run_dir), str(png), "--top", "2"]) == 0
    assert capsys.readouterr().out.startswith(str(png))
    assert main(["explain", str(run_dir), str(png), "--out", str(tmp_path / "cam.png")]) == 0
    assert main(["featuremaps", str(run_dir), str(png), "--out", str(tmp_path / "maps.png")]) == 0
    assert (tmp_path / "cam.png").is_file() and (tmp_path / "maps.png").is_file()


def test_a_run_saved_without_the_whitening_says_so(zca_run, capsys):
    run_dir, png = zca_run
    for tag in ("last", "best"):  # rewrite as checkpoints were before: no preprocess.* tensors
        path = run_dir / f"{tag}.state.safetensors"
        if path.is_file():
            token = json.loads((run_dir / f"{tag}.json").read_text())["token"]
            save_file({k: v for k, v in load_file(path).items() if not k.startswith("preprocess.")}, path,
                      metadata={"cnnlab_token": token})
    assert load_checkpoint(run_dir).preprocess == {}
    assert main(["predict", str(run_dir), str(png)]) == 2
    assert "ZCA whitening is not in its checkpoint" in capsys.readouterr().err


def test_checkpoint_round_trips_preprocess_tensors_and_reads_old_ones(tmp_path):
    model = torch.nn.Linear(2, 2)
    tensors = {"mean": torch.rand(4), "matrix": torch.rand(4, 4)}
    meta = {"preprocess": {"kind": "pca", "shape": [1, 2, 2]}}
    save_checkpoint(tmp_path / "a", "last", model, meta, preprocess=tensors)
    ckpt = load_checkpoint(tmp_path / "a")
    assert all(torch.equal(ckpt.preprocess[k], v) for k, v in tensors.items())
    assert ckpt.optimizer is None and ckpt.ema is None
    whiten = preprocess_from_state(ckpt.meta["preprocess"])  # the tensors ride along in the state
    assert torch.equal(whiten.matrix, tensors["matrix"]) and whiten.shape == (1, 2, 2)
    save_checkpoint(tmp_path / "b", "last", model, {"preprocess": {"kind": "standard", "mean": [0.5], "std": [0.2]}})
    old = load_checkpoint(tmp_path / "b")
    assert old.preprocess == {} and "tensors" not in old.meta["preprocess"]
    with pytest.raises(CnnlabError, match="damaged"):
        preprocess_from_state({"kind": "zca", "shape": [1, 3, 3]}, tensors)
