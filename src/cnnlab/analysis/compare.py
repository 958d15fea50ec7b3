"""Side-by-side comparison of models: parameters, MACs, activation memory, measured latency."""
from __future__ import annotations

import csv
import io
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab._io import atomic_write_text
from cnnlab._plot import pyplot, save_figure
from cnnlab.analysis._result import human
from cnnlab.analysis.summary import summary


@dataclass
class ComparedModel:
    """One model of a comparison, at ``input_size``, batch 1; ``latency_ms`` only when benchmarked."""

    name: str
    input_size: tuple
    params: int
    macs: int
    act_bytes: int
    saved_bytes: int | None
    uncounted: int
    latency_ms: float | None = None


@dataclass
class Comparison:
    """Result of ``compare``: one ComparedModel per model; ``table()``, ``to_csv()``, ``plot(path)``."""

    models: list[ComparedModel]

    def table(self) -> str:
        bench = any(m.latency_ms is not None for m in self.models)
        headers = ["model", "input", "params", "MACs", "FLOPs", "act. mem", "train act."] + (["latency"] if bench else [])
        rows = []
        for m in self.models:
            rows.append([m.name, "x".join(map(str, m.input_size)), human(m.params), human(m.macs) + ("+?" if m.uncounted else ""),
                         human(2 * m.macs), human(m.act_bytes, "B"), human(m.saved_bytes, "B")] +
                        ([f"{m.latency_ms:.1f} ms" if m.latency_ms is not None else "-"] if bench else []))
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines = [fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
        lines.append("batch 1, float32; MACs as in `cnnlab summary` (FLOPs = 2 x MACs); act. mem = forward activations "
                     "per image; train act. = what autograd saves for backward per image"
                     + ("; latency = median wall time of a forward pass on this machine's CPU" if bench else ""))
        return "\n".join(lines)

    __str__ = table

    def to_csv(self, path: str | Path | None = None) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(asdict(self.models[0])), lineterminator="\n")
        w.writeheader()
        for m in self.models:
            d = asdict(m)
            d["input_size"] = "x".join(map(str, m.input_size))
            w.writerow(d)
        if path is not None:
            atomic_write_text(path, buf.getvalue())
        return buf.getvalue()

    def plot(self, path: str | Path) -> Path:
        """MACs vs parameters (log-log); bubble area proportional to forward activation memory."""
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(7, 5))
        biggest = max(m.act_bytes for m in self.models) or 1
        for m in self.models:
            ax.scatter(m.params, m.macs, s=50 + 1500 * m.act_bytes / biggest, alpha=0.5)
            ax.annotate(m.name, (m.params, m.macs), fontsize=8, ha="center", va="center")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("MACs per image")
        ax.set_title("MACs vs parameters (bubble area = forward activation memory)")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        save_figure(fig, path)
        return path


def measure_latency(model: nn.Module, input_size: Sequence[int], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in milliseconds of ``model(x)`` for one image, eval mode, no grad."""
    if repeats < 1 or warmup < 0:
        raise CnnlabError(f"latency needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    first = next(model.parameters(), None)
    x = torch.randn(1, *input_size, device=first.device if first is not None else "cpu")
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def compare(
    models: Sequence[str | nn.Module],
    input_size: Sequence[int] | None = None,
    bench: bool = False,
    repeats: int = 5,
) -> Comparison:
    """Summarise every model (each at ``input_size``, or its own default input) and optionally time it.

    Args:
        models: registered names or nn.Modules.
        input_size: one sample's shape for all models; None: each model's default input.
        bench: also measure CPU latency (builds each model for real: slower).
        repeats: timed forward passes per model (the median is reported).
    """
    out = []
    for m in models:
        s = summary(m, input_size)
        latency = None
        if bench:
            if isinstance(m, str):
                from cnnlab.models.registry import create_model

                model = create_model(m)
            else:
                model = m
            latency = measure_latency(model, s.input_size, repeats)
        out.append(ComparedModel(name=s.name, input_size=s.input_size, params=s.totals.params, macs=s.totals.macs,
                                 act_bytes=s.totals.act_bytes, saved_bytes=s.totals.saved_bytes,
                                 uncounted=len(s.totals.uncounted), latency_ms=latency))
    return Comparison(out)
