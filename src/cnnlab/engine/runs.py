"""Reading a finished (or interrupted) run folder back: its model, classes and preprocessing."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.engine.checkpoint import load_checkpoint
from cnnlab.engine.config import TrainConfig


@dataclass
class LoadedRun:
    """A run's model with its trained weights, and what is needed to feed it.

    Args:
        model: eval mode, on the CPU; config: the run's TrainConfig; classes: label names;
        input_shape: (C, H, W) it was trained on; preprocess: the fitted normalisation state;
        tag: the weights loaded, by default those the run reported (``best``, ``last`` or ``last+ema``);
        task: the run's task (``classification``, ``reconstruction``).
    """

    model: nn.Module
    config: TrainConfig
    classes: list[str]
    input_shape: tuple[int, int, int]
    preprocess: dict[str, Any]
    tag: str
    epoch: int
    task: str = "classification"


def load_run(run_dir: str | os.PathLike, tag: str | None = None) -> LoadedRun:
    """Rebuild the model of ``run_dir`` that the run reported (see ``trainer.reported_checkpoint``), or ``tag``'s."""
    run_dir = Path(run_dir)
    expected = "expected a run folder written by `cnnlab train` (runs/<name>)"
    if run_dir.is_file():
        raise CnnlabError(f"{run_dir} is a file, not a run folder; {expected}")
    if not run_dir.is_dir():
        raise CnnlabError(f"run folder {run_dir} does not exist; {expected}")
    saved = [t for t in ("best", "last") if (run_dir / f"{t}.json").is_file()]
    if not saved:
        if not (run_dir / "config.json").is_file():
            raise CnnlabError(f"{run_dir} is not a run folder (no config.json, best.json or last.json); {expected}")
        raise CnnlabError(f"{run_dir} holds no checkpoint yet (the run stopped before its first epoch ended); "
                          "continue it with `cnnlab train --resume` or train it again")
    if tag is None:  # the model the run reported (results.json): the trainer's rule
        from cnnlab.engine.trainer import reported_checkpoint

        tag = reported_checkpoint(run_dir, _saved_config(run_dir, saved[-1]))
        if tag not in saved:
            tag = saved[0]
    elif tag not in saved:
        raise CnnlabError(f"{run_dir} has no {tag!r} checkpoint; it has: {', '.join(saved)}")
    ckpt = load_checkpoint(run_dir, tag)
    meta = ckpt.meta
    use_ema = tag == "last" and ckpt.ema is not None  # what the trainer tested when the run kept an EMA
    try:
        config = TrainConfig.from_dict(meta["config"])
        input_shape = tuple(meta["input_shape"])
        meta["model"], meta["num_classes"], meta["classes"], meta["preprocess"], meta["epoch"]  # noqa: B018
    except (KeyError, TypeError) as e:
        raise CnnlabError(f"{run_dir}/{tag}.json is corrupt: it lacks {e} (the model, classes and input shape "
                          "a checkpoint records)") from None
    from cnnlab.engine.tasks._model import rebuild_model

    model = rebuild_model(meta, config.model.options)
    if meta.get("pruned_structure"):  # `cnnlab prune --structured`: the layers have fewer channels
        from cnnlab.compress.prune_structured import apply_structure

        apply_structure(model, meta["pruned_structure"], ckpt.weights)
    try:
        if use_ema:
            from cnnlab.engine.trainer import ema_weights

            model.load_state_dict(ema_weights(ckpt.ema))
        else:
            model.load_state_dict(ckpt.weights)
    except RuntimeError as e:
        raise CnnlabError(f"{run_dir}/{tag}.safetensors does not fit {meta['model']}: {str(e).splitlines()[0]}") from None
    return LoadedRun(model.eval(), config, list(meta["classes"]), input_shape, meta["preprocess"],
                     "last+ema" if use_ema else tag, meta["epoch"], meta.get("task", "classification"))


def _saved_config(run_dir: Path, tag: str) -> TrainConfig:
    """The run's config (config.json, else the one its checkpoint recorded)."""
    import json

    try:
        return TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, CnnlabError):
        return TrainConfig.from_dict(load_checkpoint(run_dir, tag).meta.get("config", {}))
