"""Classification: cross-entropy (with label smoothing, auxiliary heads and an optional distillation teacher),
accuracy, confusion matrix."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.engine.tasks._model import model_channels
from cnnlab.engine.tasks.base import LossMeter, StepOutput, Task

# GoogLeNet's auxiliary classifiers: their losses are added with weight 0.3 (Szegedy et al. 2015, sec. 5)
AUX_LOSS_WEIGHT = 0.3


def split_aux(output: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(main logits, auxiliary logits) of a model output: a tensor, or a tuple (logits, aux1, aux2, ...)."""
    if isinstance(output, torch.Tensor):
        return output, ()
    if isinstance(output, (tuple, list)) and output and all(isinstance(t, torch.Tensor) for t in output):
        return output[0], tuple(output[1:])
    raise CnnlabError(f"a classifier must return logits (B, K) or a tuple (logits, aux logits...), "
                      f"got {type(output).__name__}")


class _AccuracyMeter(LossMeter):
    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)

    def update(self, out: StepOutput) -> None:
        super().update(out)
        y = out.target
        hard = y.argmax(1) if y.ndim == 2 else y  # mixed (soft) labels: the larger share
        self.correct += (out.output.detach().argmax(1) == hard).sum()

    def compute(self) -> dict[str, float]:
        return {**super().compute(), "acc": self.correct.item() / max(self.seen, 1)}


class ClassificationTask(Task):
    name = "classification"
    metrics = ("acc",)
    losses = ("cross_entropy",)

    def __init__(self, loss: str = "auto") -> None:
        super().__init__(loss)
        self._data = None  # the run's DataBundle (prepare), for checking a teacher against it
        self._teacher = None  # the distillation teacher (config.distill.teacher), loaded once per run
        self._distill = None  # the run's DistillConfig, for results.json

    def prepare(self, data):
        self._data = data

    def build_model(self, config, data, weights):
        model = super().build_model(config, data, weights)
        if getattr(config, "distill", None) is not None and config.distill.teacher is not None:
            self._prepare_teacher(config, data)  # a wrong teacher fails now, before the first step
        return model

    def _prepare_teacher(self, config, data):
        """The teacher of ``config.distill``, loaded once (on the CPU) and checked against the student's data."""
        from cnnlab.compress.distill import Teacher

        if self._teacher is None or self._distill.teacher != config.distill.teacher:
            if data is None:
                raise CnnlabError("a distillation teacher needs the run's data (the task's prepare(data) was not "
                                  "called); train through cnnlab.engine.train")
            teacher = Teacher.load(config.distill.teacher)
            teacher.check_student_data(config.data.name, config.to_dict()["data"], data.classes, data.input_shape,
                                       data.preprocess_state)
            self._teacher, self._distill = teacher, config.distill
        return self._teacher

    def _teacher_on(self, config, device):
        """The teacher on the batches' device and in the student's memory format (moved once)."""
        teacher = self._prepare_teacher(config, self._data)
        placement = (device, config.model.channels_last)
        if teacher.placement != placement:
            teacher.to(device, channels_last=config.model.channels_last)
        return teacher

    def build_data(self, config, device):
        from cnnlab.engine.data_setup import build_data

        return build_data(config.data, device, seed=config.seed, channels_last=config.model.channels_last,
                          in_channels=model_channels(config))

    def step(self, net, batch, config):
        x, y = batch
        logits, aux = split_aux(net(x))
        smoothing = config.optim.label_smoothing
        distill = getattr(config, "distill", None)
        if distill is None or distill.teacher is None:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        else:  # the teacher reads the very batch the student does (augmented, mixed), without gradients
            from cnnlab.compress.distill import distillation_loss

            teacher_logits = self._teacher_on(config, x.device).logits(x)
            loss = distillation_loss(logits, teacher_logits, y, distill.temperature, distill.alpha,
                                     label_smoothing=smoothing)
        for a in aux:  # auxiliary heads learn the labels only
            loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(a.float(), y, label_smoothing=smoothing)
        return StepOutput(loss, logits, y, len(y))

    def meter(self, device):
        return _AccuracyMeter(device)

    def evaluate(self, model, batches, data, *, amp=False, tta_flip=False):
        from cnnlab.engine.evaluate import evaluate

        return evaluate(model, batches, data.num_classes, amp=amp, tta_flip=tta_flip)

    def expected_initial_loss(self, data) -> float:
        return math.log(data.num_classes)  # uniform predictions over K classes

    def summary(self, test) -> dict[str, Any]:
        out = {"test_accuracy": test.accuracy, "test_loss": test.loss, "test_topk": test.topk,
               "confusion": test.confusion.tolist(), "precision": test.precision.tolist(),
               "recall": test.recall.tolist()}
        if self._teacher is not None:  # a distilled run says from whom and how
            out.update(self._teacher.describe(), temperature=self._distill.temperature, alpha=self._distill.alpha)
        return out

    def headline(self, test) -> str:
        return f"test accuracy {test.accuracy:.4f}" + "".join(f", top-{k} {v:.4f}" for k, v in test.topk.items())

    def plots(self, run_dir: Path, test, data, model: nn.Module) -> None:
        from cnnlab.engine import report

        report.plot_confusion(run_dir / "confusion_matrix.png", test.confusion, data.classes)
        if data.test_images is not None and hasattr(data.test, "labels"):
            labels = data.test.labels.cpu()  # tensor datasets: the loader keeps them in order
            report.plot_misclassified(run_dir / "misclassified.png", data.test_images, labels, test.predictions,
                                      data.classes)

    def predict_lines(self, images, outputs, classes, top):
        probs = outputs.float().softmax(1)
        lines = []
        for p in probs:
            best = p.topk(min(top, len(classes)))
            lines.append(", ".join(f"{classes[i]} ({v:.1%})" for v, i in zip(best.values.tolist(), best.indices.tolist())))
        return lines
