"""The training loop: ``train(config) -> RunResult``, resumable exactly from its last checkpoint."""
from __future__ import annotations

import copy
import itertools
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab._io import atomic_write_text, dumps_json
from cnnlab.engine import report
from cnnlab.engine.checkpoint import load_checkpoint, save_checkpoint
from cnnlab.engine.config import TrainConfig, validate
from cnnlab.engine.data_setup import DataBundle
from cnnlab.engine.distributed import setup_distributed
from cnnlab.engine.evaluate import EvalResult, autocast
from cnnlab.engine.optim import build_optimizer, freeze, lr_factor, match_state_layout, penalty, set_lr
from cnnlab.engine.tasks import Task, TaskResult, get_task
from cnnlab.engine.tasks._model import model_channels  # noqa: F401 - re-exported (ensembles use it)
from cnnlab.engine.time_budget import END_RESERVE_S, TimeBudget

EpochCallback = Callable[[dict[str, Any]], None]


class TrainingDiverged(CnnlabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    """What a finished run returns (and leaves in ``run_dir``).

    Args:
        run_dir: the run folder; history: one dict per epoch (the rows of metrics.csv).
        test: metrics on the test split of the model reported (best by validation, else last): an
            EvalResult for classification, a TaskResult (``.loss``, ``.metrics``) for other tasks.
        model: that model, in eval mode, on the training device.
        best_epoch: epoch of the best validation metric (the last epoch without validation).
        stopped_early: early stopping ended the run before ``config.epochs``.
        wall_s, cpu_s: wall-clock and process CPU seconds of the whole run (setup included).
    """

    run_dir: Path
    config: TrainConfig
    history: list[dict[str, Any]]
    test: EvalResult | TaskResult | None
    model: nn.Module = field(repr=False)
    classes: list[str] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    wall_s: float = 0.0
    cpu_s: float = 0.0
    task: str = "classification"
    planned_steps: int | None = None  # the steps a time budget allowed (None: the epochs decided)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnlabError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnlabError(f"device {name!r} requested but CUDA is not available; use device=cpu or auto")
    return device


def use_amp(amp: str, device: torch.device) -> bool:
    """bf16 autocast: 'auto' turns it on for CUDA only; 'bf16' also on CPUs (fast where they have bf16 units)."""
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def run_folder(config: TrainConfig) -> Path:
    """``out_dir/name``; without a name, ``model-data-date`` made unique (two runs in one second: ``-2``)."""
    if config.name:
        return Path(config.out_dir) / config.name
    base = Path(config.out_dir) / f"{config.model.name}-{Path(config.data.name).name}-{datetime.now():%Y%m%d-%H%M%S}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def build_model(config: TrainConfig, num_classes: int, input_shape: tuple[int, int, int], weights: str | None) -> nn.Module:
    """The configured model for data with ``num_classes`` classes and images of ``input_shape`` (its task's rules)."""
    from cnnlab.engine.tasks._model import build_registered_model

    task = get_task(config)
    return build_registered_model(config, input_shape, weights, num_classes if task.model_takes_num_classes else None)


def _log(config: TrainConfig, text: str) -> None:
    if not config.quiet:
        print(text, flush=True)


def train(config: TrainConfig, *, resume: bool = False, callbacks: Sequence[EpochCallback] = (),
          data: DataBundle | None = None, model: nn.Module | None = None) -> RunResult:
    """Train, validate, checkpoint and test one run as ``config`` says; see docs/training.md.

    With ``resume=True`` the run folder's ``last`` checkpoint is loaded and training continues
    from the epoch after it: on the CPU the final weights equal those of an uninterrupted run.
    ``callbacks`` are called with each epoch's metrics row (hyper-parameter search, ensembles);
    ``data`` replaces the loaders built from ``config.data`` (bootstrap samples, custom datasets);
    ``model`` replaces the registry's ``config.model.name`` (a module of your own, trained with the
    same engine: its run folder holds its weights, but ``cnnlab eval``/``predict`` need a registered
    model to rebuild it; ``config.model.name`` still picks the task). ``config`` itself is not
    changed (the run works on a copy, returned in the result).
    """
    if not isinstance(config, TrainConfig):  # validate() would fail on a dict with an AttributeError
        raise CnnlabError(f"train() takes a TrainConfig (cnnlab.engine.TrainConfig, or TrainConfig.from_dict(d)), "
                          f"got {type(config).__name__}")
    validate(config)
    config = copy.deepcopy(config)
    threads = torch.get_num_threads()
    try:
        return _train(config, resume, callbacks, data, model)
    finally:
        torch.set_num_threads(threads)  # config.threads holds for this run only


def _claim_run_folder(run_dir: Path, config: TrainConfig) -> None:
    """Write the run's config.json, unless another run has written one since this run checked the folder (two
    runs started in the same second under a timestamped name, say): then stop before either is corrupted."""
    try:
        atomic_write_text(run_dir / "config.json", config.to_json(), exclusive=True)
    except FileExistsError:
        raise CnnlabError(f"run folder {run_dir} was taken by another run after this one started (the same name, "
                          "started at the same time?); nothing of it was changed. Run again, or choose another name "
                          "(--name / --set name=...)") from None


def _check_run_folder(run_dir: Path, resume: bool) -> None:
    if not resume and (run_dir / "last.json").exists():
        raise CnnlabError(f"run folder {run_dir} already holds a run; resume it (--resume) or choose another name")
    for folder in (run_dir, *run_dir.parents):  # fail now, not at mkdir after the data is loaded
        if folder.exists() and not folder.is_dir():
            raise CnnlabError(f"run folder {run_dir}: {folder} is a file; choose another name or out_dir")
    if not resume and run_dir.is_dir() and not (run_dir / "config.json").exists() and any(
            not p.name.endswith(".tmp") for p in run_dir.iterdir()):
        # a run writes config.json, metrics.csv, report.html ...: never over a user's own files (under torchrun
        # rank 0 may already be writing config.json: its temporary file is not someone else's)
        raise CnnlabError(f"{run_dir} already exists and holds files that are not a run; choose another name "
                          "(or out_dir), or empty that folder")


def _train(config: TrainConfig, resume: bool, callbacks: Sequence[EpochCallback], data: DataBundle | None,
           given_model: nn.Module | None) -> RunResult:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    # a module of the caller's own names its task (config.task); a registry model's entry does
    task = get_task(config.task, loss=config.loss) if given_model is not None and config.task != "auto" else get_task(config)
    default_monitor = getattr(task, "default_monitor", None)  # detection: val_AP (its loss is not what it is judged by)
    if default_monitor is not None and config.monitor == "val_loss":  # the config's default: the task's default
        config.monitor = default_monitor
    if config.monitor not in task.monitor_keys():
        raise CnnlabError(f"monitor={config.monitor!r} is not a metric of the {task.name} task; choose "
                          f"{', '.join(task.monitor_keys())}")
    env = setup_distributed(resolve_device(config.device))  # a no-op unless started by torchrun
    run_dir = env.broadcast(run_folder(config))  # rank 0's name (it holds the date) on every rank
    config.quiet = config.quiet or not env.is_main  # one process prints
    if not config.name:
        config.name = run_dir.name
    _check_run_folder(run_dir, resume)
    ckpt = load_checkpoint(run_dir, "last") if resume else None  # read (and checked) before anything is written
    if ckpt is not None and "config" in ckpt.meta:
        _check_resume_config(ckpt.meta["config"], config, run_dir, ckpt.meta.get("planned_steps"))
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = env.device
    amp = use_amp(config.amp, device)
    channels_last = config.model.channels_last

    if data is None:
        data = task.build_data(config, device)
    data = env.shard(data)  # each rank sees its part of every global batch
    task.prepare(data)
    if given_model is not None and not isinstance(given_model, nn.Module):
        raise CnnlabError(f"train(model=...) takes an nn.Module, got {type(given_model).__name__}")
    if given_model is not None:  # (not `or`: a Sequential's truth is its length)
        model = given_model
    else:
        model = task.build_model(config, data, None if ckpt else config.model.weights)
    if config.model.freeze:
        freeze(model, config.model.freeze)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, config.optim, config.data.batch_size, config.model.lr_mult)
    ema = _Ema(model, config.optim.ema_decay) if config.optim.ema_decay else None

    history: list[dict[str, Any]] = []
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "planned_steps": None}
    if ckpt is not None:
        model.load_state_dict(ckpt.weights)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
            match_state_layout(optimizer)  # the fused update needs the parameters' strides
        if ema is not None and ckpt.ema is not None:
            ema.load(ckpt.ema)
        history = ckpt.meta.get("history", [])
        state.update({k: ckpt.meta[k] for k in state if k in ckpt.meta})
    _log(config, f"run {run_dir}  ({'resumed at epoch ' + str(state['epoch']) if ckpt else 'new'})\nconfig:\n{config.describe()}")
    _log(config, f"{task.name} task, device {device}{' (bf16 autocast)' if amp else ''}, "
                 f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(data.train)} steps per epoch, "
                 f"classes: {len(data.classes)}")

    net = env.wrap(model)  # DistributedDataParallel under torchrun, else the model itself
    if config.model.compile:  # the checkpoints keep saving `model`: its keys have no `_orig_mod.` prefix
        net = torch.compile(net, mode=None if config.model.compile_mode == "default" else config.model.compile_mode)
    steps_per_epoch = len(data.train)
    budget = None
    if config.time_budget and state["planned_steps"] is None:
        budget = TimeBudget(config.time_budget, wall0, state["step"])
    meta_base = {"model": config.model.name, "task": task.name, "num_classes": data.num_classes,
                 "input_shape": list(data.input_shape), "classes": data.classes,
                 "preprocess": data.preprocess_state, "config": config.to_dict()}
    loop = _Loop(task, net, model, data, optimizer, ema, config, state, steps_per_epoch, device, amp, run_dir,
                 budget, env)
    stopped_early = False
    # a resumed run's folder is its own; a new run (or an old one without config.json) claims it at its first checkpoint
    owned = ckpt is not None and (run_dir / "config.json").exists()
    for epoch in range(state["epoch"], config.epochs):
        if state["planned_steps"] is not None and state["step"] >= state["planned_steps"]:
            break  # the time budget's steps are done
        # dropout & co. depend on the epoch (and rank) only: exact resumes
        torch.manual_seed(config.seed * 7919 + epoch + 1_000_003 * env.rank)
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch)
        row = loop.epoch(epoch)
        eval_model = ema.module if ema is not None else model
        env.sync_buffers(model, eval_model)  # rank 0's BatchNorm statistics everywhere
        if data.val is not None:
            val = task.evaluate(eval_model, data.val, data, amp=amp, tta_flip=config.tta_flip)
            row.update(val_loss=val.loss, **{f"val_{m}": val.metrics[m] for m in task.metrics})
        row = env.reduce_row(row)  # one row on every rank: the same early-stopping decision
        history.append(row)
        state["epoch"] = epoch + 1
        if state["planned_steps"] is not None and state["step"] < state["planned_steps"]:
            loop.past_deadline()  # before the checkpoint: it must hold the plan as cut
        improved = _update_best(task, config, state, row)
        meta = dict(meta_base, **state, history=history)
        ema_state = ema.state() if ema is not None else None
        if env.is_main:
            if not owned:  # config.json is written with the first checkpoint: a run that fails before it
                run_dir.mkdir(parents=True, exist_ok=True)  # leaves no folder behind
                _claim_run_folder(run_dir, config)
                owned = True
            if improved and data.val is not None:  # `best` exists only where validation chose it
                save_checkpoint(run_dir, "best", eval_model, meta, None, None, data.preprocess_tensors)
            save_checkpoint(run_dir, "last", model, meta, optimizer, ema_state, data.preprocess_tensors)
            report.write_metrics(run_dir / "metrics.csv", history, columns=list(row))
        _log(config, _epoch_line(row, loop.epochs_planned()))
        for callback in callbacks:
            callback(row)
        if config.patience and state["bad_epochs"] >= config.patience:
            _log(config, f"early stopping: {config.monitor} did not improve for {config.patience} epochs "
                         f"(best {state['best']:.4f} at epoch {state['best_epoch']})")
            stopped_early = True
            break

    env.barrier()  # rank 0 has written the checkpoint every rank reads next
    final = ema.module if ema is not None else model
    tag = reported_checkpoint(run_dir, config)
    if tag == "best":
        final.load_state_dict(load_checkpoint(run_dir, "best").weights)  # report the model chosen on validation
    test = task.evaluate(final, data.test, data, amp=amp, tta_flip=config.tta_flip)
    result = RunResult(run_dir, config, history, test, final.eval(), data.classes, state["best_epoch"] or state["epoch"],
                       stopped_early, time.perf_counter() - wall0, time.process_time() - cpu0, task.name,
                       state["planned_steps"])
    if env.is_main:
        _write_results(result, task, data, tag)
    return result


def reported_checkpoint(run_dir: Path, config: TrainConfig) -> str:
    """The one rule for which weights a run stands for: ``best`` when a validation split chose them, else
    ``last`` (its EMA weights when the run kept an EMA). ``train()``, ``cnnlab eval``/``predict``/
    ``explain`` and ensembles all follow it, so they report the same model."""
    return "best" if config.data.val_fraction > 0 and (run_dir / "best.json").is_file() else "last"


# what a resumed run may change: how long it runs, where and how it reports; not what it computes
RESUME_MAY_CHANGE = ("epochs", "patience", "quiet", "plots", "device", "threads", "out_dir", "name", "data.root",
                     "data.download", "data.num_workers", "data.eval_batch_size")


def _check_resume_config(saved: dict[str, Any], config: TrainConfig, run_dir: Path, planned_steps: int | None) -> None:
    """A resume continues the same run exactly: a changed learning rate, model or augmentation is refused.

    More (or fewer) epochs are allowed where the schedule does not depend on the run's length
    (``constant``, ``step``: the same schedule continues). ``onecycle`` and ``cosine`` are laid over
    all the steps, so a new length would change the learning rate of the steps already planned:
    refused, unless a time budget already fixed the steps (then ``epochs`` is only an upper limit).
    """
    from cnnlab.engine.resumable import config_differences

    changed = config_differences(saved, config.to_dict(), ignore=RESUME_MAY_CHANGE)
    saved_epochs = saved.get("epochs", config.epochs)
    if (saved_epochs != config.epochs and config.optim.schedule in ("onecycle", "cosine") and planned_steps is None):
        changed.append(f"epochs: {saved_epochs} -> {config.epochs} (the {config.optim.schedule} schedule is laid over "
                       f"the run's {saved_epochs} epochs; a new length would change it)")
    if changed:
        raise CnnlabError(f"--resume continues {run_dir} exactly, but these settings differ from its config: "
                          f"{'; '.join(changed)}. Leave them out (a resume may change only "
                          f"{', '.join(RESUME_MAY_CHANGE[:6])}, ...), or start a new run from its weights: "
                          f"--weights {run_dir / 'last.safetensors'}")


class _Ema:
    """Exponential moving average of the weights and floating buffers, evaluated instead of the raw model.

    One fused ``lerp`` over all tensors per step and no host round trip (torch's AveragedModel
    reads a step counter back from the device twice per update, stalling a GPU every batch).
    Integer buffers (BatchNorm's batch counters) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self._pairs: tuple | None = None  # the tensor lists, gathered once (state_dict loads copy in place)
        self._source: nn.Module | None = None

    @staticmethod
    def _tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tensors = [t.detach() for t in itertools.chain(module.parameters(), module.buffers())]
        return [t for t in tensors if t.is_floating_point()], [t for t in tensors if not t.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._source is not model:
            self._source, self._pairs = model, (self._tensors(self.module), self._tensors(model))
        (avg_float, avg_int), (new_float, new_int) = self._pairs
        torch._foreach_lerp_(avg_float, new_float, 1.0 - self.decay)
        for avg, new in zip(avg_int, new_int):
            avg.copy_(new)

    def state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(ema_weights(state))


def ema_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's EMA state as the model's state_dict (cnnlab <= 0.1 saved torch's AveragedModel:
    keys under ``module.`` and a step counter ``n_averaged``; later versions save plain keys)."""
    if "n_averaged" in state:
        return {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
    return dict(state)


class _Loop:
    """One epoch of optimisation steps, for any task: the task forwards a batch and computes the loss."""

    def __init__(self, task: Task, net, model, data: DataBundle, optimizer, ema, config: TrainConfig, state,
                 steps_per_epoch: int, device: torch.device, amp: bool, run_dir: Path, budget: TimeBudget | None,
                 env) -> None:
        self.task, self.net, self.model, self.data, self.optimizer, self.ema = task, net, model, data, optimizer, ema
        self.config, self.state, self.steps_per_epoch = config, state, steps_per_epoch
        self.device, self.amp, self.run_dir, self.budget, self.env = device, amp, run_dir, budget, env
        self.limit = steps_per_epoch * config.epochs
        # the time budget's hard end for starting a step (set by the plan): the plan fixes the step count once,
        # for exact resumes, so a machine that slows down later (another job, thermal limits) would overrun it
        self.deadline: float | None = None
        self.step_s = self.planned_step_s = 0.0  # the planned seconds per step; then step_s is the latest step's
        self.refine_at: int | None = None  # the step after which the provisional plan is re-timed
        self._pass_s: tuple[float, float] | None = None  # one validation pass and the test pass, timed once

    def total_steps(self) -> int:
        """What the schedule is laid over: the budget's steps once planned, else all the epochs'."""
        return self.state["planned_steps"] or self.limit

    def epochs_planned(self) -> int:
        return -(-self.total_steps() // self.steps_per_epoch)

    def _plan(self, final: bool) -> None:
        """The time budget's decision, taken on rank 0 and shared (every rank runs the same steps): a provisional
        plan from the first timed steps, then the final one from the steps after it (``refine_at``)."""
        data, task = self.data, self.task
        model = self.ema.module if self.ema is not None else self.model

        def pass_seconds(batches) -> float:  # one batch timed, times the batches of a pass
            if batches is None:
                return 0.0
            t0 = time.perf_counter()
            task.evaluate(model, _first(batches), data, amp=self.amp, tta_flip=self.config.tta_flip)
            return (time.perf_counter() - t0) * len(batches)

        if self._pass_s is None:  # timed once, with the provisional plan
            self._pass_s = pass_seconds(data.val), pass_seconds(data.test)
        val_s, test_s = self._pass_s
        step, budget = self.state["step"], self.budget
        plan = self.env.broadcast(budget.plan(step, self.steps_per_epoch, self.limit, val_s, test_s))
        self.state["planned_steps"] = plan.steps
        if final:
            if not self.env.enabled:  # under torchrun every rank must stop at the same step: the plan alone decides
                self.deadline = budget.start + budget.budget_s - val_s - test_s - END_RESERVE_S
                self.step_s = plan.step_s
            self.planned_step_s = plan.step_s
            self.budget, self.refine_at = None, None
        else:
            budget.mark_provisional(step)
            self.refine_at = budget.refine_at(plan.steps, step)
        what = plan.describe(self.steps_per_epoch, self.limit, self.config.time_budget)
        _log(self.config, what + ("" if final else f"; provisional, re-timed after step {self.refine_at:,}"))

    def past_deadline(self) -> bool:
        """True when the next step would end after the budget's deadline; the plan is then cut to the steps
        done (saved with the checkpoint, so a resume stays exact) and the run goes on to its last evaluation."""
        if self.deadline is None or time.perf_counter() + self.step_s <= self.deadline:
            return False
        state, planned = self.state, self.state["planned_steps"]
        state["planned_steps"], self.deadline = state["step"], None
        _log(self.config, f"time budget: behind the plan (the last step took {1000 * self.step_s:.0f} ms, "
                          f"{1000 * self.planned_step_s:.0f} ms were planned; checkpoints and validation count too); "
                          f"stopping at step {state['step']:,} of {planned:,} to end on time")
        return True

    def epoch(self, epoch: int) -> dict[str, Any]:
        from tqdm import tqdm

        task, config, state, optimizer, model = self.task, self.config, self.state, self.optimizer, self.model
        model.train()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        meter = task.meter(self.device)
        lr = optimizer.param_groups[0]["lr"]
        check_every = 1 if self.device.type == "cpu" else 50  # a NaN check is a host sync on GPUs
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs_planned()}", leave=False,
                   unit="batch", disable=config.quiet or not sys.stderr.isatty(), dynamic_ncols=True)
        loss = None
        t_step = time.perf_counter()
        for i, batch in enumerate(self.data.train):
            if state["planned_steps"] is not None and state["step"] >= state["planned_steps"]:
                break  # the time budget ends this (last) epoch early
            if i and self.past_deadline():  # (the first step: train() asked after the last epoch; never empty)
                break
            lr = set_lr(optimizer, lr_factor(config.optim, state["step"], self.steps_per_epoch, self.total_steps()))
            with autocast(self.device, self.amp):
                out = task.step(self.net, batch, config)
            loss = out.loss
            extra = penalty(model, config.optim.l1, config.optim.l2)
            if extra is not None:
                loss = loss + extra
            if (i + 1) % check_every == 0 and not math.isfinite(loss.item()):
                bar.close()
                raise self._diverged(f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm)
            optimizer.step()
            if self.ema is not None:
                self.ema.update(model)
            state["step"] += 1
            meter.update(out)
            now = time.perf_counter()
            if self.deadline is not None:
                self.step_s = now - t_step  # the data's wait included: what the next step will likely cost
            t_step = now
            if self.budget is not None:
                ready = self.budget.after_step(state["step"])
                if self.refine_at is None:
                    # a clock decides when the timing is enough: rank 0's, or the ranks would plan at other steps
                    if self.env.broadcast(ready):
                        self._plan(final=False)
                elif state["step"] >= self.refine_at:  # from the shared plan: the same step on every rank
                    self._plan(final=True)
                bar.total = min(self.steps_per_epoch, self.total_steps() - epoch * self.steps_per_epoch)
            if not bar.disable and (bar.n % 10 == 0 or i + 1 == self.steps_per_epoch):  # .item() syncs a GPU
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{meter.seen / (time.perf_counter() - wall0):.0f}")
            bar.update(1)
        bar.close()
        if self.budget is not None:  # an epoch shorter than the timing: plan now, so every checkpoint holds the plan
            self._plan(final=True)
        values = meter.compute()
        if not math.isfinite(values["loss"]) or not _finite_weights(model):
            # the loss of the last step is in the mean; weights a last step made NaN are caught here
            raise self._diverged(f"{'loss' if not math.isfinite(values['loss']) else 'the weights'} became "
                                 f"non-finite during epoch {epoch + 1}")
        elapsed = time.perf_counter() - wall0
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": values["loss"]}
        # what the meter measured besides the loss (the task's metrics; detection: each named loss), in its order
        row.update({f"train_{k}": v for k, v in values.items() if k != "loss"})
        row.update({"val_loss": None, **{f"val_{m}": None for m in task.metrics}})
        row.update(lr=lr, time_s=elapsed, cpu_s=time.process_time() - cpu0,
                   images_per_s=meter.seen / max(elapsed, 1e-9))
        return row

    def _diverged(self, what: str) -> TrainingDiverged:
        kept = f"epoch {self.state['epoch']}" if self.state["epoch"] else "none yet"
        return TrainingDiverged(f"{what}: training stopped. The last good checkpoint ({kept}) is kept in {self.run_dir}. "
                                "Try a lower optim.lr, optim.clip_grad_norm=1 or amp=none")


def _first(batches):
    """The first batch of a loader, as a one-batch iterable."""
    for batch in batches:
        return [batch]
    return []


def _finite_weights(model: nn.Module) -> bool:
    """One host sync per epoch: are all parameters finite (a last step can turn them NaN with a finite loss)?"""
    norms = [p.detach().float().abs().max() for p in model.parameters() if p.is_floating_point() and p.numel()]
    return not norms or bool(torch.stack(norms).isfinite().all())


def _update_best(task: Task, config: TrainConfig, state: dict[str, Any], row: dict[str, Any]) -> bool:
    """Track the monitored metric (validation when there is a split, else the training loss)."""
    key = config.monitor if row.get("val_loss") is not None else "train_loss"
    value = row[key]
    best = state["best"]
    if best is None or (value > best if task.higher_is_better(key) else value < best):
        state.update(best=value, best_epoch=row["epoch"], bad_epochs=0)
        return True
    state["bad_epochs"] += 1
    return False


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    def metrics(split: str) -> str:
        return " ".join(f"{k[len(split) + 1:]} {v:.4f}" for k, v in row.items()
                        if k.startswith(split + "_") and v is not None)

    text = f"epoch {row['epoch']:>3}/{epochs}  train {metrics('train')}"
    if row.get("val_loss") is not None:
        text += f"  val {metrics('val')}"
    return text + f"  lr {row['lr']:.3g}  {row['time_s']:.1f}s ({row['cpu_s']:.1f} cpu-s, {row['images_per_s']:.0f} img/s)"


def _write_results(result: RunResult, task: Task, data: DataBundle, tag: str) -> None:
    run_dir, test = result.run_dir, result.test
    summary = {"task": task.name, **task.summary(test),
               "test_metrics": {"loss": test.loss, **test.metrics}, "reported_checkpoint": tag,
               "best_epoch": result.best_epoch, "epochs_run": len(result.history), "stopped_early": result.stopped_early,
               "planned_steps": result.planned_steps, "time_budget_s": result.config.time_budget or None,
               "wall_s": result.wall_s, "cpu_s": result.cpu_s, "classes": result.classes}
    atomic_write_text(run_dir / "results.json", dumps_json(summary, indent=2))
    if result.config.plots and result.history:
        report.plot_curves(run_dir / "curves.png", result.history)
        task.plots(run_dir, test, data, result.model)
        try:
            from cnnlab.engine.html_report import write_html_report

            write_html_report(run_dir)
        except Exception as e:  # noqa: BLE001 - the run is done and saved; a page that fails must not undo that
            warnings.warn(f"report.html was not written ({type(e).__name__}: {e}); `cnnlab report {run_dir}` retries",
                          stacklevel=2)
