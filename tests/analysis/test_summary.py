"""``summary`` on hand-made modules: each counting rule against its textbook formula, exports, errors."""
from __future__ import annotations

import csv
import io
import json

import pytest
import torch
import torchvision
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.analysis import summary


def _one(module: nn.Module, size: tuple) -> object:
    s = summary(module, size, training_memory=False)
    return s


@pytest.mark.parametrize(
    "layer,size,expected",
    [
        # each expected value is the textbook formula, written out
        (nn.Conv2d(8, 16, 3, padding=1), (8, 10, 12), 16 * 10 * 12 * 8 * 3 * 3),
        (nn.Conv2d(8, 16, 3, stride=2, dilation=2, groups=4), (8, 21, 21), 16 * 9 * 9 * (8 // 4) * 3 * 3),
        (nn.Conv1d(4, 6, 5), (4, 20), 6 * 16 * 4 * 5),
        (nn.Conv3d(2, 3, (1, 3, 3)), (2, 4, 6, 6), 3 * 4 * 4 * 4 * 2 * 1 * 3 * 3),
        # transposed conv: every input element scatters into C_out/groups * k*k outputs
        (nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), (8, 5, 5), 8 * 5 * 5 * 4 * 4 * 4),
        (nn.Linear(20, 7), (3, 20), 3 * 20 * 7),
        (nn.BatchNorm2d(5), (5, 4, 4), 5 * 4 * 4),
        (nn.GroupNorm(2, 4), (4, 3, 3), 4 * 3 * 3),
        (nn.LocalResponseNorm(5), (8, 4, 4), 8 * 4 * 4 * 5),
        (nn.MaxPool2d(2), (3, 8, 8), 0),
        (nn.AdaptiveAvgPool2d(1), (3, 8, 8), 0),
        (nn.Upsample(scale_factor=2, mode="bilinear"), (3, 4, 4), 0),
        (nn.ReLU(), (3, 4, 4), 0),
    ],
)
def test_layer_rules(layer: nn.Module, size: tuple, expected: int) -> None:
    s = _one(layer, size)
    assert s.totals.macs == expected
    assert s.totals.params == sum(p.numel() for p in layer.parameters())
    assert not s.totals.uncounted


def test_attention_is_counted() -> None:
    class Attn(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E)
            return nn.functional.scaled_dot_product_attention(x, x, x) + torch.matmul(x, x.transpose(1, 2)) @ x

    s = _one(Attn(), (6, 4))
    assert s.totals.macs == 6 * 6 * (4 + 4) + 6 * 6 * 4 + 6 * 6 * 4


def test_multihead_attention_is_counted() -> None:
    class SelfAttn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, N, E)
            return self.mha(x, x, x)[0]

    length, embed = 5, 8
    s = _one(SelfAttn(), (length, embed))  # batch dim 1 becomes L: input (1, 5, 8) = (L=1? no: L, N, E)
    batch_first = s.input_size  # (5, 8) -> tensor (1, 5, 8): L=1, N=5, E=8
    L, N, E = 1, length, embed
    projections = L * E * E + 2 * L * E * E + L * E * E  # q, k, v in-projections and the out-projection
    attention = 2 * L * L * E  # Q K^T and A V, all heads together
    assert batch_first == (5, 8) and s.totals.macs == N * (projections + attention)


def test_unknown_op_is_listed_never_zero() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(self.conv(x), -1)  # no rule for cumsum

    s = _one(Odd(), (3, 8, 8))
    assert s.totals.uncounted == {"cumsum": ["(model)"]}
    assert "UNCOUNTED" in s.table() and "cumsum" in s.table()
    row = [r for r in s.rows if r.uncounted][0]
    assert row.uncounted == ["cumsum"] and "+?" in s.table()


def test_depth_folding_keeps_totals() -> None:
    full = summary("resnet50", (3, 64, 64), training_memory=False)
    for depth in (0, 1, 2):
        s = summary("resnet50", (3, 64, 64), depth=depth, training_memory=False)
        assert sum(r.macs for r in s.rows) == full.totals.macs
        assert sum(r.params for r in s.rows) == full.totals.params
        assert sum(r.act_elements for r in s.rows) + s.totals.input_elements == full.totals.act_elements
        assert all(r.name.count(".") < depth or depth == 0 for r in s.rows)


def test_meta_and_real_runs_agree() -> None:
    torch.manual_seed(0)
    model = cnnlab.create_model("resnet18")
    real = summary(model, (3, 64, 64))
    meta = summary("resnet18", (3, 64, 64))
    assert [(r.name, r.output_shape, r.macs, r.act_elements, r.rf) for r in real.rows] == \
        [(r.name, r.output_shape, r.macs, r.act_elements, r.rf) for r in meta.rows]
    # autograd saves the same tensors either way (BN's per-channel statistics aside)
    assert meta.totals.saved_bytes == pytest.approx(real.totals.saved_bytes, rel=0.01)
    assert model.training  # restored


def test_activation_memory_convention() -> None:
    # conv -> in-place ReLU (no new memory) -> non-in-place ReLU (new) -> flatten (a view)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True), nn.ReLU(), nn.Flatten())
    s = _one(model, (1, 4, 4))
    by_name = {r.name: r for r in s.rows}
    assert by_name["0"].act_elements == 2 * 16 and by_name["1"].act_elements == 0
    assert by_name["2"].act_elements == 2 * 16 and by_name["3"].act_elements == 0
    assert s.totals.act_elements == 16 + 2 * 16 * 2 and s.totals.act_bytes == 4 * s.totals.act_elements


def test_training_memory_formula() -> None:
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    s = summary(model, (3, 10), batch_size=4, optimizer="adam")
    assert s.totals.param_bytes == 4 * 132
    assert s.training_memory() == 4 * 132 * (2 + 2) + 4 * s.totals.saved_bytes
    half = summary(model, (3, 10), batch_size=4, dtype=torch.float16, optimizer="sgd")
    assert half.totals.param_bytes == 2 * 132 and half.training_memory() == 2 * 132 * 2 + 4 * half.totals.saved_bytes
    assert half.totals.saved_bytes == s.totals.saved_bytes // 2


def test_exports() -> None:
    s = summary("simple_cnn")
    rows = list(csv.DictReader(io.StringIO(s.to_csv())))
    assert len(rows) == len(s.rows) and int(rows[0]["macs"]) == s.rows[0].macs
    data = json.loads(s.to_json())
    assert data["totals"]["params"] == s.totals.params and data["totals"]["flops"] == 2 * s.totals.macs
    assert len(data["rows"]) == len(s.rows) and "conventions" in data
    md = s.to_markdown()
    assert md.count("\n|") == len(s.rows) + 2 and "FLOPs" in md
    text = str(s)
    assert "conventions:" in text and "FLOPs" in text and "2 x MACs" in text


def test_export_to_files(tmp_path) -> None:
    s = summary("lenet5")
    s.to_csv(tmp_path / "a.csv")
    s.to_json(tmp_path / "a.json")
    assert (tmp_path / "a.csv").read_text().startswith("name,type")
    assert json.loads((tmp_path / "a.json").read_text())["model"] == "lenet5"


def test_user_module_from_torchvision() -> None:
    model = torchvision.models.mobilenet_v3_small()
    s = summary(model, (3, 64, 64), training_memory=False)
    assert s.totals.params == sum(p.numel() for p in model.parameters())
    assert not s.totals.uncounted


def test_unrun_modules_still_count_parameters() -> None:
    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main, self.aux = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.main(x)

    s = _one(WithAux(), (4,))
    assert s.totals.params == 20 + 15
    assert any(r.name == "aux" and "not run" in r.type for r in s.rows)


@pytest.mark.parametrize("kwargs", [dict(input_size=(3, 0, 5)), dict(input_size=()), dict(depth=-1),
                                    dict(optimizer="lion"), dict(batch_size=0), dict(dtype=torch.int8)])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(CnnlabError):
        summary("lenet5", **kwargs)


def test_bad_model() -> None:
    with pytest.raises(CnnlabError, match="did you mean"):
        summary("resnet5")
    with pytest.raises(CnnlabError, match="nn.Module"):
        summary(42)  # type: ignore[arg-type]
    with pytest.raises(CnnlabError, match="cannot run"):
        summary(nn.Conv2d(3, 4, 3), (5, 8, 8))
