"""``cnnlab check``: the three sanity checks before any hyper-parameter grid, for any task and model.

    >>> from cnnlab.engine.check import check
    >>> result = check(config)                       # doctest: +SKIP
    >>> [s.verdict for s in result.steps], result.suggested_lr   # doctest: +SKIP

The recipe of the course notes (seed 004: "check the loss at initialisation, overfit a small
sample, find a learning rate at which the loss drops, then coarse grid"):

1. **Initial loss.** An untrained model should be unsure: the loss of the first batches against
   the task's expected value (``ln K`` for K classes; with auxiliary heads, the task's loss of uniform
   predictions from every head: ``(1 + 0.4) ln K`` for a segmenter with ``aux``), and that a few
   optimiser steps lower it.
2. **Overfit a small sample** (2 batches of 32 images, no augmentation, no weight decay): a model
   and loss that can learn drive the training loss near zero within ``overfit_steps`` steps.
   If they cannot, no amount of search will help (a bug, a frozen model, a far too small rate).
3. **Learning-rate range test** (Smith 2015, "Cyclical Learning Rates for Training Neural
   Networks", sec. 3.3): the rate grows exponentially from ``lr_min`` to ``lr_max`` over
   ``lr_steps`` steps while the smoothed loss is recorded, until it diverges. The suggestion is
   a tenth of the rate at the smoothed loss's minimum (the minimum sits just before the
   divergence, so a tenth of it is the largest rate safely inside the falling part; fastai's
   ``lr_find`` used the same rule); the steepest-descent rate is printed beside it.

Each step gets a verdict (PASS, WARN, FAIL) with its numbers; the plot marks the suggestion.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab._plot import pyplot, save_figure
from cnnlab.engine.config import DataConfig, TrainConfig, validate
from cnnlab.engine.evaluate import autocast
from cnnlab.engine.optim import build_optimizer, freeze
from cnnlab.engine.tasks import Task, get_task
from cnnlab.engine.trainer import resolve_device, use_amp
from cnnlab.layers.drop import DropConnectLinear, DropPath

# what the data keeps for the checks: no augmentation (step 2 must see the same images every step)
_DATA_KEPT = ("name", "root", "download", "val_fraction", "batch_size", "eval_batch_size", "image_size", "normalize",
              "train_limit", "num_workers")


@dataclass
class StepVerdict:
    """One check: ``PASS``, ``WARN`` or ``FAIL``, the numbers behind it and a sentence saying what they mean."""

    name: str
    verdict: str
    message: str
    numbers: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        return f"[{self.verdict}] {self.name}: {self.message}"


@dataclass
class CheckResult:
    """The three verdicts, the learning-rate range test's curve and suggestion, the plot."""

    steps: list[StepVerdict]
    suggested_lr: float | None
    steepest_lr: float | None
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    plot_path: Path | None
    seconds: float

    @property
    def failed(self) -> bool:
        return any(s.verdict == "FAIL" for s in self.steps)


def check_config(config: TrainConfig) -> TrainConfig:
    """``config`` without augmentation, weight decay, penalties, label smoothing or schedule (see the docstring)."""
    clean = copy.deepcopy(config)
    clean.data = DataConfig(**{k: getattr(config.data, k) for k in _DATA_KEPT})
    o = clean.optim
    o.weight_decay = o.l1 = o.l2 = o.label_smoothing = o.ema_decay = 0.0
    o.schedule, o.warmup_epochs = "constant", 0.0
    clean.plots, clean.quiet = False, True
    validate(clean)
    return clean


def _take(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (a tensor, or a tuple/list/dict of them); other batches whole."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, (tuple, list)) and all(isinstance(b, torch.Tensor) for b in batch):
        return type(batch)(b[:n] for b in batch)
    return batch


def _cycle(loader: Any) -> Iterator[Any]:
    """Batches of ``loader`` epoch after epoch (a shuffling loader reshuffles: the range test sees new batches)."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


class _Runner:
    """A fresh model and optimiser for one check, and the forward/backward of one batch."""

    def __init__(self, task: Task, config: TrainConfig, data: Any, device: torch.device, amp: bool,
                 regularise: bool = True) -> None:
        self.task, self.config, self.device, self.amp = task, config, device, amp
        torch.manual_seed(config.seed)  # every check starts from the same initial weights
        model = task.build_model(config, data, config.model.weights)
        if not regularise:  # dropout, drop-path and drop-connect off: overfitting is the point
            for m in model.modules():
                if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath, DropConnectLinear)):
                    m.p = 0.0
        if config.model.freeze:
            freeze(model, config.model.freeze)
        fmt = torch.channels_last if config.model.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=fmt).train()
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.optimizer = build_optimizer(model, config.optim, config.data.batch_size, config.model.lr_mult) \
            if self.trainable else None
        # each group's share of optim.lr (lr_mult, the batch-size rule): the range test sweeps optim.lr itself
        self.shares = [g["lr"] / config.optim.lr for g in self.optimizer.param_groups] if self.optimizer else []

    def set_lr(self, lr: float) -> None:
        for group, share in zip(self.optimizer.param_groups, self.shares):
            group["lr"] = lr * share

    def step(self, batch: Any) -> float:
        """One optimiser step on ``batch``; its loss before the step."""
        with autocast(self.device, self.amp):
            out = self.task.step(self.model, batch, self.config)
        loss = out.loss.float()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def measure(self, batches: list[Any], net: Any = None) -> dict[str, float]:
        """The task's training metrics on ``batches`` (train mode: as the training loop computes them)."""
        meter = self.task.meter(self.device)
        for batch in batches:
            with autocast(self.device, self.amp):
                meter.update(self.task.step(net or self.model, batch, self.config))
        return meter.compute()

    def uniform_loss(self, batches: list[Any]) -> float:
        """The task's loss on ``batches`` of an output shaped like the model's with every logit 0.

        Uniform predictions from every head: what an unsure untrained model should score. Going through the
        task's own loss counts what a formula would miss: auxiliary heads and their weight (GoogLeNet's,
        a segmenter's ``aux``), ignored pixels, a distillation teacher.
        """
        def unsure(x: torch.Tensor) -> Any:
            return _zeros_like(self.model(x))

        return self.measure(batches, unsure)["loss"]


def _zeros_like(output: Any) -> Any:
    """``output`` (a tensor, or a dict / tuple / named tuple / list of them) with every tensor replaced by zeros."""
    if isinstance(output, torch.Tensor):
        return torch.zeros_like(output)
    if isinstance(output, dict):
        return type(output)((k, _zeros_like(v)) for k, v in output.items())
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(_zeros_like(v) for v in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_zeros_like(v) for v in output)
    return output


def check(config: TrainConfig, *, sample_batches: int = 2, sample_size: int = 32, fall_steps: int = 10,
          overfit_steps: int = 200, lr_min: float = 1e-6, lr_max: float = 10.0, lr_steps: int = 100,
          plot_path: str | Path | None = None, say: Any = print) -> CheckResult:
    """Run the three checks on ``config``'s model and data (see the module docstring).

    Args:
        sample_batches, sample_size: the sample overfitted in step 2 (2 batches of 32 images).
        fall_steps: optimiser steps after which step 1 wants a lower loss.
        overfit_steps: the most steps step 2 may take (it stops once the loss is near zero).
        lr_min, lr_max, lr_steps: the range test's exponential sweep (it stops early when the loss diverges).
        plot_path: where the range test's PNG goes (None: no plot).
        say: called with each verdict line as it is known.
    """
    for key, value, low in (("sample_batches", sample_batches, 1), ("sample_size", sample_size, 1),
                            ("fall_steps", fall_steps, 1), ("overfit_steps", overfit_steps, 1),
                            ("lr_steps", lr_steps, 10)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CnnlabError(f"check {key} must be a whole number >= {low}, got {value!r}")
    if not 0 < lr_min < lr_max or not math.isfinite(lr_max):
        raise CnnlabError(f"check needs 0 < lr_min < lr_max (finite), got lr_min={lr_min}, lr_max={lr_max}")
    t0 = time.perf_counter()
    config = check_config(config)
    task = get_task(config)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        device = resolve_device(config.device)
        amp = use_amp(config.amp, device)
        data = task.build_data(config, device)
        task.prepare(data)
        torch.manual_seed(config.seed)
        sample = [_take(b, sample_size) for b in itertools.islice(iter(data.train), sample_batches)]
        # the range test runs first: checks 1 and 2 use the configured rate, or its suggestion where that is lower
        # (a rate that makes 64 images oscillate says nothing about the model; a too small one is what they catch)
        verdict, curve = _range_test(task, config, data, device, amp, lr_min, lr_max, lr_steps)
        suggested = verdict.numbers.get("suggested_lr")
        small = copy.deepcopy(config)
        if suggested is not None and suggested < config.optim.lr:
            small.optim.lr = suggested
        steps = [_initial_loss(task, small, data, device, amp, sample, fall_steps)]
        say(steps[-1].line())
        steps.append(_overfit(task, small, data, device, amp, sample, overfit_steps))
        say(steps[-1].line())
        steps.append(verdict)
        say(steps[-1].line())
    finally:
        torch.set_num_threads(threads)
    lrs, losses, smoothed = curve
    suggested, steepest = verdict.numbers.get("suggested_lr"), verdict.numbers.get("steepest_lr")
    path = None
    if plot_path is not None and lrs:
        path = plot_range_test(Path(plot_path), lrs, losses, smoothed, suggested, steepest,
                               f"{config.model.name} on {config.data.name}, {config.optim.optimizer}, "
                               f"batch {config.data.batch_size}")
    return CheckResult(steps, suggested, steepest, lrs, losses, smoothed, path, time.perf_counter() - t0)


def _initial_loss(task: Task, config: TrainConfig, data: Any, device: torch.device, amp: bool, sample: list[Any],
                  fall_steps: int) -> StepVerdict:
    """Step 1: the untrained model's loss against the task's expected value, then ``fall_steps`` steps lower it."""
    name = "1 initial loss"
    run = _Runner(task, config, data, device, amp)
    start = run.measure(sample)["loss"]
    expected = task.expected_initial_loss(data)
    numbers = {"loss": start, "expected": expected if expected is not None else math.nan}
    if not math.isfinite(start):
        return StepVerdict(name, "FAIL", f"the untrained model's loss is {start}: check the model's output and the "
                                         "input normalisation", numbers)
    if run.optimizer is None:
        return StepVerdict(name, "FAIL", f"loss {start:.4f}, but the model has no trainable parameters "
                                         "(model.freeze covers them all)", numbers)
    for i in range(fall_steps):
        run.step(sample[i % len(sample)])
    after = run.measure(sample)["loss"]
    numbers["after"] = after
    if expected is not None:  # the task expects uniform predictions: their loss through every head of this model
        expected = run.uniform_loss(sample)
        numbers["expected"] = expected
    fell = (start - after) / abs(start) if start else 0.0
    numbers["fell"] = fell
    text = f"loss {start:.4f}"
    verdict = "PASS"
    if expected is not None:
        off = (start - expected) / expected
        text += f" at initialisation (expected {expected:.4f}, {off:+.0%})"
        if abs(off) > 0.25:  # a confident untrained model: too large last-layer weights or a scaled output
            verdict = "WARN"
            text += " - far from the expected value: check the initialisation of the last layer"
    text += f"; after {fall_steps} steps at lr {config.optim.lr:.3g}: {after:.4f} ({-fell:+.1%})"
    numbers["lr"] = config.optim.lr
    if not math.isfinite(after) or after >= start * (1 - 1e-3):  # it must fall, by more than rounding
        verdict = "FAIL"
        text += " - the loss does not fall: a far too small or too large rate, frozen layers or a bug"
    elif after >= start * 0.99:  # it falls, slowly: a small net on tiny images often starts so (digits' 8x8)
        verdict = "WARN"
        text += " - the loss falls only slowly at this rate: see step 3's suggestion"
    return StepVerdict(name, verdict, text, numbers)


def _overfit(task: Task, config: TrainConfig, data: Any, device: torch.device, amp: bool, sample: list[Any],
             max_steps: int) -> StepVerdict:
    """Step 2: train on the small sample only; the loss must reach a tenth of its start (near zero)."""
    name = "2 overfit a small sample"
    run = _Runner(task, config, data, device, amp, regularise=False)
    count = sum(_count(b) for b in sample)
    start = run.measure(sample)
    numbers = {"loss_start": start["loss"], "images": count}
    if run.optimizer is None:
        return StepVerdict(name, "FAIL", "the model has no trainable parameters (model.freeze covers them all)",
                           numbers)
    end, steps = start, 0
    while steps < max_steps:
        for _ in range(10):
            run.step(sample[steps % len(sample)])
            steps += 1
        end = run.measure(sample)
        if not math.isfinite(end["loss"]) or end["loss"] <= 0.05 * start["loss"]:
            break
    ratio = end["loss"] / start["loss"] if start["loss"] else math.nan
    numbers.update(loss_end=end["loss"], ratio=ratio, steps=steps,
                   **{f"train_{k}": v for k, v in end.items() if k != "loss"})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in end.items() if k != "loss")
    numbers["lr"] = config.optim.lr
    text = (f"{count} images, {steps} steps at lr {config.optim.lr:.3g}: loss {start['loss']:.4f} -> {end['loss']:.4f} ({ratio:.1%} of the start)"
            + (f", {shown}" if shown else ""))
    # near zero relative to where it started (losses of other tasks have other scales than ln K)
    if math.isfinite(ratio) and ratio <= 0.1:
        return StepVerdict(name, "PASS", text, numbers)
    if math.isfinite(ratio) and ratio <= 0.5:
        return StepVerdict(name, "WARN", text + " - it learns, but slowly: more steps or a higher rate "
                                                "(step 3)", numbers)
    return StepVerdict(name, "FAIL", text + " - the model cannot fit even this sample: fix the model, the loss or "
                                            "the rate before any search", numbers)


def _count(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)


def _range_test(task: Task, config: TrainConfig, data: Any, device: torch.device, amp: bool, lr_min: float,
                lr_max: float, steps: int) -> tuple[StepVerdict, tuple[list[float], list[float], list[float]]]:
    """Step 3: Smith's learning-rate range test on the training batches."""
    name = "3 learning-rate range test"
    run = _Runner(task, config, data, device, amp)
    if run.optimizer is None:
        return StepVerdict(name, "FAIL", "the model has no trainable parameters", {}), ([], [], [])
    growth = (lr_max / lr_min) ** (1 / (steps - 1))
    beta, avg = 0.9, 0.0  # the smoothing of fastai's lr_find (bias-corrected moving average), over ~10 steps
    lrs, losses, smoothed = [], [], []
    best = math.inf
    batches = _cycle(data.train)
    for i in range(steps):
        lr = lr_min * growth ** i
        run.set_lr(lr)
        loss = run.step(next(batches))
        if not math.isfinite(loss):
            break
        avg = beta * avg + (1 - beta) * loss
        value = avg / (1 - beta ** (i + 1))
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(value)
        best = min(best, value)
        if i > 10 and value > 4 * best:  # diverged: the loss left its minimum far behind
            break
    numbers: dict[str, float] = {"steps": len(lrs), "lr_end": lrs[-1] if lrs else math.nan}
    if len(smoothed) < 10:
        return StepVerdict(name, "FAIL", f"the loss diverged within {len(smoothed)} steps from lr {lr_min:g}: "
                                         "lower check lr_min or look for a bug", numbers), (lrs, losses, smoothed)
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    start = smoothed[min(5, len(smoothed) - 1)]  # past the first steps, where the average is still noisy
    suggested = lrs[low] / 10
    logs = [math.log10(v) for v in lrs]
    slopes = [(smoothed[j + 1] - smoothed[j - 1]) / (logs[j + 1] - logs[j - 1]) for j in range(1, max(low, 2))]
    steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)] if slopes and low > 2 else suggested
    drop = (start - smoothed[low]) / abs(start) if start else 0.0
    numbers.update(min_lr=lrs[low], min_loss=smoothed[low], start_loss=start, drop=drop, suggested_lr=suggested,
                   steepest_lr=steepest)
    text = (f"{len(lrs)} steps from lr {lr_min:g} to {lrs[-1]:.3g}: smoothed loss {start:.4f} -> minimum "
            f"{smoothed[low]:.4f} at lr {lrs[low]:.3g}; suggested lr {suggested:.3g} (a tenth of the minimum's), "
            f"steepest descent at {steepest:.3g}")
    if drop < 0.005:  # flat: within the step-to-step noise of the smoothed loss
        return StepVerdict(name, "FAIL", text + " - no rate in the range made the loss fall (by 0.5% or more)",
                           numbers), (lrs, losses, smoothed)
    if drop < 0.1:
        return StepVerdict(name, "WARN", text + f" - the loss fell only {drop:.0%}: more lr_steps give each rate "
                                                "more steps (a longer sweep reads clearer)", numbers), (lrs, losses, smoothed)
    if len(lrs) == steps and smoothed[-1] <= 1.5 * smoothed[low]:
        return StepVerdict(name, "WARN", text + f" - the loss did not diverge up to {lr_max:g}: the range may end too "
                                                "early", numbers), (lrs, losses, smoothed)
    return StepVerdict(name, "PASS", text, numbers), (lrs, losses, smoothed)


def plot_range_test(path: Path, lrs: list[float], losses: list[float], smoothed: list[float],
                    suggested: float | None, steepest: float | None, title: str) -> Path:
    """Loss against learning rate (log axis): raw and smoothed, the suggestion and the steepest point marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(lrs, losses, color="0.75", lw=0.8, label="loss per step")
    ax.plot(lrs, smoothed, color="C0", lw=2, label="smoothed loss")
    if suggested is not None:
        ax.axvline(suggested, color="C3", ls="--", label=f"suggested lr {suggested:.3g}")
    if steepest is not None:
        ax.axvline(steepest, color="C2", ls=":", label=f"steepest descent {steepest:.3g}")
    ax.set_xscale("log")
    top = max(smoothed[: max(len(smoothed) // 10, 1)] + [min(smoothed) * 1.5])
    ax.set_ylim(min(smoothed) * 0.9 if min(smoothed) > 0 else None, max(top * 1.3, min(smoothed) * 2))
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test (Smith 2015)\n{title}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path
