"""Degradation with depth: train plain and residual nets of several depths with one recipe.

He et al. 2016 ("Deep Residual Learning", Fig. 1 and Fig. 6): on CIFAR-10 the plain 56-layer net has
a *higher training error* than the plain 20-layer one (so it is not overfitting: optimisation gets
harder), while the residual 56-layer net trains better than the residual 20-layer one.
``depth_study`` reruns that comparison on a small bundled dataset with the nets of
:func:`cnnlab.analysis.demos.cifar_cnn`, each trained by the shared engine (:func:`cnnlab.engine.train`).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.analysis.demos import cifar_cnn

# sklearn's digits (1,437 train images of 8x8) are too small for three stages of convs to matter; the
# datasets here are the bundled ones that need no download.
DATASETS = ("mnist_5k", "fashion_mnist", "digits")


@dataclass
class DepthRecipe:
    """The one training recipe every net of a study gets (He et al. 2016 §4.2 unless noted).

    Args:
        epochs: passes over the training images.
        batch_size: images per SGD step (He et al.: 128).
        lr: peak learning rate (He et al.: 0.1), reached after ``warmup_epochs`` of linear warm-up,
            then cosine-decayed to 0 (He et al. divide by 10 twice; cosine needs no milestones).
        momentum, weight_decay: SGD's (He et al.: 0.9 and 1e-4; plain momentum, not Nesterov). The engine
            decays the conv and linear weights only, not biases and BatchNorm's scales and shifts.
        warmup_epochs: linear warm-up from 0 over ``int(warmup_epochs * steps per epoch)`` steps (He et al.
            warm up ResNet-110 at lr 0.01).
        width: channels of the first stage (He et al.: 16; stages are width, 2 width, 4 width).
        train_size: use the first ``train_size`` images of a fixed shuffle of the training split (None: all).
        image_size: resize the images to this side first (area averaging; None: as stored). 14 makes the
            28x28 datasets four times cheaper to train on.
        seed: seeds the training subset, the weights (the same for both nets of a depth) and the batch order
            (the same for all nets).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    width: int = 16
    train_size: int | None = None
    image_size: int | None = None
    seed: int = 0

    def check(self) -> None:
        for name in ("epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise CnnlabError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise CnnlabError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise CnnlabError("lr must be > 0")
        if self.warmup_epochs >= self.epochs:
            raise CnnlabError(f"warmup_epochs must be < epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.image_size is not None and self.image_size < 4:
            raise CnnlabError(f"image_size must be >= 4 (three stages halve it twice), got {self.image_size}")
        if self.train_size is not None and self.train_size < self.batch_size:
            raise CnnlabError(f"train_size must be >= batch_size ({self.batch_size}), got {self.train_size}")


@dataclass
class NetRun:
    """One trained net: per-epoch training loss and error (mean over the epoch's batches, in train mode, as in
    He et al.'s curves: the engine's ``train_loss`` and 1 - ``train_acc``) and test error (eval mode, after the
    epoch). ``run_dir``: the engine's run folder of this net (None once a temporary one is removed)."""

    residual: bool
    depth: int
    params: int
    train_loss: list[float] = field(default_factory=list)
    train_error: list[float] = field(default_factory=list)
    test_error: list[float] = field(default_factory=list)
    seconds: float = 0.0
    run_dir: str | None = None

    @property
    def name(self) -> str:
        return f"{'resnet' if self.residual else 'plain'}-{self.depth}"


@dataclass
class DepthStudy:
    """Plain and residual runs of every depth, trained with ``recipe`` on ``data``."""

    data: str
    input_shape: tuple[int, int, int]
    recipe: DepthRecipe
    runs: list[NetRun]
    train_images: int = 0  # images seen per epoch (drop_last), the resolution of the training error

    def run(self, depth: int, residual: bool) -> NetRun:
        for r in self.runs:
            if r.depth == depth and r.residual == residual:
                return r
        raise CnnlabError(f"no {'residual' if residual else 'plain'} run of depth {depth}; "
                          f"depths: {sorted({r.depth for r in self.runs})}")

    def table(self) -> str:
        head = f"{'net':<12} {'params':>8} {'train loss':>10} {'train err %':>11} {'test err %':>10} {'time s':>7}"
        lines = [head, "-" * len(head)]
        for r in sorted(self.runs, key=lambda r: (r.residual, r.depth)):
            lines.append(f"{r.name:<12} {r.params:>8,} {r.train_loss[-1]:>10.4f} {100 * r.train_error[-1]:>11.2f} "
                         f"{100 * r.test_error[-1]:>10.2f} {r.seconds:>7.1f}")
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| net | params | final train loss | final train error | test error |", "|---|---|---|---|---|"]
        for r in sorted(self.runs, key=lambda r: (r.residual, r.depth)):
            lines.append(f"| {r.name} | {r.params:,} | {r.train_loss[-1]:.4f} | {100 * r.train_error[-1]:.2f}% | "
                         f"{100 * r.test_error[-1]:.2f}% |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"data": self.data, "input_shape": list(self.input_shape), "train_images": self.train_images,
                "recipe": asdict(self.recipe),
                "runs": [asdict(r) | {"name": r.name} for r in self.runs]}

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Training error per epoch (log scale, as He et al.'s Fig. 6): plain solid, residual dashed,
        one colour per depth; a second panel with the training loss."""
        from cnnlab._plot import pyplot, save_figure

        plt = pyplot()

        depths = sorted({r.depth for r in self.runs})
        colours = plt.get_cmap("viridis")(torch.linspace(0, 0.85, len(depths)).tolist())
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        # an error of 0 has no place on a log axis: draw it at half an image, below the dotted line
        floor = 50 / self.train_images if self.train_images else 1e-3
        for r in self.runs:
            epochs = range(1, len(r.train_error) + 1)
            style = dict(color=colours[depths.index(r.depth)], linestyle="--" if r.residual else "-", label=r.name)
            axes[0].plot(epochs, [max(100 * e, floor) for e in r.train_error], **style)
            axes[1].plot(epochs, r.train_loss, **style)
        if self.train_images:
            axes[0].axhline(100 / self.train_images, color="grey", linestyle=":", linewidth=1)
            axes[0].text(1, 100 / self.train_images, " one image; 0 is drawn below", fontsize=7, color="grey", va="bottom")
        axes[0].set_ylabel("training error (%)")
        axes[1].set_ylabel("training loss")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith("resnet"), int(labels[i].split("-")[1])))
        axes[0].legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, ncol=2)
        fig.suptitle(title or f"{self.data}: plain (solid) vs residual (dashed), same recipe")
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)


# The engine picks the task from config.task when it is given a module; config.model.name must still be a
# registered name (it is saved in the run folder's meta, so `cnnlab eval` cannot rebuild these nets from it).
ENGINE_MODEL_NAME = "fmnist_net"


def _load(data: str, train_size: int | None, image_size: int | None, seed: int):
    """Float images in [0, 1] (area-resized), labels, and the per-channel Normalize of the training images."""
    from cnnlab.data.datasets import load_dataset
    from cnnlab.data.preprocess import Normalize

    if data not in DATASETS:
        raise CnnlabError(f"data must be one of {', '.join(DATASETS)} (bundled, no download), got {data!r}")
    ds = load_dataset(data, download=False)
    x, y = ds.train_images, ds.train_labels
    if train_size is not None:
        if train_size > len(x):
            raise CnnlabError(f"train_size {train_size} is more than the {len(x)} training images of {data}")
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:train_size]
        x, y = x[keep], y[keep]
    x, x_test = x.float() / 255, ds.test_images.float() / 255
    if image_size is not None and image_size != x.shape[-1]:
        # area averaging of the float images (the engine's data.image_size resizes uint8 bilinearly)
        x, x_test = (nn.functional.interpolate(t, size=(image_size, image_size), mode="area") for t in (x, x_test))
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp_min(1e-6)
    return x, y, x_test, ds.test_labels, Normalize(tuple(mean.tolist()), tuple(std.tolist()))


def _bundle(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, norm, recipe: DepthRecipe):
    """The engine's DataBundle: the same shuffled full batches, in the same order, for every net of the study."""
    from cnnlab.data.loader import TensorLoader
    from cnnlab.engine.data_setup import DataBundle

    classes = [str(c) for c in range(int(y.max()) + 1)]
    # TensorLoader's order of epoch e depends on (seed, e) only, and the engine calls set_epoch before each epoch
    train = TensorLoader(x, y, recipe.batch_size, shuffle=True, drop_last=True, preprocess=norm, seed=recipe.seed)
    test = TensorLoader(x_test, y_test, 500, preprocess=norm)
    return DataBundle(train, None, test, classes, tuple(x.shape[1:]), norm,
                      {"kind": "standard", "mean": list(norm.mean), "std": list(norm.std)})


def _config(recipe: DepthRecipe, data: str, out_dir: Path, name: str, plots: bool):
    """The study's recipe as an engine TrainConfig: SGD with momentum, linear warm-up then cosine to 0, per step."""
    from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

    # lr_factor's cosine is 0.5 (1 + cos(pi t)) over the steps after warm-up: to 0 at the end, as the study's
    optim = OptimConfig(optimizer="sgd", lr=recipe.lr, momentum=recipe.momentum, nesterov=False,
                        weight_decay=recipe.weight_decay, schedule="cosine", warmup_epochs=recipe.warmup_epochs)
    # contiguous tensors: the nets are tiny, and the batches (TensorLoader without channels_last) are NCHW
    model = ModelConfig(name=ENGINE_MODEL_NAME, channels_last=False)
    # data= replaces the loaders: these fields only describe them in the run's config.json
    data_config = DataConfig(name=data, download=False, batch_size=recipe.batch_size, eval_batch_size=500,
                             image_size=recipe.image_size, train_limit=recipe.train_size or 0)
    return TrainConfig(model=model, data=data_config, optim=optim, epochs=recipe.epochs, seed=recipe.seed,
                       device="cpu", amp="none", out_dir=str(out_dir), name=name, plots=plots, quiet=True,
                       task="classification")


def _train(model: nn.Module, run: NetRun, bundle, recipe: DepthRecipe, data: str, out_dir: Path, plots: bool,
           bar) -> None:
    from cnnlab.engine import train
    from cnnlab.engine.evaluate import evaluate
    from cnnlab.engine.trainer import TrainingDiverged

    def after_epoch(row: dict) -> None:
        # the engine's row: mean loss and accuracy over the epoch's batches in train mode; the test error is
        # measured in eval mode after each epoch (the engine itself tests only once, at the end)
        run.train_loss.append(row["train_loss"])
        run.train_error.append(1 - row["train_acc"])
        test = evaluate(model, bundle.test, bundle.num_classes)
        run.test_error.append((test.count - int(test.confusion.trace())) / test.count)  # counts, not float32
        bar.set_postfix_str(f"{run.name} loss {run.train_loss[-1]:.3f}")
        bar.update(1)

    config = _config(recipe, data, out_dir, run.name, plots)
    try:
        result = train(config, data=bundle, model=model, callbacks=[after_epoch])
    except TrainingDiverged as e:
        raise CnnlabError(f"{run.name}: {e}") from None
    run.seconds = result.wall_s
    run.run_dir = str(result.run_dir)


def _check_out_dir(out_dir: Path, names: list[str]) -> None:
    """Fail before any training if a net's run folder cannot be written (the engine would only find out later)."""
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise CnnlabError(f"out_dir {out_dir}: {folder} is a file, not a folder")
    existing = next(p for p in (out_dir, *out_dir.parents) if p.is_dir())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CnnlabError(f"out_dir {out_dir}: the folder {existing} is not writable")
    taken = [n for n in names if (out_dir / n).is_file() or ((out_dir / n).is_dir() and any((out_dir / n).iterdir()))]
    if taken:
        raise CnnlabError(f"out_dir {out_dir} already holds {', '.join(taken)}; choose another out_dir or remove them")


def depth_study(depths: tuple[int, ...] = (8, 32), data: str = "mnist_5k", epochs: int = 10,
                recipe: DepthRecipe | None = None, threads: int | None = None, quiet: bool = False,
                out_dir: str | Path | None = None) -> DepthStudy:
    """Train the plain and the residual ``cifar_cnn`` of every depth with the same recipe, with the engine.

    Args:
        depths: weight layers of each net, 6n + 2 (8, 14, 20, 26, 32, 44, 56, ...).
        data: a bundled dataset (``DATASETS``); only its training split is trained on.
        epochs: overrides ``recipe.epochs``.
        recipe: optimiser, schedule, batch, width, subset and seed (default :class:`DepthRecipe`).
        threads: torch CPU threads for this call (restored afterwards); None keeps the current setting.
        quiet: no progress bar.
        out_dir: keep each net's engine run folder (config.json, metrics.csv, checkpoints, results.json,
            report.html) in ``out_dir/<net>`` (``plain-8``, ``resnet-8``, ...); None: a temporary folder,
            removed at the end.
    """
    from tqdm import tqdm

    recipe = DepthRecipe(**asdict(recipe)) if recipe is not None else DepthRecipe()
    recipe.epochs = epochs
    recipe.check()
    depths = tuple(depths)
    if not depths or len(set(depths)) != len(depths):
        raise CnnlabError(f"depths must be distinct and at least one, got {depths}")
    for d in depths:
        if not isinstance(d, int) or d < 8 or (d - 2) % 6:
            raise CnnlabError(f"every depth must be 6n + 2 with n >= 1 (8, 14, 20, 26, 32, 44, 56, ...), got {d}")
    if threads is not None and threads < 1:
        raise CnnlabError(f"threads must be >= 1, got {threads}")
    if out_dir is not None:
        _check_out_dir(Path(out_dir), [f"{kind}-{d}" for d in depths for kind in ("plain", "resnet")])
    x, y, x_test, y_test, norm = _load(data, recipe.train_size, recipe.image_size, recipe.seed)
    bundle = _bundle(x, y, x_test, y_test, norm, recipe)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    runs: list[NetRun] = []
    temporary = tempfile.TemporaryDirectory(prefix="cnnlab-depth-") if out_dir is None else None
    root = Path(temporary.name if temporary is not None else out_dir)
    try:
        with tqdm(total=2 * len(depths) * recipe.epochs, desc="depth study", unit="epoch", disable=quiet,
                  dynamic_ncols=True) as bar:
            for depth in sorted(depths):
                for residual in (False, True):
                    # plain and residual of a depth start from the same weights
                    torch.manual_seed(recipe.seed * 1000 + depth)
                    model = cifar_cnn(depth, residual, width=recipe.width, in_channels=x.shape[1],
                                      num_classes=bundle.num_classes)
                    run = NetRun(residual, depth, sum(p.numel() for p in model.parameters()))
                    _train(model, run, bundle, recipe, data, root, plots=temporary is None, bar=bar)
                    runs.append(run)
    finally:
        torch.set_num_threads(previous_threads)
        if temporary is not None:
            temporary.cleanup()
            for run in runs:
                run.run_dir = None
    seen = len(x) // recipe.batch_size * recipe.batch_size
    return DepthStudy(data, tuple(x.shape[1:]), recipe, runs, seen)


@dataclass(frozen=True)
class DepthSetting:
    """A named study: depths, data, epochs and recipe (what ``cnnlab depth-study`` runs by default / with --quick)."""

    depths: tuple[int, ...]
    data: str
    epochs: int
    recipe: DepthRecipe


# The setting of docs/analysis.md: over seeds 0-2 plain-44 ends at 2.4-7.6% training error and 8.5-34x the
# training loss of plain-8, while resnet-44 ends at <= 0.03% and below resnet-8 (about 3 minutes on one core).
DOCUMENTED = DepthSetting((8, 20, 44), "mnist_5k", 15, DepthRecipe(width=8, image_size=14))
# The tests' setting (~15 s on one core): the same ordering over seeds 0-7, see tests/analysis/test_depth.py.
QUICK = DepthSetting((8, 32), "mnist_5k", 5, DepthRecipe(batch_size=64, width=8, image_size=14, train_size=1024))
