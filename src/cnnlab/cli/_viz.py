"""What the viz commands share: a trained run folder or a registered model name -> model, classes, input, preprocessing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the commands, not while the parser is built
    from torch import nn


@dataclass
class Target:
    """A model to look inside. Args: model (eval mode); classes (None for an untrained model);
    input_shape (C, H, W) images are resized to; preprocess (a run's normalisation or None); label for titles."""

    model: nn.Module
    classes: list[str] | None
    input_shape: tuple[int, int, int]
    preprocess: Any
    label: str
    trained: bool


def load_target(spec: str, size: tuple[int, int] | None = None, checkpoint: str | None = None) -> Target:
    """``spec`` is a run folder (its best checkpoint) or a registered model name (random weights)."""
    import torch

    if Path(spec).exists() or "/" in spec:  # a file is refused by load_run as not a run folder
        from cnnlab.engine.data_setup import preprocess_from_state
        from cnnlab.engine.runs import load_run

        run = load_run(spec, checkpoint)
        shape = run.input_shape if size is None else (run.input_shape[0], *size)
        label = f"{Path(spec).name} ({run.tag} checkpoint, epoch {run.epoch})"
        return Target(run.model, run.classes, shape, preprocess_from_state(run.preprocess), label, True)
    from cnnlab.models.registry import create_model, model_info

    info = model_info(spec)  # an unknown name suggests the closest
    torch.manual_seed(0)  # the same random weights every time
    shape = info.default_input if size is None else (info.default_input[0], *size)
    return Target(create_model(spec).eval(), None, shape, None, f"{spec} (random weights)", False)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``64`` or ``64x96`` -> (H, W)."""
    from cnnlab._errors import CnnlabError

    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise CnnlabError(f"--size must be H or HxW in pixels (e.g. 64 or 64x96), got {text!r}")
    return (values[0], values[-1])
