"""What a run leaves behind besides checkpoints: metrics.csv and the PNG plots (matplotlib, Agg backend).

report.html is engine/html_report.py's job; it builds on this module, never the other way round.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cnnlab._io import atomic_write_text
from cnnlab._plot import pyplot, save_figure

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "time_s", "cpu_s", "images_per_s")


def write_metrics(path: str | os.PathLike, history: Sequence[dict[str, Any]],
                  columns: Sequence[str] = METRIC_COLUMNS) -> None:
    """Rewrite metrics.csv from the whole history (one row per epoch), so a resumed run never duplicates rows.

    ``columns`` are the CSV's columns in order (a task with other metrics passes its own); keys of a row that
    are not columns are left out, columns a row lacks are empty.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else _fmt(row[k])) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


# how a metric's panel is titled; any other metric is titled by its name
METRIC_TITLES = {"loss": "loss", "acc": "accuracy", "psnr": "PSNR (dB)", "ssim": "SSIM", "miou": "mIoU", "map": "mAP"}


def curve_metrics(history: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics a history has curves of: ``loss`` first, then each X of a ``train_X`` or ``val_X`` key, in order."""
    names: list[str] = []
    for row in history:
        for key in row:
            prefix, _, name = key.partition("_")
            if prefix in ("train", "val") and name and name not in names:
                names.append(name)
    return sorted(names, key=lambda n: n != "loss")  # stable: loss first, the rest as they came


def plot_curves(path: str | os.PathLike, history: Sequence[dict[str, Any]]) -> Path:
    """Loss and every other metric per epoch, train against validation: the curves to read over- and under-fitting."""
    return save_figure(curves_figure(history), path)


def _points(history: Sequence[dict[str, Any]], key: str) -> tuple[list[Any], list[Any]]:
    """(epochs, values) of ``key`` where it has a value: None (no validation, a metric not measured) is skipped."""
    pairs = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
    return [e for e, _ in pairs], [v for _, v in pairs]


def curves_figure(history: Sequence[dict[str, Any]]):
    """The figure of ``plot_curves``: one panel for the losses, one per other metric (the caller saves and closes it)."""
    plt = pyplot()
    names = curve_metrics(history) or ["loss"]
    cols = min(len(names), 4)  # more panels (detection: its named losses and APs) wrap onto more rows
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        for prefix, label in (("train", "train"), ("val", "validation")):
            epochs, values = _points(history, f"{prefix}_{name}")
            if values:
                ax.plot(epochs, values, "o-", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(METRIC_TITLES.get(name, name.replace("_", " ")))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    return fig


def plot_confusion(path: str | os.PathLike, confusion: torch.Tensor, classes: Sequence[str]) -> Path:
    """Row-normalised confusion matrix with the counts written in each cell."""
    return save_figure(confusion_figure(confusion, classes), path)


def confusion_figure(confusion: torch.Tensor, classes: Sequence[str]):
    """The figure of ``plot_confusion`` (the caller saves and closes it)."""
    plt = pyplot()
    k = len(classes)
    rates = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.5 * k)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_misclassified(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                       classes: Sequence[str], limit: int = 32) -> Path | None:
    """A grid of the first ``limit`` misclassified test images titled 'true -> predicted'."""
    wrong = (predictions != labels.cpu()).nonzero().flatten()[:limit]
    if len(wrong) == 0:
        return None
    plt = pyplot()
    cols = 8
    rows = -(-len(wrong) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        img = images[i].cpu()
        ax.imshow(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy(), cmap="gray")
        ax.set_title(f"{classes[int(labels[i])][:10]}\n-> {classes[int(predictions[i])][:10]}", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
