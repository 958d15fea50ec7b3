"""``cnnlab prune`` on a tiny trained run: a new folder with the pruned weights, the table and the curve."""
from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser

import pytest
import torch
from safetensors.torch import load_file

import cnnlab
from cnnlab.cli.main import main
from cnnlab.compress.prune import rebuild_pruned
from cnnlab.engine.runs import load_run
from tests.cli.test_source_run_untouched import snapshot
from tests.engine._tiny import register_tiny, train_tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("runs"), "plots=false")


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


class _Tables(HTMLParser):
    """The cells of each <table id=...> of a page, and the embedded PNGs."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.pngs: list[bytes] = []
        self._id, self._cell = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._id = attrs.get("id")
            self.tables[self._id] = []
        elif tag == "tr" and self._id is not None:
            self.tables[self._id].append([])
        elif tag in ("td", "th") and self._id is not None:
            self._cell = ""
        elif tag == "img":
            self.pngs.append(base64.b64decode(attrs["src"].split(",", 1)[1]))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._id][-1].append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._id = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _pruning_table(folder) -> tuple[dict[str, list[str]], list[bytes]]:
    """{amount: cells} of the Pruning section of folder/report.html (header row keyed "amount"), and its PNGs."""
    page = _Tables((folder / "report.html").read_text(encoding="utf-8"))
    return {row[0]: row[1:] for row in page.tables["pruning"]}, page.pngs


def _expected_cells(row: dict) -> list[str]:
    """What the page must show for one prune.csv row, formatted by hand (the oracle for the template)."""
    latency = float(row["latency_ms_after"])
    return [f"{int(row['params_after']):,}", f"{int(row['macs_after']):,}", f"{float(row['sparsity']):.1%}",
            f"{latency:.2f}", f"{float(row['test_acc_after']):.2%}", f"{int(row['dense_bytes']):,}",
            f"{int(row['csr_bytes']):,}", f"{int(row['bitmask_bytes']):,}", f"{int(row['file_bytes']):,}"]


def test_unstructured_curve_with_finetuning_leaves_the_source_run_alone(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    out = tmp_path / "pruned"
    assert main(["prune", str(run_dir), "--amount", "0.25,0.5", "--steps", "2", "--finetune-epochs", "1",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert snapshot(run_dir) == before
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
    assert "acc before" in printed and "curve:" in printed and f"report: {out / 'report.html'}" in printed
    # the report of the new folder: one row per amount after the source's, the numbers prune.csv holds, the curve
    table, pngs = _pruning_table(out)
    assert list(table) == ["amount", "source (unpruned)", "0.25", "0.5"]
    assert table["amount"][:5] == ["parameters", "MACs per image", "sparsity", "latency (ms)", "test accuracy"]
    for row in rows:
        assert table[f"{float(row['amount']):g}"] == _expected_cells(row)
        assert int(row["file_bytes"]) == (out / f"amount-{float(row['amount']):g}" / "best.safetensors").stat().st_size
        sub, _ = _pruning_table(out / f"amount-{float(row['amount']):g}")  # each amount's own folder has its page
        assert list(sub) == ["amount", "source (unpruned)", f"{float(row['amount']):g}"]
    source = table["source (unpruned)"]
    assert source[0] == f"{int(rows[0]['params_before']):,}" and source[4] == f"{float(rows[0]['test_acc_before']):.2%}"
    assert pngs == [(out / "sparsity_accuracy.png").read_bytes()]
    # `cnnlab report NEWRUN` writes the same section again
    first = (out / "report.html").read_text()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert _pruning_table(out) == (table, pngs)
    assert "Written by <code>cnnlab prune</code>" in first and "Learning curves" not in first


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
    table, pngs = _pruning_table(out)  # one amount: the folder's page, no curve
    assert table["0.5"] == _expected_cells(_rows(out / "prune.csv")[0]) and pngs == []
    assert table["0.5"][0] == f"{report['params_after']:,}"
    assert report["latency_ms_after"] > 0 and report["latency"]["repeats"] == 20


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
    assert main(["prune", str(run_dir), "--amount", "0.5", "--latency-repeats", "-1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--latency-repeats must be >= 0" in capsys.readouterr().err
