"""Evaluation: loss, top-1/top-k accuracy, confusion matrix, per-class precision and recall."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError


@dataclass
class EvalResult:
    """Metrics of one pass over a dataset.

    Args:
        loss: mean cross-entropy (against soft targets when the loader mixes labels).
        accuracy: top-1; topk: {k: top-k accuracy}.
        confusion: (K, K) counts, row = true class, column = predicted.
        predictions: predicted class per sample, in loader order.
    """

    loss: float
    accuracy: float
    topk: dict[int, float]
    confusion: torch.Tensor
    predictions: torch.Tensor = field(repr=False)
    count: int = 0

    @property
    def metrics(self) -> dict[str, float]:
        """The task interface's view (``cnnlab.engine.tasks``): ``acc`` and ``top<k>``."""
        return {"acc": self.accuracy, **{f"top{k}": v for k, v in self.topk.items()}}

    @property
    def precision(self) -> torch.Tensor:
        """Per class: correct / predicted as that class (0 where never predicted)."""
        return self.confusion.diag() / self.confusion.sum(0).clamp(min=1)

    @property
    def recall(self) -> torch.Tensor:
        """Per class: correct / samples of that class."""
        return self.confusion.diag() / self.confusion.sum(1).clamp(min=1)


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int, *,
             amp: bool = False, tta_flip: bool = False, topk: tuple[int, ...] = (5,)) -> EvalResult:
    """Run ``model`` in eval mode over ``batches`` and collect the metrics (training mode is restored)."""
    bad = [k for k in topk if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise CnnlabError(f"topk must hold whole numbers >= 1 (top-k accuracy), got {bad}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, count = 0.0, 0
    correct_k = {k: 0 for k in topk if k < num_classes}
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    preds = []
    try:
        for x, y in batches:
            with autocast(device, amp):
                logits = model(x).float()
                if tta_flip:
                    logits = (logits + model(x.flip(3)).float()) / 2  # average over the mirrored image
            hard = y.argmax(1) if y.ndim == 2 else y
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            pred = logits.argmax(1)
            confusion += torch.bincount(hard * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
            for k in correct_k:
                correct_k[k] += (logits.topk(k, 1).indices == hard[:, None]).any(1).sum().item()
            preds.append(pred.cpu())
            count += len(y)
    finally:
        model.train(was_training)
    confusion = confusion.cpu()
    return EvalResult(
        loss=total_loss / max(count, 1),
        accuracy=(confusion.diag().sum() / max(count, 1)).item(),
        topk={k: v / max(count, 1) for k, v in correct_k.items()},
        confusion=confusion,
        predictions=torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
        count=count,
    )
