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


def test_int8_export_of_a_run_folder_checked_against_fp32(tmp_path, capsys):
    assert main(["train", "--model", "fmnist_net", "--data", "tiny", "--epochs", "2", "--batch-size", "16",
                 "--out-dir", str(tmp_path), "--name", "r", "--quiet", "--set", "threads=1",
                 "--set", "plots=false"]) == 0
    capsys.readouterr()
    out, fp32 = tmp_path / "r8.onnx", tmp_path / "r32.onnx"
    assert main(["export", str(tmp_path / "r"), "--int8", "--calibration-batches", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibration: 64 training images of the run (not augmented)" in printed
    assert "top-1 agreement" in printed and "accuracy fp32" in printed and "int8 ONNX (QDQ)" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "r8.onnx"]  # no fp32 or temporary file left
    assert main(["export", str(tmp_path / "r"), "--out", str(fp32)]) == 0
    capsys.readouterr()
    assert out.stat().st_size < fp32.stat().st_size / 3
    # the oracle: onnxruntime's fp32 file against the int8 one, on the tiny test images
    from tests.engine._tiny import make_tiny

    x = (make_tiny().test_images.float() / 255)
    meta = ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    assert meta["cnnlab.int8"] == "post-training static" and json.loads(meta["cnnlab.classes"]) == ["tl", "centre", "br"]
    pre = json.loads(meta["cnnlab.preprocess"])
    assert pre  # the run's normalisation is recorded
    s8, s32 = ort.InferenceSession(str(out)), ort.InferenceSession(str(fp32))
    y8 = s8.run(None, {s8.get_inputs()[0].name: x.numpy()})[0]
    y32 = s32.run(None, {s32.get_inputs()[0].name: x.numpy()})[0]
    assert (y8.argmax(1) == y32.argmax(1)).mean() >= 0.9
    assert main(["export", str(tmp_path / "r"), "--int8", "--out", str(out)]) == 2
    assert "already exists; add --force" in capsys.readouterr().err


def test_int8_with_a_model_name_needs_calibration(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "fmnist_net", "--int8", "--out", str(out)]) == 2
    assert "--int8 with a model name needs calibration inputs" in capsys.readouterr().err
    import torch

    torch.save(torch.randn(8, 3, 28, 28), tmp_path / "cal.pt")
    assert main(["export", "fmnist_net", "--int8", "--calibration", str(tmp_path / "cal.pt"), "--out", str(out)]) == 2
    assert "has shape (8, 3, 28, 28); the model expects ('N', 1, 28, 28)" in capsys.readouterr().err
    assert main(["export", "fmnist_net", "--int8", "--calibration", "random", "--calibration-batches", "2",
                 "--out", str(out)]) == 0
    assert "64 standard-normal RANDOM inputs" in capsys.readouterr().out
    assert ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map["cnnlab.calibration"].startswith("64")
    assert main(["export", "fmnist_net", "--calibration", "random", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "go with --int8" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.pt", "m.onnx"]


def test_int8_pt2_saves_a_loadable_quantised_program(tmp_path, capsys):
    import torch

    out = tmp_path / "m.pt2"
    assert main(["export", "fmnist_net", "--int8", "--calibration", "random", "--calibration-batches", "2",
                 "--out", str(out)]) == 0
    assert "int8 torch.export program" in capsys.readouterr().out
    program = torch.export.load(str(out)).module()
    targets = {str(n.target) for n in program.graph.nodes}
    assert any("quantize_per_tensor" in t for t in targets)
    torch.manual_seed(0)
    from cnnlab.models import create_model

    model = create_model("fmnist_net").eval()  # the same random weights (seed 0) the command used
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref, got = model(x), program(x)
    assert (got - ref).abs().max() <= 0.15 * ref.abs().max()
