"""int8 post-training static quantisation: ONNX Runtime quantize_static and torchao PT2E, against fp32."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.compress.quantize import calibration_batches, quantize_onnx, quantize_pt2e
from cnnlab.export import to_onnx
from cnnlab.models import create_model
from tests.engine._tiny import register_tiny, tiny_config


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def _run(path, x, optimised=True) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimised:  # QDQ nodes run one by one in float: the reference arithmetic of the quantised graph
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _output_scale(path) -> float:
    """The scale of the DequantizeLinear that produces the graph's output (one output quantisation step)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = model.graph.output[0].name
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers[out]
    while node.op_type != "DequantizeLinear":  # e.g. a trailing Flatten/Reshape kept in float
        node = producers[node.input[0]]
    return float(inits[node.input[1]])


@pytest.fixture(scope="module")
def fmnist_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    torch.manual_seed(0)
    model = create_model("fmnist_net").eval()
    to_onnx(model, d / "fp32.onnx", input_size=(1, 28, 28))
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(16, 1, 28, 28, generator=g) for _ in range(4)]
    result = quantize_onnx(d / "fp32.onnx", d / "int8.onnx", cal)
    return model, d, result, cal


def test_int8_onnx_close_to_fp32_and_smaller(fmnist_files):
    model, d, result, _ = fmnist_files
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    got = _run(d / "int8.onnx", x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(got - ref).max() <= 0.15 * np.abs(ref).max()  # several layers' rounding, not a broken graph
    # the int8 kernels (fused, optimised session) against the graph's own QDQ arithmetic in float: a few steps
    step = _output_scale(d / "int8.onnx")
    assert np.abs(got - _run(d / "int8.onnx", x, optimised=False)).max() <= 4 * step
    # weights stored as int8: the file is close to 4x smaller than fp32
    assert result.size_bytes == (d / "int8.onnx").stat().st_size
    assert result.fp32_size_bytes == (d / "fp32.onnx").stat().st_size
    assert result.ratio > 3.0
    ops = {n.op_type for n in onnx.load(str(d / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "int8 ONNX" in str(result) and "calibrated on 64 images" in str(result)


def test_per_tensor_and_an_iterable_of_pairs(tmp_path):
    model = _tiny_net()
    to_onnx(model, tmp_path / "fp32.onnx", input_size=(1, 10, 10))
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(8, 1, 10, 10, generator=g), torch.zeros(8)) for _ in range(3)]  # a DataLoader's (x, y)
    r = quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", pairs, per_channel=False, method="percentile")
    assert r.calibration_images == 24 and "per tensor" in r.notes[0]
    x = torch.randn(16, 1, 10, 10, generator=g)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(_run(tmp_path / "int8.onnx", x) - ref).max() <= 0.15 * np.abs(ref).max()


@pytest.mark.parametrize("bad, message", [
    (torch.randn(4, 3, 28, 28), "(4, 3, 28, 28); the model expects ('N', 1, 'H', 'W')"),
    ([torch.randn(4, 1, 28, 28), torch.randn(4, 1, 32, 32)], "batch 1 has shape (4, 1, 32, 32), batch 0 (4, 1, 28, 28); every batch must have the same"),
    (torch.randn(1, 28, 28), "expected a non-empty (N, C, H, W) tensor"),
    ([], "no batches"),
    (3, "expected a tensor (N, C, H, W)"),
])
def test_bad_calibration_refused(fmnist_files, tmp_path, bad, message):
    _, d, _, _ = fmnist_files
    with pytest.raises(CnnlabError) as e:
        quantize_onnx(d / "fp32.onnx", tmp_path / "int8.onnx", bad)
    assert message in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_dst_refused_unless_overwrite(fmnist_files):
    _, d, _, cal = fmnist_files
    before = (d / "int8.onnx").read_bytes()
    with pytest.raises(CnnlabError, match="already exists"):
        quantize_onnx(d / "fp32.onnx", d / "int8.onnx", cal)
    assert (d / "int8.onnx").read_bytes() == before
    with pytest.raises(CnnlabError, match="must not replace its fp32 source"):
        quantize_onnx(d / "fp32.onnx", d / "fp32.onnx", cal, overwrite=True)
    quantize_onnx(d / "fp32.onnx", d / "int8.onnx", cal[:1], overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["fp32.onnx", "int8.onnx"]  # no temporary left


def test_pt2e_qdq_agrees_with_fp32():
    model = _tiny_net()
    g = torch.Generator().manual_seed(0)
    cal = [torch.randn(8, 1, 10, 10, generator=g) for _ in range(3)]
    q = quantize_pt2e(model, cal, input_size=(1, 10, 10), lower=False)
    x = torch.randn(16, 1, 10, 10, generator=g)
    with torch.no_grad():
        ref, got = model(x), q(x)
    names = {str(n.target) for n in q.graph.nodes}
    assert any("quantize_per_tensor" in t for t in names) and any("dequantize_per_channel" in t for t in names)
    assert (got - ref).abs().max() <= 0.15 * ref.abs().max()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    with pytest.raises(CnnlabError, match=r"the model expects \('N', 1, 12, 12\)"):
        quantize_pt2e(model, cal, input_size=(1, 12, 12))


@pytest.mark.slow
def test_pt2e_lowered_agrees_with_fp32():
    model = _tiny_net()
    g = torch.Generator().manual_seed(0)
    cal = [torch.randn(8, 1, 10, 10, generator=g) for _ in range(3)]
    q = quantize_pt2e(model, cal)
    x = torch.randn(16, 1, 10, 10, generator=g)
    with torch.no_grad():
        ref = model(x)
    got = q(x)
    assert (got - ref).abs().max() <= 0.15 * ref.abs().max()
    assert q(x[:1]).shape == (1, 5)  # the batch stays dynamic


def test_calibration_batches_from_a_run_without_augmentation(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    from cnnlab.engine.trainer import train

    train(tiny_config(tmp_path, epochs=1))
    a = calibration_batches(tmp_path / "run", n_batches=3, batch_size=10)
    b = calibration_batches(tmp_path / "run", n_batches=3, batch_size=10)
    assert [tuple(x.shape) for x in a] == [(10, 1, 12, 12)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # no random flips or crops
    # normalised like training: the tiny images are mostly dark noise with one bright square
    flat = torch.cat(a)
    assert abs(float(flat.mean())) < 1.0 and float(flat.std()) > 0.3
    with pytest.raises(CnnlabError, match="n_batches and batch_size must be >= 1"):
        calibration_batches(tmp_path / "run", n_batches=0)


@pytest.mark.parametrize("saturates", [True, False])
def test_reduce_range_follows_the_cpu_unless_given(fmnist_files, tmp_path, monkeypatch, saturates):
    """7-bit weights where the CPU has no VNNI (8-bit ones can saturate ORT's int16 pair sums there), noted; the file
    still runs with its int8 kernels within a few steps of its own QDQ arithmetic."""
    import cnnlab._platform

    model, d, _, cal = fmnist_files
    monkeypatch.setattr(cnnlab._platform, "int8_may_saturate", lambda: saturates)
    r = quantize_onnx(d / "fp32.onnx", tmp_path / "auto.onnx", cal)
    assert any("reduce_range" in n for n in r.notes) == saturates
    forced = quantize_onnx(d / "fp32.onnx", tmp_path / "forced.onnx", cal, reduce_range=not saturates)
    assert not any("reduce_range" in n for n in forced.notes)  # given, not chosen: nothing to explain
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    for path, seven_bit in ((tmp_path / "auto.onnx", saturates), (tmp_path / "forced.onnx", not saturates)):
        got = _run(path, x)
        assert np.abs(got - _run(path, x, optimised=False)).max() <= 4 * _output_scale(path)
        w = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == 3]
        largest = max(int(np.abs(a.astype(np.int32)).max()) for a in w)  # int8 weights: 7-bit range is +-64
        assert (largest <= 64) == seven_bit
