"""SegmentationMetrics: a dataset-wide pixel confusion matrix, against independent computations.

Oracles: a straightforward numpy computation (np.add.at over every pixel) and segmentation_models_pytorch's
``smp.metrics`` (a test dependency) with ``reduction="macro"`` (statistics summed over images, then per class),
which is what torchmetrics' ``MulticlassJaccardIndex(average="macro", ignore_index=255)`` computes where every
class is present (torchmetrics is not installed here); hand computations where classes are absent.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.segmentation.metrics import SegmentationMetrics, bin_counts, confusion_metrics


def _numpy_metrics(pred: np.ndarray, target: np.ndarray, k: int, ignore: int = 255) -> dict:
    keep = target != ignore
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (target[keep], pred[keep]), 1)
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
        acc = tp / matrix.sum(1)
    freq = matrix.sum(1) / matrix.sum()
    return {"matrix": matrix, "iou": iou, "miou": np.nanmean(iou), "pixel_acc": tp.sum() / matrix.sum(),
            "mean_acc": np.nanmean(acc), "fwiou": np.nansum(freq * iou)}


def _random_batch(seed: int, n: int = 4, k: int = 5, size: int = 24):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, size, size, generator=g)
    target = torch.randint(0, k, (n, size, size), generator=g)
    target[torch.rand(n, size, size, generator=g) < 0.1] = 255  # VOC-like ignored pixels
    return logits, target


def test_every_class_present_equals_numpy_and_smp_macro_iou():
    import segmentation_models_pytorch as smp

    k = 5
    metrics = SegmentationMetrics(k)
    batches = [_random_batch(seed, k=k) for seed in range(3)]
    for logits, target in batches:
        metrics.update(logits, target)
    found = metrics.compute()
    logits = torch.cat([b[0] for b in batches])
    target = torch.cat([b[1] for b in batches])
    pred = logits.argmax(1)
    expected = _numpy_metrics(pred.numpy(), target.numpy(), k)
    assert metrics.confusion.tolist() == expected["matrix"].tolist()
    assert (expected["matrix"].sum(1) > 0).all()  # every class present: the torchmetrics-equality case
    assert found["iou"] == pytest.approx(expected["iou"].tolist(), rel=1e-12)
    for key in ("miou", "pixel_acc", "mean_acc", "fwiou"):
        assert found[key] == pytest.approx(expected[key], rel=1e-12), key
    # smp's stats per image and class, summed over images ("macro"): the dataset-level mIoU
    tp, fp, fn, tn = smp.metrics.get_stats(pred, target, mode="multiclass", num_classes=k, ignore_index=255)
    assert found["miou"] == pytest.approx(float(smp.metrics.iou_score(tp, fp, fn, tn, reduction="macro")), rel=1e-6)
    assert found["iou"] == pytest.approx((tp.sum(0).double() / (tp + fp + fn).sum(0)).tolist(), rel=1e-12)


def test_labels_in_and_logits_in_give_the_same_matrix_and_batches_add_up():
    logits, target = _random_batch(7)
    a, b = SegmentationMetrics(5), SegmentationMetrics(5)
    a.update(logits, target)
    b.update(logits.argmax(1)[:2], target[:2])
    b.update(logits.argmax(1)[2], target[2])  # one image (H, W) at a time too
    b.update(logits.argmax(1)[3:], target[3:])
    assert torch.equal(a.confusion, b.confusion) and a.compute() == b.compute()
    a.reset()
    assert a.confusion.sum() == 0 and math.isnan(a.compute()["miou"])


def test_hand_computation_with_absent_classes():
    # 4 classes; class 3 appears in neither target nor prediction (excluded from mIoU, IoU NaN); class 2 is
    # predicted on one pixel but absent from the target (IoU 0, counted; accuracy NaN, not counted)
    target = torch.tensor([[[0, 0, 0, 1],
                            [0, 1, 1, 1],
                            [255, 255, 0, 0]]])
    pred = torch.tensor([[[0, 0, 1, 1],
                          [0, 1, 2, 1],
                          [3, 1, 0, 0]]])  # the last row's first two pixels are ignored, whatever they say
    m = SegmentationMetrics(4)
    m.update(pred, target)
    found = m.compute()
    # counted pixels: 10; class 0: 6 true, 5 correct, 1 -> class 1; class 1: 4 true, 3 correct, 1 -> class 2
    assert m.confusion.tolist() == [[5, 1, 0, 0], [0, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    iou0, iou1 = 5 / (6 + 5 - 5), 3 / (4 + 4 - 3)
    assert found["iou"][:3] == pytest.approx([iou0, iou1, 0.0]) and math.isnan(found["iou"][3])
    assert found["miou"] == pytest.approx((iou0 + iou1 + 0.0) / 3)  # 3 classes, not 4
    assert found["pixel_acc"] == pytest.approx(8 / 10)
    assert found["acc"][:2] == pytest.approx([5 / 6, 3 / 4]) and all(math.isnan(v) for v in found["acc"][2:])
    assert found["mean_acc"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert found["fwiou"] == pytest.approx(0.6 * iou0 + 0.4 * iou1)
    assert found["gt_pixels"] == [6, 4, 0, 0] and found["pred_pixels"] == [5, 4, 1, 0]


def test_per_image_and_dataset_level_miou_differ_as_the_docs_say():
    """docs/segmentation.md's worked example: two 10 x 10 images, background 0 and an object 1."""
    small, large = torch.zeros(10, 10, dtype=torch.long), torch.zeros(10, 10, dtype=torch.long)
    small[0, :10] = 1  # a 10-pixel object, found exactly
    large[:5] = 1  # a 50-pixel object, half of it found
    found_large = torch.zeros_like(large)
    found_large[:5, :5] = 1
    dataset = SegmentationMetrics(2)
    per_image = []
    for pred, target in ((small, small), (found_large, large)):
        dataset.update(pred, target)
        one = SegmentationMetrics(2)
        one.update(pred, target)
        per_image.append(one.compute()["miou"])
    # by hand: image 1 IoUs (1, 1); image 2 background 50/75, object 25/50
    assert per_image == pytest.approx([1.0, (50 / 75 + 25 / 50) / 2])
    assert sum(per_image) / 2 == pytest.approx(0.7916667, abs=1e-6)
    # all 200 pixels together: background 140/165, object 35/60
    assert dataset.compute()["iou"] == pytest.approx([140 / 165, 35 / 60])
    assert dataset.compute()["miou"] == pytest.approx(0.7159091, abs=1e-6)


def test_ignore_index_pixels_count_nowhere_whatever_is_predicted():
    logits, target = _random_batch(3)
    other = logits.clone()
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    other[ignored] = torch.randn(int(ignored.sum()))
    a, b = SegmentationMetrics(5), SegmentationMetrics(5)
    a.update(logits, target)
    b.update(other, target)
    assert torch.equal(a.confusion, b.confusion)
    assert a.confusion.sum() == (target != 255).sum()
    c = SegmentationMetrics(5, ignore_index=-1)  # another ignore label
    c.update(logits, torch.where(target == 255, -1, target))
    assert torch.equal(c.confusion, a.confusion)


def test_bad_labels_and_shapes_are_clear_errors():
    m = SegmentationMetrics(3)
    with pytest.raises(CnnlabError, match=r"labels \[3, 7\], outside 0..2"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 3], [7, 255]]]))
    with pytest.raises(CnnlabError, match=r"labels \[-1\]"):
        m.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0, -1]]]))
    with pytest.raises(CnnlabError, match=r"logits must be \(N, 3, H, W\)"):
        m.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(CnnlabError, match="of the same size"):
        m.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(CnnlabError, match="integer class labels"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2))
    with pytest.raises(CnnlabError, match="predicted labels must be in 0..2"):
        m.update(torch.full((1, 2, 2), 5), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(CnnlabError, match="ignore_index must be a whole number outside"):
        SegmentationMetrics(3, ignore_index=1)
    with pytest.raises(CnnlabError, match="num_classes must be a positive"):
        SegmentationMetrics(0)
    assert m.confusion.sum() == 0  # nothing of the refused batches was counted


def test_the_sync_free_counting_equals_bincount():
    index = torch.randint(0, 26, (5000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(bin_counts(index, 26, sync_free=True), torch.bincount(index, minlength=26))
    assert confusion_metrics(torch.zeros(3, 3, dtype=torch.long))["pixel_acc"] != 0  # NaN: nothing counted


def _ddp_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    logits, target = _random_batch(11)
    m = SegmentationMetrics(5)
    m.update(logits[rank::world], target[rank::world])  # each rank its shard
    m.all_reduce()
    torch.save(m.confusion, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_all_reduce_merges_the_ranks_matrices(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    # fork, not spawn: a spawned child imports torch and cnnlab again (tens of seconds on a busy CPU)
    mp.start_processes(_ddp_rank, args=(world, f"file://{tmp_path}/init", str(tmp_path)), nprocs=world, join=True,
                       start_method="fork")
    logits, target = _random_batch(11)
    whole = SegmentationMetrics(5)
    whole.update(logits, target)
    for rank in range(world):
        assert torch.equal(torch.load(tmp_path / f"{rank}.pt"), whole.confusion)
    alone = SegmentationMetrics(5)
    alone.update(logits, target)
    alone.all_reduce()  # outside torch.distributed: nothing changes
    assert torch.equal(alone.confusion, whole.confusion)
    assert os.environ.get("WORLD_SIZE") in (None, "1")
