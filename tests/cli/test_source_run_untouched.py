"""Compressing or exporting a run folder never modifies it: every file's bytes and mtime, and the file list, are the
same after `cnnlab prune` (unstructured and structured, with fine-tuning) and `cnnlab export` (ONNX, BN folded, pt2)."""
from __future__ import annotations

import hashlib
import os

import pytest

from cnnlab.cli.main import main
from tests.engine._tiny import register_tiny, train_tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 1-epoch run with a validation split and its plots and report (every kind of file a run has)."""
    return train_tiny_run(tmp_path_factory.mktemp("runs"), "data.val_fraction=0.2")


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def snapshot(folder) -> dict[str, tuple]:
    """{relative path: (sha256, size, mtime_ns, mode)} of every file, and each folder (so nothing added passes)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        st = os.stat(path, follow_symlinks=False)
        key = str(path.relative_to(folder))
        state[key] = ("dir", st.st_mtime_ns) if path.is_dir() else (
            hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns, st.st_mode)
    return state


def test_the_snapshot_sees_a_change_of_bytes_mtime_or_a_new_file(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    before = snapshot(tmp_path)
    os.utime(tmp_path / "a.json", ns=(0, 1))  # the same bytes, another mtime
    assert snapshot(tmp_path) != before
    before = snapshot(tmp_path)
    (tmp_path / "a.json").write_text("{ }")
    os.utime(tmp_path / "a.json", ns=(0, 1))  # other bytes, the same mtime
    assert snapshot(tmp_path) != before
    before = snapshot(tmp_path)
    (tmp_path / ".lock").touch()
    assert snapshot(tmp_path) != before


def test_the_run_has_every_kind_of_file(run_dir):
    names = set(snapshot(run_dir))
    assert {"config.json", "metrics.csv", "results.json", "report.html", "curves.png", "best.json",
            "best.safetensors", "last.json", "last.safetensors"} <= names


@pytest.mark.parametrize("args", [
    ["--amount", "0.25,0.5"],
    ["--amount", "0.5", "--structured", "--finetune-epochs", "1", "--latency-repeats", "2"],
    ["--amount", "0.5", "--steps", "2", "--finetune-epochs", "1", "--checkpoint", "last", "--latency-repeats", "0"],
], ids=["unstructured-curve", "structured-finetuned", "steps-last-checkpoint"])
def test_prune_leaves_the_source_run_untouched(run_dir, tmp_path, args):
    before = snapshot(run_dir)
    out = tmp_path / "pruned"
    assert main(["prune", str(run_dir), *args, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert (out / "report.html").is_file()  # it did its work, elsewhere
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("args", [["--fold-bn"], ["--checkpoint", "last", "--fixed-size"]], ids=["fold-bn", "last"])
def test_export_onnx_leaves_the_source_run_untouched(run_dir, tmp_path, args):
    before = snapshot(run_dir)
    out = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--out", str(out), *args]) == 0
    assert out.stat().st_size > 0
    assert snapshot(run_dir) == before


def test_export_pt2_leaves_the_source_run_untouched(run_dir, tmp_path):
    before = snapshot(run_dir)
    out = tmp_path / "model.pt2"
    assert main(["export", str(run_dir), "--out", str(out), "--fold-bn"]) == 0
    assert out.stat().st_size > 0
    assert snapshot(run_dir) == before


def test_export_refused_over_an_existing_file_leaves_it_and_the_run_alone(run_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"mine")
    before = snapshot(run_dir)
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"mine" and snapshot(run_dir) == before


@pytest.mark.parametrize("where", ["model.onnx", "sub/model.onnx"])
def test_export_into_the_run_folder_is_refused(run_dir, capsys, where):
    before = snapshot(run_dir)
    assert main(["export", str(run_dir), "--out", str(run_dir / where)]) == 2
    assert "inside the run folder" in capsys.readouterr().err
    assert snapshot(run_dir) == before
