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
