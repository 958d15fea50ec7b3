"""What a run leaves behind besides checkpoints: metrics.csv, the PNG plots (matplotlib, Agg backend), report.html."""
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


def write_metrics(path: str | os.PathLike, history: Sequence[dict[str, Any]]) -> None:
    """Rewrite metrics.csv from the whole history (one row per epoch), so a resumed run never duplicates rows."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else _fmt(row[k])) for k in METRIC_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def plot_curves(path: str | os.PathLike, history: Sequence[dict[str, Any]]) -> Path:
    """Loss and accuracy per epoch, train against validation: the curves to read over- and under-fitting."""
    return save_figure(curves_figure(history), path)


def curves_figure(history: Sequence[dict[str, Any]]):
    """The figure of ``plot_curves`` (the caller saves and closes it; the HTML report embeds it from memory)."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        val = [r.get(f"val_{key}") for r in history]
        if any(v is not None for v in val):
            ax.plot(epochs, val, "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
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


def write_html_report(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """One self-contained HTML page for a run folder (default ``run_dir/report.html``); see engine/html_report.py."""
    from cnnlab.engine.html_report import write_html_report as write

    return write(run_dir, path)


def write_comparison_report(run_dirs: Sequence[str | os.PathLike], path: str | os.PathLike) -> Path:
    """One HTML page comparing several run folders: a table and overlaid learning curves."""
    from cnnlab.engine.html_report import write_comparison_report as write

    return write(run_dirs, path)
