"""The task interface: what differs between classification, reconstruction, detection and segmentation.

The training loop (``cnnlab.engine.trainer``) never asks which task it runs. It asks the task for
the data, the model, the loss of a batch, a running meter of the training metrics, an evaluation
pass, the task's part of ``results.json``, its plots and its report sections. Everything else
(optimiser, schedule, checkpoints, exact resume, early stopping, EMA, AMP, compile, DDP, time
budget, search, ensembles, report.html) is shared. docs/tasks.md shows how to add a task.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from cnnlab._errors import CnnlabError

if TYPE_CHECKING:
    from cnnlab.engine.config import TrainConfig
    from cnnlab.engine.data_setup import DataBundle


@dataclass
class StepOutput:
    """One batch through the model: the loss to back-propagate and what the meters need.

    Args:
        loss: scalar tensor (float32), still attached to the graph in training.
        output: the model's output (logits, reconstructions, a loss dict ...), for the meter.
        target: the batch's targets in the form the task's meter reads.
        count: samples in the batch (the weight of this batch in epoch means).
    """

    loss: torch.Tensor
    output: Any
    target: Any
    count: int


class Meter(Protocol):
    """Accumulates per-batch results on the device (no host sync per batch) and gives epoch means."""

    def update(self, out: StepOutput) -> None: ...

    def compute(self) -> dict[str, float]: ...  # {"loss": ..., "<metric>": ...}


class LossMeter:
    """The mean loss over samples; tasks extend it with their metrics."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.seen = 0

    def update(self, out: StepOutput) -> None:
        self.loss_sum += out.loss.detach().float() * out.count
        self.seen += out.count

    def compute(self) -> dict[str, float]:
        return {"loss": self.loss_sum.item() / max(self.seen, 1)}


@dataclass
class TaskResult:
    """An evaluation pass of any task: the mean loss and the task's metrics (``metrics['acc']`` ...)."""

    loss: float
    metrics: dict[str, float]
    count: int = 0
    details: dict[str, Any] = field(default_factory=dict, repr=False)


class Task(ABC):
    """What one kind of model needs from the engine. Subclass, set the class attributes, register.

    Class attributes:
        name: the registry's task word (``classification``); models registered with it use this task.
        metrics: metric names in the epoch rows besides the loss (rows carry ``train_<m>``, ``val_<m>``).
        losses: the ``loss=`` choices (the first is what ``auto`` means).
        lower_is_better: metrics (besides ``loss``) where smaller is better.
    """

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]] = ()
    losses: ClassVar[tuple[str, ...]] = ("auto",)
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    uses_labels: ClassVar[bool] = True  # label-mixing augmentation (mixup, cutmix) needs class labels
    model_takes_num_classes: ClassVar[bool] = True  # create_model(..., num_classes=<the data's>)

    def __init__(self, loss: str = "auto") -> None:
        if loss not in ("auto", *self.losses):
            raise CnnlabError(f"loss={loss!r} is not a loss of the {self.name} task; choose auto or "
                              f"{', '.join(self.losses)}")
        self.loss_name = self.losses[0] if loss == "auto" else loss

    # ---- what every task must say -------------------------------------------------------------
    @abstractmethod
    def build_data(self, config: TrainConfig, device: torch.device) -> DataBundle:
        """Loaders of batches already on ``device`` (train shuffled and augmented; val/test not)."""

    def build_model(self, config: TrainConfig, data: DataBundle, weights: str | None) -> nn.Module:
        """The configured model for this data; a model that cannot take it fails here, clearly."""
        from cnnlab.engine.tasks._model import build_registered_model

        classes = data.num_classes if self.model_takes_num_classes else None
        return build_registered_model(config, data.input_shape, weights, classes)

    @abstractmethod
    def step(self, net: nn.Module, batch: Any, config: TrainConfig) -> StepOutput:
        """Forward one batch and compute the loss (the caller sets train/eval mode and autocast)."""

    @abstractmethod
    def meter(self, device: torch.device) -> Meter:
        """A fresh accumulator of the training metrics of an epoch."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Any, data: DataBundle, *, amp: bool = False,
                 tta_flip: bool = False) -> TaskResult:
        """One pass over ``batches`` in eval mode (training mode restored): loss and metrics."""

    # ---- what a task may refine --------------------------------------------------------------
    def prepare(self, data: DataBundle) -> None:
        """Called once the run's data is known (built or passed in), before the first step."""

    def expected_initial_loss(self, data: DataBundle) -> float | None:
        """The loss an untrained model should have (``cnnlab check``'s first test); None if unknown."""
        return None

    def higher_is_better(self, metric: str) -> bool:
        """For a row key or metric name (``val_acc``, ``loss``): is a larger value better?"""
        name = metric.removeprefix("train_").removeprefix("val_").removeprefix("test_")
        return name != "loss" and name not in self.lower_is_better

    def monitor_keys(self) -> tuple[str, ...]:
        return ("val_loss", *(f"val_{m}" for m in self.metrics))

    def summary(self, test: TaskResult) -> dict[str, Any]:
        """The task's part of results.json (the trainer adds epochs, times, the run's choices)."""
        return {"test_loss": test.loss, **{f"test_{k}": v for k, v in test.metrics.items()}}

    def headline(self, test: TaskResult) -> str:
        """The one line ``cnnlab train`` prints about the test split."""
        return "test " + ", ".join(f"{k} {v:.4f}" for k, v in {"loss": test.loss, **test.metrics}.items())

    def plots(self, run_dir: Path, test: TaskResult, data: DataBundle, model: nn.Module) -> None:
        """Task-specific PNGs in the run folder (the learning curves are drawn for every task)."""

    def predict_lines(self, images: torch.Tensor, outputs: Any, classes: list[str], top: int) -> list[str]:
        """What ``cnnlab predict`` prints for each input (``images`` in [0, 1], ``outputs`` the model's, batched)."""
        raise CnnlabError(f"cnnlab predict does not support the {self.name} task yet")


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
