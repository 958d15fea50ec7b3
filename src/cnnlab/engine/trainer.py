"""The training loop: ``train(config) -> RunResult``, resumable exactly from its last checkpoint."""
from __future__ import annotations

import copy
import itertools
import json
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
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab._io import atomic_write_text
from cnnlab.engine import report
from cnnlab.engine.checkpoint import load_checkpoint, save_checkpoint
from cnnlab.engine.config import TrainConfig, validate
from cnnlab.engine.data_setup import DataBundle, build_data
from cnnlab.engine.distributed import setup_distributed
from cnnlab.engine.evaluate import EvalResult, autocast, evaluate
from cnnlab.engine.optim import build_optimizer, freeze, lr_factor, penalty, set_lr

EpochCallback = Callable[[dict[str, Any]], None]


class TrainingDiverged(CnnlabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    """What a finished run returns (and leaves in ``run_dir``).

    Args:
        run_dir: the run folder; history: one dict per epoch (the rows of metrics.csv).
        test: metrics on the test split of the model reported (best by validation, else last).
        model: that model, in eval mode, on the training device.
        best_epoch: epoch of the best validation metric (the last epoch without validation).
        stopped_early: early stopping ended the run before ``config.epochs``.
        wall_s, cpu_s: wall-clock and process CPU seconds of the whole run (setup included).
    """

    run_dir: Path
    config: TrainConfig
    history: list[dict[str, Any]]
    test: EvalResult | None
    model: nn.Module = field(repr=False)
    classes: list[str] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    wall_s: float = 0.0
    cpu_s: float = 0.0


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
    name = config.name or f"{config.model.name}-{Path(config.data.name).name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.out_dir) / name


def build_model(config: TrainConfig, num_classes: int, input_shape: tuple[int, int, int], weights: str | None) -> nn.Module:
    """The configured model for this data; a model that cannot take these images fails here, clearly.

    ``weights`` is ``"torchvision"``/``"timm"`` (pretrained, head replaced for ``num_classes``) or a
    weights file: everything but a classifier of another size must fit (transfer learning).
    """
    from cnnlab.models import create_model, load_weights

    from_file = weights is not None and weights not in ("torchvision", "timm")
    options = dict(config.model.options)
    if options.pop("num_classes", num_classes) != num_classes:
        raise CnnlabError(f"model.options.num_classes={config.model.options['num_classes']} but data "
                          f"{config.data.name!r} has {num_classes} classes; leave it out (it comes from the data)")
    if options.pop("in_channels", input_shape[0]) != input_shape[0]:
        raise CnnlabError(f"model.options.in_channels={config.model.options['in_channels']} but data "
                          f"{config.data.name!r} has {input_shape[0]}-channel images")
    model = create_model(config.model.name, num_classes=num_classes, in_channels=input_shape[0],
                         weights=None if from_file else weights, **options)
    if from_file:
        result = load_weights(model, weights, strict=False)
        head = getattr(model, "head_name", "fc")
        bad = [k for k in result.missing + result.unexpected + [m.split(":")[0] for m in result.mismatched]
               if not (k == head or k.startswith(head + "."))]
        if bad:
            raise CnnlabError(f"model.weights={weights} does not fit {config.model.name}: {', '.join(bad[:8])}"
                              + (" ..." if len(bad) > 8 else ""))
    check = getattr(model, "check_input", None)
    if check is not None:
        try:
            with torch.device("meta"):
                check(torch.empty(1, *input_shape))
        except CnnlabError as e:
            raise CnnlabError(f"data {config.data.name!r} has images of shape {input_shape}, which "
                              f"{config.model.name} cannot take: {e}; resize them with data.image_size") from None
    return model


def _log(config: TrainConfig, text: str) -> None:
    if not config.quiet:
        print(text, flush=True)


def train(config: TrainConfig, *, resume: bool = False, callbacks: Sequence[EpochCallback] = (),
          data: DataBundle | None = None) -> RunResult:
    """Train, validate, checkpoint and test one run as ``config`` says; see docs/training.md.

    With ``resume=True`` the run folder's ``last`` checkpoint is loaded and training continues
    from the epoch after it: on the CPU the final weights equal those of an uninterrupted run.
    ``callbacks`` are called with each epoch's metrics row (hyper-parameter search, ensembles);
    ``data`` replaces the loaders built from ``config.data`` (bootstrap samples, custom datasets).
    """
    if not isinstance(config, TrainConfig):  # validate() would fail on a dict with an AttributeError
        raise CnnlabError(f"train() takes a TrainConfig (cnnlab.engine.TrainConfig, or TrainConfig.from_dict(d)), "
                          f"got {type(config).__name__}")
    validate(config)
    threads = torch.get_num_threads()
    try:
        return _train(config, resume, callbacks, data)
    finally:
        torch.set_num_threads(threads)  # config.threads holds for this run only


def _train(config: TrainConfig, resume: bool, callbacks: Sequence[EpochCallback], data: DataBundle | None) -> RunResult:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    env = setup_distributed(resolve_device(config.device))  # a no-op unless started by torchrun
    run_dir = env.broadcast(run_folder(config))  # rank 0's name (it holds the date) on every rank
    config.quiet = config.quiet or not env.is_main  # one process prints
    if not config.name:
        config.name = run_dir.name
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
    ckpt = load_checkpoint(run_dir, "last") if resume else None  # read (and checked) before anything is written
    if ckpt is not None and "config" in ckpt.meta:
        _check_resume_config(ckpt.meta["config"], config, run_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = env.device
    amp = use_amp(config.amp, device)
    channels_last = config.model.channels_last

    if data is None:
        data = build_data(config.data, device, seed=config.seed, channels_last=channels_last,
                          in_channels=model_channels(config))
    data = env.shard(data)  # each rank sees its part of every global batch
    model = build_model(config, data.num_classes, data.input_shape, None if ckpt else config.model.weights)
    if config.model.freeze:
        freeze(model, config.model.freeze)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, config.optim, config.data.batch_size, config.model.lr_mult)
    ema = _Ema(model, config.optim.ema_decay) if config.optim.ema_decay else None

    history: list[dict[str, Any]] = []
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": 0, "bad_epochs": 0}
    if ckpt is not None:
        model.load_state_dict(ckpt.weights)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        if ema is not None and ckpt.ema is not None:
            ema.load(ckpt.ema)
        history = ckpt.meta.get("history", [])
        state.update({k: ckpt.meta[k] for k in state if k in ckpt.meta})
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", config.to_json())
    _log(config, f"run {run_dir}  ({'resumed at epoch ' + str(state['epoch']) if ckpt else 'new'})\nconfig:\n{config.describe()}")
    _log(config, f"device {device}{' (bf16 autocast)' if amp else ''}, {sum(p.numel() for p in model.parameters()):,} "
                 f"parameters, {len(data.train)} steps per epoch, classes: {len(data.classes)}")

    net = env.wrap(model)  # DistributedDataParallel under torchrun, else the model itself
    if config.model.compile:  # the checkpoints keep saving `model`: its keys have no `_orig_mod.` prefix
        net = torch.compile(net, mode=None if config.model.compile_mode == "default" else config.model.compile_mode)
    steps_per_epoch = len(data.train)
    total_steps = steps_per_epoch * config.epochs
    meta_base = {"model": config.model.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
                 "classes": data.classes, "preprocess": data.preprocess_state, "config": config.to_dict()}
    stopped_early = False
    for epoch in range(state["epoch"], config.epochs):
        # dropout & co. depend on the epoch (and rank) only: exact resumes
        torch.manual_seed(config.seed * 7919 + epoch + 1_000_003 * env.rank)
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch)
        row = _train_epoch(net, model, data, optimizer, ema, config, state, epoch, steps_per_epoch, total_steps,
                           device, amp, run_dir)
        eval_model = ema.module if ema is not None else model
        env.sync_buffers(model, eval_model)  # rank 0's BatchNorm statistics everywhere
        if data.val is not None:
            val = evaluate(eval_model, data.val, data.num_classes, amp=amp, tta_flip=config.tta_flip)
            row.update(val_loss=val.loss, val_acc=val.accuracy)
        row = env.reduce_row(row)  # one row on every rank: the same early-stopping decision
        history.append(row)
        state["epoch"] = epoch + 1
        improved = _update_best(config, state, row)
        meta = dict(meta_base, **state, history=history)
        ema_state = ema.state() if ema is not None else None
        if improved and env.is_main:
            save_checkpoint(run_dir, "best", eval_model, meta, None, None)
        if env.is_main:
            save_checkpoint(run_dir, "last", model, meta, optimizer, ema_state)
            report.write_metrics(run_dir / "metrics.csv", history)
        _log(config, _epoch_line(row, config.epochs))
        for callback in callbacks:
            callback(row)
        if config.patience and state["bad_epochs"] >= config.patience:
            _log(config, f"early stopping: {config.monitor} did not improve for {config.patience} epochs "
                         f"(best {state['best']:.4f} at epoch {state['best_epoch']})")
            stopped_early = True
            break

    env.barrier()  # rank 0 has written the checkpoint every rank reads next
    final = ema.module if ema is not None else model
    if data.val is not None and (run_dir / "best.safetensors").exists():
        final.load_state_dict(load_checkpoint(run_dir, "best").weights)  # report the model chosen on validation
    test = evaluate(final, data.test, data.num_classes, amp=amp, tta_flip=config.tta_flip)
    result = RunResult(run_dir, config, history, test, final.eval(), data.classes, state["best_epoch"] or state["epoch"],
                       stopped_early, time.perf_counter() - wall0, time.process_time() - cpu0)
    if env.is_main:
        _write_results(result, data)
    return result


# what a resumed run may change: how long it runs, where and how it reports; not what it computes
RESUME_MAY_CHANGE = ("epochs", "patience", "quiet", "plots", "device", "threads", "out_dir", "name", "data.root",
                     "data.download", "data.num_workers", "data.eval_batch_size")


def _check_resume_config(saved: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """A resume continues the same run exactly: a changed learning rate, model or augmentation is refused."""
    from cnnlab.engine.resumable import config_differences

    changed = config_differences(saved, config.to_dict(), ignore=RESUME_MAY_CHANGE)
    if changed:
        raise CnnlabError(f"--resume continues {run_dir} exactly, but these settings differ from its config: "
                          f"{'; '.join(changed)}. Leave them out (a resume may change only "
                          f"{', '.join(RESUME_MAY_CHANGE[:6])}, ...), or start a new run from its weights: "
                          f"--weights {run_dir / 'last.safetensors'}")


def model_channels(config: TrainConfig) -> int | None:
    from cnnlab.models import model_info

    return model_info(config.model.name).default_input[0] if "in_channels" not in config.model.options else config.model.options["in_channels"]


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
        if "n_averaged" in state:  # written by cnnlab <= 0.1 (torch's AveragedModel): keys under "module."
            state = {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
        self.module.load_state_dict(state)


def _train_epoch(net, model, data: DataBundle, optimizer, ema, config: TrainConfig, state, epoch, steps_per_epoch,
                 total_steps, device, amp, run_dir) -> dict[str, Any]:
    from tqdm import tqdm

    model.train()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, lr = 0, optimizer.param_groups[0]["lr"]
    check_every = 1 if device.type == "cpu" else 50  # a NaN check is a host sync on GPUs
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, unit="batch",
               disable=config.quiet or not sys.stderr.isatty(), dynamic_ncols=True)
    for i, (x, y) in enumerate(data.train):
        lr = set_lr(optimizer, lr_factor(config.optim, state["step"], steps_per_epoch, total_steps))
        with autocast(device, amp):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.optim.label_smoothing)
        extra = penalty(model, config.optim.l1, config.optim.l2)
        if extra is not None:
            loss = loss + extra
        if (i + 1) % check_every == 0 and not math.isfinite(loss.item()):
            bar.close()
            raise TrainingDiverged(
                f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}: training stopped. The last good "
                f"checkpoint ({'epoch ' + str(state['epoch']) if state['epoch'] else 'none yet'}) is kept in {run_dir}. "
                "Try a lower optim.lr, optim.clip_grad_norm=1 or amp=none")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.clip_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        state["step"] += 1
        hard = y.argmax(1) if y.ndim == 2 else y
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == hard).sum()
        seen += len(y)
        if not bar.disable and (bar.n % 10 == 0 or i + 1 == steps_per_epoch):  # .item() syncs a GPU
            elapsed = time.perf_counter() - wall0
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() / seen:.3f}", img_s=f"{seen / elapsed:.0f}")
        bar.update(1)
    bar.close()
    if not math.isfinite(loss_sum.item()):
        raise TrainingDiverged(f"loss became {loss_sum.item()} during epoch {epoch + 1}: training stopped; the last good "
                               f"checkpoint is kept in {run_dir}. Try a lower optim.lr or optim.clip_grad_norm=1")
    elapsed = time.perf_counter() - wall0
    return {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1),
            "val_loss": None, "val_acc": None, "lr": lr, "time_s": elapsed, "cpu_s": time.process_time() - cpu0,
            "images_per_s": seen / max(elapsed, 1e-9)}


def _update_best(config: TrainConfig, state: dict[str, Any], row: dict[str, Any]) -> bool:
    """Track the monitored metric (validation when there is a split, else training loss)."""
    key = config.monitor if row.get("val_loss") is not None else "train_loss"
    value = row[key]
    higher = key.endswith("acc")
    best = state["best"]
    if best is None or (value > best if higher else value < best):
        state.update(best=value, best_epoch=row["epoch"], bad_epochs=0)
        return True
    state["bad_epochs"] += 1
    return False


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    text = f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
    if row.get("val_loss") is not None:
        text += f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
    return text + f"  lr {row['lr']:.3g}  {row['time_s']:.1f}s ({row['cpu_s']:.1f} cpu-s, {row['images_per_s']:.0f} img/s)"


def _write_results(result: RunResult, data: DataBundle) -> None:
    run_dir, test = result.run_dir, result.test
    summary = {"test_accuracy": test.accuracy, "test_loss": test.loss, "test_topk": test.topk,
               "best_epoch": result.best_epoch, "epochs_run": len(result.history), "stopped_early": result.stopped_early,
               "wall_s": result.wall_s, "cpu_s": result.cpu_s, "classes": result.classes,
               "confusion": test.confusion.tolist(), "precision": test.precision.tolist(), "recall": test.recall.tolist()}
    atomic_write_text(run_dir / "results.json", json.dumps(summary, indent=2))
    if result.config.plots and result.history:
        report.plot_curves(run_dir / "curves.png", result.history)
        report.plot_confusion(run_dir / "confusion_matrix.png", test.confusion, data.classes)
        if data.test_images is not None:
            labels = data.test.labels.cpu()  # tensor datasets: the loader keeps them in order
            report.plot_misclassified(run_dir / "misclassified.png", data.test_images, labels, test.predictions, data.classes)
        try:
            report.write_html_report(run_dir)
        except Exception as e:  # noqa: BLE001 - the run is done and saved; a page that fails must not undo that
            warnings.warn(f"report.html was not written ({type(e).__name__}: {e}); `cnnlab report {run_dir}` retries",
                          stacklevel=2)
