"""The PSPNet paper preset (dilated ResNet-50, auxiliary head) exports: its encoder's early stop is skipped while
exporting. Oracle: the loaded .pt2 program against the PyTorch model on another image and batch size.
The ONNX export of every segmentation model is in test_onnx.py (CNNLAB_EXPORT_ALL=1)."""
from __future__ import annotations

import torch

import cnnlab
from cnnlab.export import to_pt2


def test_pspnet_paper_preset_exports_both_outputs(tmp_path):
    torch.manual_seed(0)
    model = cnnlab.create_model("pspnet", num_classes=3).eval()  # no backbone: the paper's preset on resnet50
    assert model.aux_head is not None and model.config.output_stride == 8
    result = to_pt2(model, tmp_path / "psp.pt2", input_size=(3, 64, 64))
    assert result.max_abs_diff <= result.tolerance
    program = torch.export.load(str(tmp_path / "psp.pt2")).module()
    x = torch.randn(3, 3, 72, 56)  # another batch and size than traced (dynamic axes)
    with torch.no_grad():
        expected, got = model(x), program(x)
    assert set(got) == {"out", "aux"} and got["out"].shape == (3, 3, 72, 56)
    for key in ("out", "aux"):
        scale = max(1.0, expected[key].abs().max().item())
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4 * scale)
