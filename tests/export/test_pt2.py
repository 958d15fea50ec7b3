"""torch.export ``.pt2``: the saved program loads back and gives PyTorch's outputs, at another batch size too."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.export import to_pt2


class Noisy(nn.Module):
    """Fresh noise at each call: the loaded program's outputs differ from PyTorch's, a real mismatch."""

    def forward(self, x):
        return x + 1e-2 * torch.randn_like(x)


def test_round_trip_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = cnnlab.create_model("simple_cnn_bn", num_classes=4).eval()
    path = tmp_path / "m.pt2"
    result = to_pt2(model, path, input_size=(1, 32, 32), metadata={"classes": "a,b,c,d"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
    assert result.max_abs_diff <= result.tolerance and result.dynamic_axes["input"][0] == "batch"
    extra = {"classes": ""}
    loaded = torch.export.load(str(path), extra_files=extra)
    assert extra["classes"] == "a,b,c,d"
    x = torch.randn(5, 1, 32, 32)  # another batch size than traced
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_bad_input_leaves_no_file(tmp_path):
    path = tmp_path / "n.pt2"
    with pytest.raises(CnnlabError, match="differs from PyTorch.*not written"):
        to_pt2(Noisy(), path, input_size=(3, 4, 4))
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old")
    with pytest.raises(CnnlabError, match="already exists"):
        to_pt2(nn.Conv2d(3, 3, 1), path, input_size=(3, 4, 4))
    to_pt2(nn.Conv2d(3, 3, 1), path, input_size=(3, 4, 4), overwrite=True)
    assert path.read_bytes() != b"old"
    with pytest.raises(CnnlabError, match="is a folder"):
        to_pt2(nn.Conv2d(3, 3, 1), tmp_path, input_size=(3, 4, 4))


def _rerun(again, exact):
    return lambda: ([again], [exact])


def test_float32_rounding_above_the_tolerance_passes_only_as_exact_as_pytorch():
    from cnnlab.export.pt2 import compare

    exact = torch.linspace(-1, 1, 50, dtype=torch.float64)  # largest |value| 1: the plain tolerance is 1e-4
    ours = (exact + 3e-4).float()  # PyTorch float32's own error: 3e-4 (a very deep network's rounding, say)
    notes: list[str] = []
    # the file is 2e-4 off float64 (less than PyTorch's own 3e-4) but 5e-4 from PyTorch: it passes, with a note
    diff, tolerance = compare(ours, [(exact - 2e-4).float()], 1e-4, "f", rerun=_rerun(ours, exact), notes=notes)
    assert diff == pytest.approx(5e-4, rel=1e-3) and tolerance == pytest.approx(9e-4, rel=1e-3)
    assert len(notes) == 1 and "float32 error against float64 is 0.0003" in notes[0]
    # without the float64 run, or when the file is more than twice as far from float64 as PyTorch: refused
    with pytest.raises(CnnlabError, match="differs from PyTorch by 0.0005.*not written"):
        compare(ours, [(exact - 2e-4).float()], 1e-4, "f")
    with pytest.raises(CnnlabError, match=r"against float64, 0.001, is 3.33x PyTorch float32's own"):
        compare(ours, [(exact - 1e-3).float()], 1e-4, "f", rerun=_rerun(ours, exact))
    # PyTorch not repeating itself is not rounding (randomness left in eval mode): refused
    with pytest.raises(CnnlabError, match="PyTorch itself gives outputs 0.0005 apart"):
        compare(ours, [(exact - 2e-4).float()], 1e-4, "f", rerun=_rerun((exact - 2e-4).float(), exact))

    def cannot():
        raise RuntimeError("no float64 kernel")

    with pytest.raises(CnnlabError, match="differs from PyTorch by 0.0005.*tolerance 0.0001"):
        compare(ours, [(exact - 2e-4).float()], 1e-4, "f", rerun=cannot)
