"""benchmarks/bench_detection.py ``errors``: the classification oracle that splits a detector's AP50 loss."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cnnlab.detection import evaluate

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_detection.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_detection", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relabelled_gives_found_boxes_the_true_class(bench):
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]),
                "labels": torch.tensor([1, 2])}]
    predictions = [{"boxes": torch.tensor([[1.0, 0.0, 10.0, 10.0],     # IoU 0.9 with box 0, wrong class
                                           [20.0, 20.0, 40.0, 40.0],   # exact on box 1, right class
                                           [20.0, 20.0, 29.0, 40.0],   # IoU 0.45 with box 1: not a find
                                           [60.0, 60.0, 70.0, 70.0],   # background
                                           [0.0, 0.0, 10.0, 10.0]]),   # box 0 again, lower: a duplicate once fixed
                    "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), "labels": torch.tensor([3, 2, 1, 3, 1])}]
    fixed = bench.relabelled(predictions, targets)
    assert fixed[0]["labels"].tolist() == [1, 2, 1, 3]
    assert torch.equal(fixed[0]["boxes"], predictions[0]["boxes"][:4])
    assert predictions[0]["labels"].tolist() == [3, 2, 1, 3, 1]  # the input is left as it was
    # class-agnostic: one label, each box once (the duplicate of box 0 is dropped, the IoU-0.45 one is not)
    one = bench.relabelled(predictions, targets, agnostic=True)
    assert one[0]["labels"].tolist() == [1, 1, 1, 1] and one[0]["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    # as predicted, class 1's find (0.5) ranks below a false one (0.7): AP 0.5, class 2's 1.0; fixed, both 1.0
    assert float(evaluate(predictions, targets, "coco")["AP50"]) == pytest.approx(0.75)
    assert float(evaluate(fixed, targets, "coco", class_names=["a", "b", "c"])["AP50"]) == pytest.approx(1.0)


def test_relabelled_keeps_images_without_boxes(bench):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    predictions = [{"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.5]),
                    "labels": torch.tensor([2])}, {**empty, "scores": torch.zeros(0)}]
    fixed = bench.relabelled(predictions, [empty, {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
                                                   "labels": torch.tensor([1])}])
    assert fixed[0]["labels"].tolist() == [2] and len(fixed[1]["labels"]) == 0


def test_framed_centres_the_same_pixels_in_a_black_frame(bench):
    images = torch.rand(3, 1, 4, 6) + 0.1  # no zero pixel inside
    out = bench.framed(images, 10)
    assert out.shape == (3, 1, 10, 10)
    assert torch.equal(out[..., 3:7, 2:8], images)  # (10 - 4) // 2 rows, (10 - 6) // 2 columns above and left
    rest = out.clone()
    rest[..., 3:7, 2:8] = 0
    assert not rest.any()  # the rest of the frame is black
    assert torch.equal(bench.framed(images[..., :4], 4), images[..., :4])  # a frame of its own size: unchanged
    with pytest.raises(SystemExit, match="smaller than the images"):
        bench.framed(images, 5)
