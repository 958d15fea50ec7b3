"""Segmentation metrics from one confusion matrix accumulated over the whole dataset.

    >>> import torch
    >>> m = SegmentationMetrics(3)
    >>> m.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [2, 255]]]))
    >>> r = m.compute()
    >>> round(r["pixel_acc"], 4), round(r["miou"], 4), r["iou"]
    (0.6667, 0.5, [1.0, 0.5, 0.0])

Every number comes from the pixels of *all* images counted together (as mmsegmentation, torchvision's
reference scripts and the VOC/Cityscapes benchmarks do), never from per-image or per-batch scores averaged
afterwards: that average weighs a 10-pixel object as much as a 10,000-pixel one and gives each image's
absent classes a free 1 or a 0, depending on the convention (docs/segmentation.md shows both with numbers).

Conventions (those of mmsegmentation's ``total_area_to_metrics``):

- pixels whose target is ``ignore_index`` (VOC's 255 borders and cnnlab's padding) count nowhere;
- ``iou[c]`` = TP / (TP + FP + FN); NaN for a class absent from both the prediction and the ground truth
  (nothing to score); a class predicted but absent from the ground truth scores 0;
- ``miou`` = the mean over the classes whose IoU is not NaN; ``acc[c]`` = TP / ground-truth pixels (NaN for a
  class absent from the ground truth) and ``mean_acc`` its mean over the classes present;
- ``fwiou`` = sum of ``iou[c]`` weighted by the class's share of the ground-truth pixels;
- ``pixel_acc`` = correct pixels / counted pixels. With no counted pixel every number is NaN.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from cnnlab._errors import CnnlabError

IGNORE_INDEX = 255  # VOC's border label, and the value cnnlab's SegmentationCollate pads masks with


def check_labels(target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
    """Raise a CnnlabError if ``target`` holds a value other than 0..K-1 and ``ignore_index``.

    Only where the check costs no device synchronisation (tensors on the CPU); on accelerators
    :class:`SegmentationMetrics` counts such pixels on the device and raises at ``compute()``.
    """
    if target.device.type != "cpu":
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        values = sorted(set(target[bad].unique()[:8].tolist()))
        raise CnnlabError(f"segmentation masks hold the labels {values}, outside 0..{num_classes - 1} (the "
                          f"{num_classes} classes, background 0) and not the ignore index {ignore_index}; "
                          "check the masks and data.num_classes")


def bin_counts(index: torch.Tensor, bins: int, *, sync_free: bool | None = None) -> torch.Tensor:
    """int64 counts of each value 0..bins-1 of ``index`` (int64, all in range), on ``index``'s device.

    ``torch.bincount`` on the CPU; elsewhere (``sync_free``) an integer ``index_add_``: CUDA's bincount reads
    the input's min() and max() back to the host, a synchronisation per batch that this avoids.
    """
    if sync_free is None:
        sync_free = index.device.type != "cpu"
    if not sync_free:
        return torch.bincount(index, minlength=bins)
    counts = torch.zeros(bins, dtype=torch.long, device=index.device)
    return counts.index_add_(0, index, torch.ones_like(index))


class SegmentationMetrics:
    """A (K, K) confusion matrix of pixels (rows: true class, columns: predicted) and the metrics read from it.

    ``update`` adds a batch on the batch's device without a host synchronisation; ``compute`` reads the matrix
    back once. Under ``torch.distributed``, ``all_reduce()`` sums the matrices of every rank first (call it on
    every rank, when each saw its own shard of the data).

    Args:
        num_classes: K, the background (class 0) included.
        ignore_index: the target value of pixels that count nowhere (255, VOC's borders and cnnlab's padding).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise CnnlabError(f"num_classes must be a positive whole number (the classes, background included), "
                              f"got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
            raise CnnlabError(f"ignore_index must be a whole number outside the class labels 0..{num_classes - 1}, "
                              f"got {ignore_index!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._matrix: torch.Tensor | None = None  # int64 (K, K), on the device of the first batch
        self._invalid: torch.Tensor | None = None  # pixels with labels out of range (counted where not checked)

    # ---- accumulating ----------------------------------------------------------------------------------
    def reset(self) -> None:
        self._matrix = self._invalid = None

    def _labels(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = self.num_classes
        if prediction.is_floating_point():
            if prediction.ndim != 4 or prediction.shape[1] != k:
                raise CnnlabError(f"logits must be (N, {k}, H, W) for {k} classes, got {tuple(prediction.shape)}")
            prediction = prediction.argmax(1)
        if prediction.ndim == 2:  # one image
            prediction = prediction[None]
        if target.ndim == 2:
            target = target[None]
        if prediction.ndim != 3 or target.ndim != 3 or prediction.shape != target.shape:
            raise CnnlabError(f"predictions {tuple(prediction.shape)} and targets {tuple(target.shape)} must be "
                              "labels (N, H, W) of the same size (or logits (N, K, H, W) at the targets' size)")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise CnnlabError(f"targets must hold integer class labels, got {target.dtype}")
        return prediction.long()

    def update(self, logits_or_labels: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits (N, K, H, W) (argmax taken) or labels (N, H, W), and targets (N, H, W)."""
        prediction = self._labels(logits_or_labels.detach(), target)
        target = target.detach().to(prediction.device).long()
        k = self.num_classes
        check_labels(target, k, self.ignore_index)
        valid = (target >= 0) & (target < k)
        invalid = (~valid & (target != self.ignore_index)).sum()
        if prediction.device.type == "cpu" and bool(((prediction < 0) | (prediction >= k)).any()):
            raise CnnlabError(f"predicted labels must be in 0..{k - 1}, got values from {int(prediction.min())} to "
                              f"{int(prediction.max())}")
        prediction = prediction.clamp(0, k - 1)  # (argmax of K logits is in range; on accelerators labels are clamped)
        # one bin per (true, predicted) pair, and a last bin where the ignored (and invalid) pixels go, so that
        # no boolean indexing (a host sync on GPUs) is needed
        index = torch.where(valid, target * k + prediction, k * k).flatten()
        counts = bin_counts(index, k * k + 1)[:k * k].view(k, k)
        if self._matrix is None:
            self._matrix, self._invalid = counts, invalid
        else:
            self._matrix = self._matrix + counts.to(self._matrix.device)
            self._invalid = self._invalid + invalid.to(self._invalid.device)

    def all_reduce(self) -> None:
        """Sum the confusion matrices of every rank of an initialised ``torch.distributed`` group (else nothing)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        k = self.num_classes
        local = torch.zeros(k * k + 1, dtype=torch.long) if self._matrix is None else \
            torch.cat([self._matrix.flatten(), self._invalid.reshape(1)])
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
            torch.device("cpu")
        total = local.to(device)
        dist.all_reduce(total)
        where = self._matrix.device if self._matrix is not None else torch.device("cpu")
        total = total.to(where)
        self._matrix, self._invalid = total[:k * k].view(k, k).clone(), total[k * k].clone()

    # ---- reading -----------------------------------------------------------------------------------------
    @property
    def confusion(self) -> torch.Tensor:
        """The int64 (K, K) pixel counts on the CPU: row = true class, column = predicted class."""
        self._check_invalid()
        if self._matrix is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        return self._matrix.cpu()

    def _check_invalid(self) -> None:
        if self._invalid is not None and int(self._invalid) > 0:
            raise CnnlabError(f"{int(self._invalid)} mask pixels held labels outside 0..{self.num_classes - 1} "
                              f"and not the ignore index {self.ignore_index}; check the masks and the number of "
                              "classes")

    def compute(self) -> dict[str, Any]:
        """``pixel_acc``, ``mean_acc``, ``miou``, ``fwiou`` (floats) and per class ``iou``, ``acc`` (lists, NaN where
        the class has nothing to score), ``gt_pixels``, ``pred_pixels``; see the module's docstring."""
        return confusion_metrics(self.confusion)


def confusion_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    """The metrics of a (K, K) pixel confusion matrix (rows: true class), in float64."""
    c = torch.as_tensor(confusion).double()
    tp = c.diagonal()
    gt, pred = c.sum(1), c.sum(0)
    total = c.sum()
    union = gt + pred - tp
    nan = torch.tensor(math.nan, dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)  # absent from prediction and truth: NaN
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)  # absent from the truth: NaN
    if total > 0:
        pixel_acc = float(tp.sum() / total)
        freq = gt / total
        fwiou = float((freq[gt > 0] * iou[gt > 0]).sum())
    else:
        pixel_acc = fwiou = math.nan
    return {"pixel_acc": pixel_acc, "mean_acc": _nanmean(acc), "miou": _nanmean(iou), "fwiou": fwiou,
            "iou": iou.tolist(), "acc": acc.tolist(), "gt_pixels": gt.long().tolist(),
            "pred_pixels": pred.long().tolist()}


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if len(kept) else math.nan


__all__ = ["IGNORE_INDEX", "SegmentationMetrics", "bin_counts", "check_labels", "confusion_metrics"]
