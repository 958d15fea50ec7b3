"""`cnnlab summary`, `cnnlab compare`, `cnnlab gradflow`."""
from __future__ import annotations

import csv
import io
import json

import pytest

from cnnlab.analysis import summary
from cnnlab.cli.main import main


def test_summary_table(capsys):
    assert main(["summary", "lenet5"]) == 0
    out = capsys.readouterr().out
    expected = summary("lenet5")
    assert f"params: {expected.totals.params:,}" in out and "FLOPs" in out and "conventions:" in out
    assert "1x32x32" in out


@pytest.mark.parametrize("fmt", ["csv", "json", "md"])
def test_summary_formats(capsys, fmt):
    assert main(["summary", "simple_cnn", "--format", fmt, "--depth", "1"]) == 0
    out = capsys.readouterr().out
    expected = summary("simple_cnn", depth=1)
    if fmt == "json":
        data = json.loads(out)
        assert data["totals"]["macs"] == expected.totals.macs and len(data["rows"]) == len(expected.rows)
    elif fmt == "csv":
        assert len(list(csv.DictReader(io.StringIO(out)))) == len(expected.rows)
    else:
        assert out.startswith("**simple_cnn**") and out.count("\n|") == len(expected.rows) + 2


def test_summary_input_and_output_file(tmp_path, capsys):
    path = tmp_path / "s.json"
    assert main(["summary", "resnet18", "--input", "3x64x64", "--format", "json", "-o", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["input_size"] == [3, 64, 64] and data["totals"]["macs"] == summary("resnet18", (3, 64, 64)).totals.macs


@pytest.mark.parametrize("argv,message", [
    (["summary", "resnet5"], "did you mean"),
    (["summary", "lenet5", "--input", "3by32"], "--input must look like"),
    (["summary", "lenet5", "--input", "3x0x32"], "--input must look like"),
    (["summary", "lenet5", "--optimizer", "lion"], "unknown optimizer"),
    (["compare", "lenet5", "nosuchnet"], "unknown model"),
    (["gradflow", "lenet5", "--batch-size", "0"], "--batch-size"),
])
def test_bad_arguments(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_compare(tmp_path, capsys):
    plot, table = tmp_path / "c.png", tmp_path / "c.csv"
    assert main(["compare", "lenet5", "simple_cnn", "--plot", str(plot), "--csv", str(table)]) == 0
    out = capsys.readouterr().out
    assert "lenet5" in out and "simple_cnn" in out and "latency" not in out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(table.open()))
    assert [r["name"] for r in rows] == ["lenet5", "simple_cnn"]
    assert int(rows[0]["macs"]) == summary("lenet5").totals.macs


def test_compare_bench(tmp_path, capsys):
    assert main(["compare", "lenet5", "simple_cnn", "--bench", "--repeats", "2", "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "latency" in out and out.count(" ms") >= 2


def test_gradflow(tmp_path, capsys):
    plot = tmp_path / "g.png"
    assert main(["gradflow", "simple_cnn", "--batch-size", "4", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "stages.0.0.conv" in out or "Conv2d" in out
    assert "dead ReLU" in out and plot.read_bytes()[:4] == b"\x89PNG"
