"""Atomic writes: a file is either its old version or its complete new one, with the usual permissions."""
from __future__ import annotations

import os
import stat

import pytest

from cnnlab._io import atomic_write, atomic_write_text


def test_atomic_write_replaces_whole_files_with_umask_permissions(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.csv"
    atomic_write_text(path, "epoch\n1\n")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("epo")  # half a file, then the disk fills up
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, crash)
    assert path.read_text() == "epoch\n1\n" and os.listdir(tmp_path) == ["metrics.csv"]


def test_an_exclusive_write_never_replaces_a_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, "first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_text(path, "second", exclusive=True)
    assert path.read_text() == "first" and os.listdir(tmp_path) == ["config.json"]  # no temporary left
    # a file system without hard links: the same refusal, by a test before the rename
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError("no hard links here")))
    with pytest.raises(FileExistsError):
        atomic_write_text(path, "third", exclusive=True)
    atomic_write_text(tmp_path / "new.json", "made", exclusive=True)
    assert path.read_text() == "first" and (tmp_path / "new.json").read_text() == "made"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "new.json"]
