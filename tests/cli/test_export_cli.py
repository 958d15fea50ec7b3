"""`cnnlab export` from a model name and from a trained run folder; refusals exit 2 with the reason."""
from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from cnnlab.cli.main import main
from tests.engine._tiny import register_tiny


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def test_export_a_model_name_then_refuse_to_overwrite(tmp_path, capsys):
    out = tmp_path / "sub" / "lenet.onnx"
    assert main(["export", "lenet5", "--out", str(out), "--input-size", "1,32,32", "--num-classes", "3"]) == 0
    printed = capsys.readouterr().out
    for expected in (str(out), "MiB", "opset: 18", "dynamic axes:", "batch", "max |difference|"):
        assert expected in printed
    assert ort.InferenceSession(str(out)).get_outputs()[0].shape[-1] == 3
    before = out.read_bytes()
    assert main(["export", "lenet5", "--out", str(out), "--input-size", "1,32,32"]) == 2
    assert "already exists; add --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["export", "lenet5", "--out", str(out), "--format", "pt2", "--force", "--input-size", "1,32,32"]) == 0


@pytest.mark.parametrize("args, message", [
    (["resnet5", "--out", "x.onnx"], "did you mean"),
    (["lenet5", "--out", "x.bin"], "--format onnx or pt2"),
    (["lenet5", "--out", "x.onnx", "--input-size", "1,32"], "CxHxW"),
    (["lenet5", "--out", "x.onnx", "--num-classes", "0"], "--num-classes"),
])
def test_bad_arguments(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["export", *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_a_run_folder_with_its_classes(tmp_path, capsys):
    assert main(["train", "--model", "fmnist_net", "--data", "tiny", "--epochs", "1", "--batch-size", "16",
                 "--out-dir", str(tmp_path), "--name", "r", "--quiet", "--set", "threads=1",
                 "--set", "plots=false"]) == 0
    capsys.readouterr()
    out = tmp_path / "r.onnx"
    assert main(["export", str(tmp_path / "r"), "--out", str(out), "--fold-bn"]) == 0
    printed = capsys.readouterr().out
    assert "fmnist_net" in printed and "max |difference|" in printed
    session = ort.InferenceSession(str(out))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["cnnlab.classes"]) == ["tl", "centre", "br"]
    assert json.loads(meta["cnnlab.input_shape"]) == [1, 12, 12]
