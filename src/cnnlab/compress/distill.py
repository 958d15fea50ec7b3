"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student learns a teacher run's soft targets.

The loss of a batch, with temperature ``T`` and ``alpha`` the weight of the soft term::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

The gradient of the soft term with respect to the student's logits scales as 1/T^2 (sec. 2 of the
paper), so it is multiplied by T^2: the soft and hard terms then keep their relative weight whatever
the temperature. ``cnnlab train --teacher RUN`` wires it into the classification task; see
docs/distillation.md.

An SSD detector learns from a classifier teacher too (:meth:`Teacher.box_logits`): the teacher classifies the
square crop of every training box, cut from the training image as augmented, and the detector's class scores of
the default boxes matched to that box learn its soft targets beside their labels (the idea of ViLD, Gu et al.
2021, which distils a classifier's view of cropped regions into a detector; docs/detection_ssd.md).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.data.bundle import preprocess_from_state
from cnnlab.engine.config import DISTILL_TASK as TASK  # the one task whose outputs are class logits (B, K)
from cnnlab.engine.config import check_distill_settings  # also checks a run's config


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch, in float32."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)  # (B, K)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    # batchmean: the KL summed over classes, averaged over samples (the true KL per sample; "mean" would
    # also divide by K)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.9, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets)``, a float32 scalar.

    ``targets`` are class indices (B,) or soft labels (B, K) (mixup, cutmix); ``label_smoothing``
    applies to the cross-entropy term only. ``alpha=0`` is plain cross-entropy (the teacher is not read).
    """
    check_distill_settings(temperature, alpha)
    if student_logits.ndim != 2 or teacher_logits.shape != student_logits.shape:
        raise CnnlabError(f"distillation needs class logits (B, K) of the same shape from student and teacher, got "
                          f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}")
    hard = F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    if alpha == 1:
        return soft
    return alpha * soft + (1 - alpha) * hard


@dataclass
class Teacher:
    """A trained run's model, frozen, that gives the soft targets of each training batch.

    Args:
        module: the teacher network (eval mode, no gradients); run_dir: the run folder it came from;
        tag: the checkpoint loaded (the one the run reported); classes, input_shape, preprocess: the run's
        data (label names, (C, H, W), the normalisation state); data_name, data_config: its data section.
    """

    module: nn.Module
    run_dir: Path
    tag: str
    classes: list[str]
    input_shape: tuple[int, int, int]
    preprocess: dict[str, Any]
    data_name: str
    data_config: dict[str, Any]
    placement: tuple[torch.device, bool] | None = None  # (device, channels_last) once moved by :meth:`to`

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Teacher:
        """The model ``run_dir`` reported (``cnnlab.engine.runs.load_run``), on the CPU, frozen."""
        from cnnlab.engine.runs import load_run

        try:
            run = load_run(run_dir)
        except CnnlabError as e:
            raise CnnlabError(f"teacher {run_dir}: {e}") from None
        if run.task != TASK:
            raise CnnlabError(f"teacher {run_dir} is a {run.task} run; distillation needs a teacher whose outputs "
                              f"are class logits (a {TASK} run, `cnnlab models --task {TASK}`)")
        module = run.model.eval().requires_grad_(False)
        return cls(module, Path(run_dir), run.tag, list(run.classes), tuple(run.input_shape), dict(run.preprocess),
                   run.config.data.name, run.config.to_dict()["data"])

    def to(self, device: torch.device, *, channels_last: bool = False) -> Teacher:
        """Move the teacher to ``device`` (NHWC weights with ``channels_last``, as the student's batches)."""
        self.module = self.module.to(device, memory_format=torch.channels_last if channels_last
                                     else torch.contiguous_format)
        self.placement = (torch.device(device), channels_last)
        return self

    def check_student_data(self, data_name: str, data_config: dict[str, Any], classes: list[str],
                           input_shape: tuple[int, ...], preprocess: dict[str, Any]) -> None:
        """Refuse a student whose inputs the teacher was not trained on (another dataset, normalisation,
        image size or class list): the teacher sees exactly the student's normalised batches."""
        where = f"teacher {self.run_dir}"
        if _same_data_name(self.data_name) != _same_data_name(data_name):
            raise CnnlabError(f"{where} was trained on data {self.data_name!r} but the student on {data_name!r}; "
                              "a teacher must have been trained on the student's dataset (same inputs, same classes)")
        for key in ("normalize", "image_size"):
            if key in self.data_config and key in data_config and self.data_config[key] != data_config[key]:
                raise CnnlabError(f"{where} was trained with data.{key}={self.data_config[key]!r} but the student "
                                  f"uses data.{key}={data_config[key]!r}; set the student's data.{key} to the "
                                  "teacher's (the teacher reads the student's inputs as they are)")
        if tuple(input_shape) != tuple(self.input_shape):
            raise CnnlabError(f"{where} takes images of shape {tuple(self.input_shape)} but the student's data has "
                              f"{tuple(input_shape)}; use the teacher's data.image_size and channels")
        if list(classes) != list(self.classes):
            raise CnnlabError(f"{where} has classes {self.classes[:10]} but the student's data has "
                              f"{list(classes)[:10]}; distillation needs the same classes in the same order")
        mismatch = _preprocess_mismatch(self.preprocess, preprocess)
        if mismatch:
            raise CnnlabError(f"{where} normalised its inputs with {mismatch[0]} but the student's data is "
                              f"normalised with {mismatch[1]}; train both on the same data settings")

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's class logits (B, K) for a batch (the student's augmented, normalised inputs)."""
        if self.module.training:  # never trained, never in training mode (dropout, batch statistics)
            self.module.eval()
        out = self.module(images)
        return out[0] if isinstance(out, (tuple, list)) else out  # (logits, aux...) of a model with aux heads

    def describe(self) -> dict[str, Any]:
        return {"teacher": str(self.run_dir), "teacher_checkpoint": self.tag}

    def check_box_classes(self, classes: list[str]) -> None:
        """Refuse a detector whose foreground classes are not the teacher's, in the same order."""
        if list(classes) != list(self.classes):
            raise CnnlabError(f"teacher {self.run_dir} has classes {self.classes[:10]} but the detection data has "
                              f"{list(classes)[:10]}; a box teacher needs the detector's classes (without the "
                              "background) in the same order")

    @torch.no_grad()
    def box_logits(self, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """The teacher's class logits (N, K) for every box of every image, in order: each box's square crop
        (:func:`box_crops`) at the teacher's input size and channels, normalised as the teacher's run was.
        ``images``: (C, H, W) floats in 0..1 as a detector takes them; ``boxes``: (N_i, 4) x1, y1, x2, y2."""
        channels, height, width = self.input_shape
        x = box_crops(images, boxes, (height, width), channels)
        if not len(x):
            return x.new_zeros(0, len(self.classes))
        normalise = preprocess_from_state(self.preprocess)
        return self.logits(normalise(x) if normalise is not None else x).float()


def box_crops(images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], size: tuple[int, int],
              channels: int) -> torch.Tensor:
    """Every box's square about its centre (its longer side), cut from its image and resized to ``size`` by
    ``torchvision.ops.roi_align`` with adaptive sampling (an area average when shrinking; off the image, 0 beyond
    the edge pixels), as (N, channels, h, w). A square, as a classifier sees an item (Fashion-MNIST's 28 x 28, ImageNet's centre
    crops), so the box's shape is not stretched. Images with other channels than ``channels``: 3 -> 1 is the
    mean of the channels, 1 -> 3 repeats the grey one; anything else is refused."""
    from torchvision.ops import roi_align

    crops = []
    for image, b in zip(images, boxes):
        if not len(b):
            continue
        c = image.shape[0]
        if c != channels and (c, channels) not in ((3, 1), (1, 3)):
            raise CnnlabError(f"the teacher takes {channels}-channel images but the detector's have {c}; a box "
                              "teacher needs the same channels, or grey and RGB")
        b = b.to(image.dtype)
        centre, side = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]).amax(1, keepdim=True)
        squares = torch.cat([centre - side / 2, centre + side / 2], 1)
        x = image.float().mean(0, keepdim=True) if (c, channels) == (3, 1) else image.float()
        out = roi_align(x[None], [squares.float()], size, 1.0, sampling_ratio=-1, aligned=True)
        crops.append(out.expand(-1, channels, -1, -1) if out.shape[1] != channels else out)
    if not crops:
        first = images[0] if len(images) else torch.zeros(0)
        return torch.zeros(0, channels, *size, device=first.device)
    return torch.cat(crops)


def _same_data_name(name: str) -> str:
    """A dataset name as is; an image folder as its resolved path (``data/x`` and ``./data/x/`` agree)."""
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def _preprocess_mismatch(teacher: dict[str, Any], student: dict[str, Any]) -> tuple[str, str] | None:
    """(teacher's, student's) normalisation in words where they differ beyond the statistics' sampling noise."""
    kind_t, kind_s = teacher.get("kind", "none"), student.get("kind", "none")
    if kind_t != kind_s:
        return f"normalize={kind_t}", f"normalize={kind_s}"
    if kind_t == "standard":
        # a student on a subset (train_limit, another val_fraction) fits slightly other statistics: 0.02 of
        # the 0..1 pixel range is far below what another dataset or normalisation gives
        for key in ("mean", "std"):
            a, b = torch.tensor(teacher.get(key, [])), torch.tensor(student.get(key, []))
            if a.shape != b.shape or not torch.allclose(a, b, rtol=0, atol=0.02):
                return f"{key} {teacher.get(key)}", f"{key} {student.get(key)}"
    if kind_t in ("pca", "zca") and teacher.get("shape") != student.get("shape"):
        return f"{kind_t} of shape {teacher.get('shape')}", f"{kind_s} of shape {student.get('shape')}"
    return None


__all__ = ["Teacher", "box_crops", "check_distill_settings", "distillation_loss", "soft_target_loss"]
