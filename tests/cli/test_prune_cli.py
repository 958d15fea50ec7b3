"""``cnnlab prune`` on a tiny trained run: a new folder with the pruned weights, the table and the curve."""
from __future__ import annotations

import csv
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

import cnnlab
from cnnlab.cli.main import main
from cnnlab.compress.prune import rebuild_pruned
from cnnlab.engine.runs import load_run
from tests.engine._tiny import register_tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        register_tiny(mp)
        assert main(["train", "--model", "fmnist_net", "--data", "tiny", "--epochs", "1", "--batch-size", "32",
                     "--out-dir", str(out), "--name", "r", "--quiet", "--set", "threads=1",
                     "--set", "plots=false"]) == 0
    return out / "r"


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_unstructured_curve_with_finetuning_leaves_the_source_run_alone(run_dir, tmp_path, capsys):
    before = _digest(run_dir)
    out = tmp_path / "pruned"
    assert main(["prune", str(run_dir), "--amount", "0.25,0.5", "--steps", "2", "--finetune-epochs", "1",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert _digest(run_dir) == before
    rows = _rows(out / "prune.csv")
    assert [float(r["amount"]) for r in rows] == [0.25, 0.5]
    assert (out / "sparsity_accuracy.png").stat().st_size > 0
    for row in rows:
        folder = out / f"amount-{float(row['amount']):g}"
        assert sorted((folder / "finetune").iterdir())[-1].name == "step-2"  # fine-tuned after each of 2 steps
        # an ordinary run folder: its weights load into the unpruned architecture, zeros included
        loaded = load_run(folder)
        weights = [m.weight for m in loaded.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(float(row["amount"]), abs=0.002)
        assert float(row["sparsity"]) == pytest.approx(zeros, abs=1e-6)
        assert row["params_after"] == row["params_before"]  # zeros are still stored
        assert 0 <= float(row["test_acc_after"]) <= 1
    printed = capsys.readouterr().out
    assert "acc before" in printed and "curve:" in printed


def test_structured_prune_shrinks_and_rebuilds(run_dir, tmp_path):
    out = tmp_path / "channels"
    assert main(["prune", str(run_dir), "--amount", "0.5", "--structured", "--finetune-epochs", "1",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["params_after"] < 0.5 * report["params_before"]
    assert report["macs_after"] < 0.5 * report["macs_before"]
    meta = json.loads((out / "best.json").read_text())
    state = load_file(out / "best.safetensors")
    model = rebuild_pruned(cnnlab.create_model("fmnist_net", num_classes=3, in_channels=1),
                           meta["pruned_structure"], state)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert model.eval()(torch.zeros(2, 1, 12, 12)).shape == (2, 3)
    loaded = load_run(out)  # what cnnlab eval / predict / export open: the pruned shapes, the pruned weights
    assert sum(p.numel() for p in loaded.model.parameters()) == report["params_after"]
    x = torch.rand(2, 1, 12, 12)
    assert torch.allclose(loaded.model(x), model(x), atol=1e-6)


@pytest.mark.parametrize(("amount", "shown"), [("1.0", "1.0"), ("-0.5", "-0.5"), ("0.2,x", "'x'")])
def test_bad_amount_is_refused_before_any_work(run_dir, tmp_path, capsys, amount, shown):
    out = tmp_path / "never"
    assert main(["prune", str(run_dir), "--amount", amount, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert shown in err and "[0, 1)" in err and "Traceback" not in err
    assert not out.exists()


def test_out_folder_that_holds_files_or_is_the_source_is_refused(run_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    assert main(["prune", str(run_dir), "--amount", "0.5", "--out", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["prune", str(run_dir), "--amount", "0.5", "--out", str(run_dir / "sub")]) == 2
    assert "inside the source run" in capsys.readouterr().err
    assert main(["prune", str(run_dir), "--amount", "0.5", "--ignore", "conv9", "--out", str(tmp_path / "o")]) == 2
    assert "'conv9'" in capsys.readouterr().err
