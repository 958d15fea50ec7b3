"""A tiny learnable dataset registered under the name 'tiny' for engine and CLI tests (no files, no network)."""
from __future__ import annotations

import torch

from cnnlab.data import datasets as D


def make_tiny(root=None, download=False, n_train=96, n_test=30, size=12) -> D.TensorDataset:
    """3 classes: a bright 4x4 square at the top-left, the centre or the bottom-right, on noise."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        labels = torch.arange(n) % 3
        images = torch.randint(0, 60, (n, 1, size, size), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            o = [0, (size - 4) // 2, size - 4][c]
            images[i, 0, o:o + 4, o:o + 4] = 250
        return images, labels

    return D.TensorDataset("tiny", ["tl", "centre", "br"], *split(n_train), *split(n_test), split_note="synthetic")


def register_tiny(monkeypatch) -> None:
    monkeypatch.setitem(D.DATASETS, "tiny", make_tiny)


def tiny_config(tmp_path, name="run", epochs=2, **optim):
    from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

    return TrainConfig(model=ModelConfig(name="fmnist_net"), data=DataConfig(name="tiny", batch_size=16, flip=True, crop_padding=1),
                       optim=OptimConfig(lr=0.05, **optim), epochs=epochs, out_dir=str(tmp_path), name=name, quiet=True,
                       plots=False, device="cpu", threads=1)


def train_tiny_run(out, *sets: str, name: str = "r"):
    """A finished 1-epoch `cnnlab train` of fmnist_net on the tiny data in ``out``; returns its run folder.
    ``sets`` are extra TrainConfig overrides (``"plots=false"``, ``"data.val_fraction=0.2"``)."""
    import pytest

    from cnnlab.cli.main import main  # the CLI, as a user runs it (tests may import it; the library never does)

    with pytest.MonkeyPatch.context() as mp:
        register_tiny(mp)
        argv = ["train", "--model", "fmnist_net", "--data", "tiny", "--epochs", "1", "--batch-size", "32",
                "--out-dir", str(out), "--name", name, "--quiet", "--set", "threads=1"]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 0
    return out / name
