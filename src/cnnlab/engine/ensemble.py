"""Model ensembles: average the class probabilities of trained runs; bagging with bootstrap samples.

    >>> from cnnlab.engine.ensemble import evaluate_ensemble, train_bagged
    >>> result = evaluate_ensemble(["runs/a", "runs/b", "runs/c"])      # doctest: +SKIP
    >>> result.member_accuracy, result.accuracy                          # doctest: +SKIP
    >>> bag = train_bagged(config, 5)   # 5 members, each on its own bootstrap sample  # doctest: +SKIP
    >>> bag = resume_bagged("runs/bag")  # after an interruption: finished members are reused  # doctest: +SKIP

Averaging the softmax outputs of independently trained networks lowers the variance of the
prediction; the members' errors are partly independent, so the average is usually more
accurate than the mean member (Hansen & Salamon 1990; the notes' "model ensembles"). Bagging
(Breiman 1996) makes the members differ also through their data: member ``i`` trains on ``n``
images drawn with replacement from the ``n`` training images (about 63% distinct ones).
"""
from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab._io import atomic_write_text, dumps_json
from cnnlab.engine.checkpoint import load_checkpoint
from cnnlab.engine.config import TrainConfig, validate
from cnnlab.engine.data_setup import DataBundle, build_data
from cnnlab.engine.distributed import is_main_process
from cnnlab.engine.evaluate import evaluate
from cnnlab.engine.resumable import Progress, config_differences, read_history, read_json, run_state
from cnnlab.engine.trainer import (RunResult, build_model, ema_weights, model_channels, reported_checkpoint, resolve_device,
                                   train, use_amp)


@dataclass
class Member:
    """One trained run, loaded for prediction.

    Args:
        run_dir: the run folder; config: its config.json; model: in eval mode on the chosen device.
        checkpoint: which weights were loaded (``best``, ``last`` or ``last+ema``), chosen as the
            trainer chooses the model it tests.
        input_channels: the channel count the model was trained on.
    """

    run_dir: Path
    config: TrainConfig
    model: nn.Module = field(repr=False)
    checkpoint: str
    input_channels: int


@dataclass
class EnsembleResult:
    """Test-split metrics of each member and of the probability average.

    Args:
        names: member run folders; member_accuracy, member_nll: their top-1 accuracy and mean
            negative log-likelihood; accuracy, nll: the ensemble's; count: test images.
        probabilities: (N, K) averaged probabilities; labels: (N,) true classes.
    """

    names: list[str]
    member_accuracy: list[float]
    member_nll: list[float]
    accuracy: float
    nll: float
    count: int
    probabilities: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)

    @property
    def mean_member_accuracy(self) -> float:
        return sum(self.member_accuracy) / len(self.member_accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {"members": [{"run": n, "test_accuracy": a, "test_nll": l}
                            for n, a, l in zip(self.names, self.member_accuracy, self.member_nll)],
                "ensemble": {"test_accuracy": self.accuracy, "test_nll": self.nll, "members": len(self.names)},
                "mean_member_accuracy": self.mean_member_accuracy, "test_images": self.count}


def load_member(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> Member:
    """The model a run reported: ``best`` when it had a validation split, else ``last`` (its EMA weights if any)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise CnnlabError(f"{run_dir} is not a run folder (no config.json); pass folders written by cnnlab train")
    try:
        config = TrainConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CnnlabError(f"{path} is not valid JSON ({e})") from None
    tag = reported_checkpoint(run_dir, config)
    ckpt = load_checkpoint(run_dir, tag)
    weights = ckpt.weights
    if tag == "last" and ckpt.ema is not None:  # the trainer tests the EMA weights when it keeps them
        weights, tag = ema_weights(ckpt.ema), "last+ema"
    meta = ckpt.meta
    shape = tuple(meta["input_shape"])
    model = build_model(config, int(meta["num_classes"]), shape, None)  # type: ignore[arg-type]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CnnlabError(f"{run_dir} ({tag}): its weights do not fit {config.model.name}: {str(e).splitlines()[0]}") from None
    device = torch.device(device) if isinstance(device, str) else device
    return Member(run_dir, config, model.to(device).eval(), tag, int(shape[0]))


@torch.no_grad()
def predict_proba(model: nn.Module, batches, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities (N, K), labels (N,)) over ``batches``, on the CPU, in loader order."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    try:
        for x, y in batches:
            logits = model(x).float()
            if tta_flip:
                logits = (logits + model(x.flip(3)).float()) / 2  # as the trainer evaluates with tta_flip
            probs.append(logits.softmax(1).cpu())
            labels.append((y.argmax(1) if y.ndim == 2 else y).cpu())
    finally:
        model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def _test_batches(member: Member, device: torch.device, cache: dict[str, Any]):
    """The member's test split, preprocessed as in its run (rebuilt from its data config, shared when equal)."""
    data = member.config.data
    key = json.dumps([vars(data), member.config.seed, member.input_channels], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = build_data(data, device, seed=member.config.seed, in_channels=member.input_channels).test
    return cache[key]


def evaluate_ensemble(members: Sequence[str | os.PathLike | Member], *, device: str = "auto",
                      weights: Sequence[float] | None = None) -> EnsembleResult:
    """Each member's and the averaged prediction's accuracy on the test split.

    Args:
        members: run folders (or loaded members), at least one; all must be tested on the same images.
        device: where to run the models (``auto``: CUDA when present).
        weights: one non-negative weight per member (default: equal); they are normalised to sum 1.
    """
    if not members:
        raise CnnlabError("an ensemble needs at least one run folder")
    folders = [Path(m).resolve() for m in members if not isinstance(m, Member)]
    twice = sorted({str(f) for f in folders if folders.count(f) > 1})
    if twice:  # it would silently count that member double; --member-weights says so explicitly
        raise CnnlabError(f"run folder {', '.join(twice)} is given more than once; give each member once "
                          "(weigh members with --member-weights / weights=)")
    dev = resolve_device(device)
    loaded = [m if isinstance(m, Member) else load_member(m, dev) for m in members]
    if weights is None:
        weights = [1.0] * len(loaded)
    if len(weights) != len(loaded) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise CnnlabError(f"ensemble weights must be {len(loaded)} non-negative numbers with a positive sum, got {list(weights)}")
    cache: dict[str, Any] = {}
    total, labels, ref = None, None, None
    accs, nlls = [], []
    for member, w in zip(loaded, weights):
        probs, y = predict_proba(member.model, _test_batches(member, dev, cache), member.config.tta_flip)
        if labels is None:
            labels, ref = y, member
        elif not torch.equal(labels, y) or probs.shape[1] != total.shape[1]:
            raise CnnlabError(f"{member.run_dir} was tested on other images or classes than {ref.run_dir} "
                              f"(data {member.config.data.name!r} vs {ref.config.data.name!r}): "
                              "ensemble members must share the test split")
        accs.append((probs.argmax(1) == y).float().mean().item())
        nlls.append(_nll(probs, y))
        total = probs * (w / sum(weights)) if total is None else total + probs * (w / sum(weights))
    assert total is not None and labels is not None
    return EnsembleResult([str(m.run_dir) for m in loaded], accs, nlls, (total.argmax(1) == labels).float().mean().item(),
                          _nll(total, labels), len(labels), total, labels)


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()


def bootstrap_indices(n: int, seed: int) -> torch.Tensor:
    """``n`` indices drawn uniformly with replacement from ``range(n)`` (Breiman's bootstrap sample)."""
    return torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(seed))


def _resample(batches: Any, seed: int) -> Any:
    """Replace a training loader's samples by a bootstrap sample of them (tensor loaders and image folders)."""
    if hasattr(batches, "images") and hasattr(batches, "labels"):  # TensorLoader
        idx = bootstrap_indices(len(batches.images), seed).to(batches.images.device)
        batches.images, batches.labels = batches.images[idx], batches.labels[idx]
        return batches
    dataset = getattr(getattr(batches, "loader", None), "dataset", None)
    if dataset is not None and hasattr(dataset, "samples"):  # image folder: resample the file list
        idx = bootstrap_indices(len(dataset.samples), seed).tolist()
        dataset.samples = [dataset.samples[i] for i in idx]
        return batches
    raise CnnlabError(f"bagging cannot resample {type(batches).__name__} training batches")


def bootstrap_data(config: TrainConfig, seed: int) -> DataBundle:
    """The data ``train(config)`` would build, with the training split replaced by a bootstrap sample.

    The validation and test splits and the normalisation (fitted on the whole training split)
    are left alone, so every member of a bag is tested on identical inputs.
    """
    data = build_data(config.data, resolve_device(config.device), seed=config.seed,
                      channels_last=config.model.channels_last, in_channels=model_channels(config))
    data.train = _resample(data.train, seed)
    return data


@dataclass
class BaggingResult:
    """A bag of members and their ensemble.

    Args:
        bag_dir: folder holding ``member0``, ``member1``... and ``bagging.json``.
        runs: each member's RunResult (a member reused by a resumed bagging is reloaded from its folder and
            tested again); ensemble: the averaged prediction's metrics.
    """

    bag_dir: Path
    runs: list[RunResult]
    ensemble: EnsembleResult


# config fields that do not change what a member learns: a resumed bagging may differ in them
IGNORED_BAG_KEYS = ("out_dir", "name", "quiet", "plots")


def train_bagged(config: TrainConfig, n: int, *, resume: bool = False) -> BaggingResult:
    """Train ``n`` members of ``config``, member ``i`` with seed ``config.seed + i`` on its own bootstrap sample.

    The members go to ``config.out_dir/<name>/member<i>`` (name defaults to ``bag-<model>-<data>-<date>``);
    ``bagging.json`` there records ``n``, the config and the seeds at the start, each finished member as it
    ends, and the ensemble's test metrics at the end.

    Args:
        resume: continue the bag in ``config.out_dir/config.name`` (see :func:`resume_bagged`); ``n`` and
            ``config`` must equal the saved ones. Finished members are reused, an interrupted one continues
            from its last checkpoint, the rest are trained: the bag ends as an uninterrupted one would.
    """
    if n < 1:
        raise CnnlabError(f"--bootstrap needs at least 1 member, got {n}")
    validate(config)  # the bag's folder name included: one folder inside out_dir
    if resume and not config.name:
        raise CnnlabError("resuming a bag needs its folder: set config.name (or cnnlab ensemble --resume DIR)")
    name = config.name or f"bag-{config.model.name}-{Path(config.data.name).name}-{datetime.now():%Y%m%d-%H%M%S}"
    bag_dir = Path(config.out_dir) / name
    summary: dict[str, Any] = {"version": 1, "status": "training", "n": n, "config": config.to_dict(), "members": [],
                               "bootstrap_seeds": []}
    if resume:
        saved = load_bagging(bag_dir)
        conflicts = ([f"n (saved {saved['n']}, given {n})"] if saved["n"] != n else []) + \
            config_differences(saved["config"], config.to_dict(), IGNORED_BAG_KEYS)
        if conflicts:
            raise CnnlabError(f"{bag_dir / 'bagging.json'} was started with other settings: {'; '.join(conflicts)}. "
                              "Resume with the saved ones (cnnlab ensemble --resume DIR takes them from the file)")
    elif (bag_dir / "bagging.json").exists():
        raise CnnlabError(f"{bag_dir} already holds a bag of members; continue it with `cnnlab ensemble --resume "
                          f"{bag_dir}` (train_bagged(..., resume=True)) or choose another --name")
    main = is_main_process()  # under torchrun every rank trains the same members; rank 0 writes
    if main and not resume:
        bag_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(bag_dir / "bagging.json", dumps_json(summary, indent=2))
    say = (lambda text: print(text, flush=True)) if not config.quiet and main else (lambda text: None)
    runs: list[RunResult] = []
    progress = Progress(n * config.epochs)
    try:
        for i in range(n):
            member = copy.deepcopy(config)
            member.seed, member.out_dir, member.name = config.seed + i, str(bag_dir), f"member{i}"
            seed = 10_007 + member.seed  # the sample differs from member to member, and from the shuffling
            state, start = run_state(bag_dir / member.name) if resume else ("new", 0)
            t0 = time.perf_counter()
            if state == "done":
                run, how = reload_run(bag_dir / member.name, member), "reused"
            else:
                say(f"bagging: member {i + 1}/{n} on bootstrap sample {seed}"
                    + (f" (resumed at epoch {start})" if state == "partial" else ""))
                run = train(member, data=bootstrap_data(member, seed), resume=state == "partial")
                how = "resumed" if state == "partial" else "trained"
            runs.append(run)
            progress.finished(config.epochs, len(run.history) - start if state != "done" else 0, time.perf_counter() - t0)
            summary["members"].append({"run": str(run.run_dir), "test_accuracy": run.test.accuracy if run.test else None,
                                       "bootstrap_seed": seed})
            summary["bootstrap_seeds"].append(seed)
            if main:
                atomic_write_text(bag_dir / "bagging.json", dumps_json(summary, indent=2))
            acc = f"test acc {run.test.accuracy:.4f}" if run.test else ""
            say(f"bagging: member {i + 1}/{n} {how}: {acc}  [{progress.line()}]")
    except KeyboardInterrupt:
        say(f"bagging interrupted; continue it with: cnnlab ensemble --resume {bag_dir}")
        raise
    result = evaluate_ensemble([r.run_dir for r in runs], device=config.device)
    summary = {"version": 1, "status": "done", "n": n, "config": config.to_dict(),
               "bootstrap_seeds": summary["bootstrap_seeds"], **result.to_dict()}
    if main:
        atomic_write_text(bag_dir / "bagging.json", dumps_json(summary, indent=2))
    return BaggingResult(bag_dir, runs, result)


def resume_bagged(bag_dir: str | os.PathLike, *, quiet: bool | None = None) -> BaggingResult:
    """Continue the bag in ``bag_dir`` with the member count and config saved in its ``bagging.json``."""
    bag_dir = Path(bag_dir)
    saved = load_bagging(bag_dir)
    config = TrainConfig.from_dict(saved["config"])
    config.out_dir, config.name = str(bag_dir.parent), bag_dir.name
    if quiet is not None:
        config.quiet = quiet
    return train_bagged(config, int(saved["n"]), resume=True)


def load_bagging(bag_dir: str | os.PathLike) -> dict[str, Any]:
    """What a bagging saved in ``bag_dir/bagging.json`` (``n``, ``config``, members so far)."""
    saved = read_json(Path(bag_dir) / "bagging.json", "a bag folder")
    if "n" not in saved or "config" not in saved:
        raise CnnlabError(f"{Path(bag_dir) / 'bagging.json'} was written by an older cnnlab (no n and config in it); "
                          "it cannot be resumed")
    return saved


def reload_run(run_dir: Path, config: TrainConfig) -> RunResult:
    """A finished run read back from its folder: history, results and its reported model, tested again."""
    results = read_json(run_dir / "results.json", "a finished run")
    device = resolve_device(config.device)
    member = load_member(run_dir, device)
    data = build_data(config.data, device, seed=config.seed, channels_last=config.model.channels_last,
                      in_channels=member.input_channels)
    test = evaluate(member.model, data.test, data.num_classes, amp=use_amp(config.amp, device), tta_flip=config.tta_flip)
    return RunResult(run_dir, member.config, read_history(run_dir), test, member.model, list(results.get("classes", [])),
                     int(results.get("best_epoch", 0)), bool(results.get("stopped_early", False)),
                     float(results.get("wall_s", 0.0)), float(results.get("cpu_s", 0.0)))
