"""Learned vs fixed up-sampling, measured: parameters, MACs and the checkerboard of a random transposed conv.

A stride-s transposed conv writes each input pixel's kernel into the output s pixels apart; the output
pixels of the s x s phases are sums of *different* kernel entries. With random weights (at initialisation,
and wherever training has not evened them out) a flat input therefore comes out as a periodic pattern:
the checkerboard artefact (Odena, Dumoulin & Olah, Distill 2016). Interpolating first and then convolving
(resize-then-conv) applies one kernel everywhere, so a flat input stays flat away from the borders.

:func:`checkerboard_strength` measures it: the blocks get a constant input, and the score is the standard
deviation of the output over the interior pixels divided by its mean magnitude, per channel, averaged over
channels and random initialisations: 0 for a flat output.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab._errors import CnnlabError
from cnnlab.layers.upsample import UPSAMPLE_MODES, UpsampleConv


@torch.no_grad()
def checkerboard_strength(mode: str, in_channels: int = 16, out_channels: int = 16, factor: int = 2, *,
                          size: int = 16, trials: int = 8, seed: int = 0) -> float:
    """How far a randomly initialised :class:`UpsampleConv` is from flat on a flat input (0 = flat)."""
    if size < 4:
        raise CnnlabError(f"size must be >= 4 pixels, got {size}")
    torch.manual_seed(seed)
    scores = []
    border = 2 * factor  # the kernel's reach: the edges are not flat for any up-sampling
    for _ in range(trials):
        block = UpsampleConv(in_channels, out_channels, factor, mode).eval()
        y = block(torch.ones(1, in_channels, size, size))[0, :, border:-border, border:-border].flatten(1)
        scores.append((y.std(1) / y.abs().mean(1).clamp(min=1e-12)).mean())
    return float(torch.stack(scores).mean())


@dataclass
class UpsamplingRow:
    mode: str
    params: int
    macs: int
    checkerboard: float


def compare_upsampling(in_channels: int = 64, out_channels: int = 64, factor: int = 2, size: int = 32,
                       modes: Sequence[str] = UPSAMPLE_MODES) -> list[UpsamplingRow]:
    """One row per mode: parameters, multiply-adds for a ``size`` x ``size`` input (cnnlab.summary), checkerboard."""
    from cnnlab.analysis.summary import summary

    rows = []
    for mode in modes:
        block = UpsampleConv(in_channels, out_channels, factor, mode)
        s = summary(block, (in_channels, size, size), training_memory=False)
        rows.append(UpsamplingRow(mode, sum(p.numel() for p in block.parameters()), int(s.totals.macs),
                                  checkerboard_strength(mode, min(in_channels, 16), min(out_channels, 16), factor)))
    return rows


def format_rows(rows: Sequence[UpsamplingRow], size: int) -> str:
    lines = [f"{'mode':<11} {'params':>9} {f'MACs @{size}px':>13} {'checkerboard':>13}"]
    lines += [f"{r.mode:<11} {r.params:>9,} {r.macs:>13,} {r.checkerboard:>13.4f}" for r in rows]
    return "\n".join(lines)


@torch.no_grad()
def plot_checkerboard(path: str | Path, factor: int = 2, channels: int = 8, size: int = 12, seed: int = 0) -> Path:
    """Each mode's first output channel for a flat input and for a smooth ramp, randomly initialised."""
    from cnnlab._plot import pyplot, save_figure

    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size).expand(1, channels, size, size)
    inputs = {"flat input": torch.ones(1, channels, size, size), "ramp input": ramp}
    plt = pyplot()
    fig, axes = plt.subplots(len(inputs), len(UPSAMPLE_MODES), figsize=(3.2 * len(UPSAMPLE_MODES), 6.2),
                             squeeze=False)
    for j, mode in enumerate(UPSAMPLE_MODES):
        torch.manual_seed(seed)
        block = UpsampleConv(channels, 1, factor, mode).eval()
        for i, (name, x) in enumerate(inputs.items()):
            ax = axes[i][j]
            ax.imshow(block(x)[0, 0].numpy(), cmap="gray")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{mode}, {name}", fontsize=9)
    fig.suptitle(f"x{factor} up-sampling, random init: transposed conv vs resize-then-conv")
    return save_figure(fig, Path(path))

