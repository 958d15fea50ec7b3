"""A tiny task whose answer has a known place in the image, for checking what a trained network looks at.

tests/engine/_tiny.py's task (a bright 4x4 square at the top-left, centre or bottom-right, on noise)
at 24x24, plus a 'none' class of noise only. Without 'none', one location class is learned as "no
square elsewhere" and has no positive evidence for Grad-CAM to show (measured: an empty map for
every top-left test image).
"""
from __future__ import annotations

import torch

from cnnlab.data import datasets as D

SIZE = 24
CLASSES = ["tl", "centre", "br", "none"]


def square_offset(c: int) -> int:
    """Row (= column) of the square's top-left pixel for class ``c``."""
    return [0, (SIZE - 4) // 2, SIZE - 4][c]


def make_squares(root=None, download=False, n_train=160, n_test=32) -> D.TensorDataset:
    g = torch.Generator().manual_seed(0)

    def split(n):
        labels = torch.arange(n) % 4
        images = torch.randint(0, 60, (n, 1, SIZE, SIZE), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            if c < 3:
                o = square_offset(c)
                images[i, 0, o:o + 4, o:o + 4] = 250
        return images, labels

    return D.TensorDataset("squares", CLASSES, *split(n_train), *split(n_test), split_note="synthetic")


def on_square(explanation, c: int, margin: int = 2) -> bool:
    """The heatmap is not empty and its peak lies on class ``c``'s square (within ``margin`` pixels)."""
    row, col = explanation.peak()
    o = square_offset(c)
    return bool(explanation.heatmap.max() > 0) and o - margin <= row <= o + 3 + margin and o - margin <= col <= o + 3 + margin


def train_squares(out_dir) -> tuple:
    """Train fmnist_net with a global-average-pooled head on the task (about 3 s): (LoadedRun, preprocess, test accuracy)."""
    import pytest

    from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from cnnlab.engine.data_setup import preprocess_from_state
    from cnnlab.engine.runs import load_run
    from cnnlab.engine.trainer import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(D.DATASETS, "squares", make_squares)
        # head_size=1: global average pooling before the classifier, the architecture Grad-CAM generalises (CAM)
        config = TrainConfig(model=ModelConfig(name="fmnist_net", options={"head_size": 1}),
                             data=DataConfig(name="squares", batch_size=16), optim=OptimConfig(lr=0.05), epochs=4,
                             out_dir=str(out_dir), name="squares", quiet=True, plots=False, device="cpu", threads=1)
        result = train(config)
    run = load_run(result.run_dir)
    return run, preprocess_from_state(run.preprocess), result.test.accuracy
