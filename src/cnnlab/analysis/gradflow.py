"""Gradient flow: per-layer gradient norms and dead ReLUs after one forward/backward pass."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab._plot import pyplot, save_figure
from cnnlab.analysis._result import human

_RELUS = (nn.ReLU, nn.ReLU6)


@dataclass
class LayerGradient:
    """One parametrised layer: the norm of its weight gradient (all its own parameters together)."""

    name: str
    type: str
    grad_norm: float
    param_norm: float

    @property
    def ratio(self) -> float:
        """|grad| / |weights|: the relative step SGD would take at learning rate 1."""
        return self.grad_norm / self.param_norm if self.param_norm else float("nan")


@dataclass
class GradientFlow:
    """Result of ``gradient_flow``: ``layers`` in forward order and ``dead_relu`` (name -> fraction)."""

    loss: float
    layers: list[LayerGradient]
    dead_relu: dict[str, float] = field(default_factory=dict)

    @property
    def dead_fraction(self) -> float:
        """Fraction of dead units over all ReLU layers (unweighted mean of the layers)."""
        return sum(self.dead_relu.values()) / len(self.dead_relu) if self.dead_relu else 0.0

    def first_last_ratio(self) -> float:
        """Gradient norm of the first layer over that of the last: << 1 means vanishing gradients."""
        return self.layers[0].grad_norm / self.layers[-1].grad_norm if self.layers and self.layers[-1].grad_norm else float("nan")

    def table(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer'.ljust(width)}  {'type':<14} {'|grad|':>10} {'|grad|/|w|':>11}  dead ReLU after"]
        dead = dict(self.dead_relu)
        for layer in self.layers:
            lines.append(f"{layer.name.ljust(width)}  {layer.type:<14} {layer.grad_norm:10.3e} {layer.ratio:11.3e}")
        lines.append(f"loss {self.loss:.4f}; first/last layer gradient norm ratio {self.first_last_ratio():.3e}")
        if dead:
            lines.append(f"dead ReLU units (zero for every sample of the batch): mean {self.dead_fraction:.1%}; " +
                         ", ".join(f"{k} {v:.1%}" for k, v in list(dead.items())[:8]) + (" ..." if len(dead) > 8 else ""))
        return "\n".join(lines)

    __str__ = table

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Gradient norm per layer (log scale) and dead-ReLU fraction per ReLU layer, as a PNG."""
        plt = pyplot()

        fig, axes = plt.subplots(2 if self.dead_relu else 1, 1, figsize=(max(6, len(self.layers) * 0.12 + 4), 6), squeeze=False)
        ax = axes[0, 0]
        norms = [max(layer.grad_norm, 1e-30) for layer in self.layers]
        ax.semilogy(range(len(norms)), norms, marker="o", markersize=3)
        ax.set_xlabel("layer (forward order)")
        ax.set_ylabel("weight gradient norm")
        ax.set_title(title or "gradient flow")
        ax.grid(True, which="both", alpha=0.3)
        if self.dead_relu:
            ax = axes[1, 0]
            ax.bar(range(len(self.dead_relu)), [100 * v for v in self.dead_relu.values()])
            ax.set_xlabel("ReLU layer (forward order)")
            ax.set_ylabel("dead units (%)")
            ax.set_ylim(0, 100)
        fig.tight_layout()
        path = Path(path)
        save_figure(fig, path)
        return path


def gradient_flow(
    model: nn.Module,
    batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> GradientFlow:
    """One forward/backward pass of ``model`` on ``batch``; gradient norm per layer and dead ReLUs.

    Args:
        model: any module (left in the train/eval mode it is in; gradients are zeroed before and after).
        batch: inputs, or (inputs, targets). Without targets, a classifier's (B, K) output is scored
            by cross-entropy against random labels (seeded), any other output by mean(output^2).
        loss_fn: loss(output, targets); default cross-entropy.
    """
    x, y = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
    if not isinstance(x, torch.Tensor) or not (y is None or isinstance(y, torch.Tensor)):
        raise CnnlabError(f"batch must be a tensor or (inputs, targets), got {type(x).__name__}")
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _RELUS):
            def hook(_m: nn.Module, _i: tuple, out: torch.Tensor, key: str = name) -> None:
                # a unit is dead for this batch if it outputs 0 for every sample
                outputs.setdefault(key, []).append((out.detach() > 0).any(0).logical_not().float().mean())
            handles.append(module.register_forward_hook(hook))
    order: list[nn.Module] = []
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(lambda m, _i, _o: order.append(m)))
    model.zero_grad(set_to_none=True)
    try:
        out = model(x)
    except ValueError as e:
        if "more than 1 value per channel" not in str(e):
            raise
        # BatchNorm in train mode cannot normalise a single value (batch 1 at a 1x1 map)
        raise CnnlabError(f"a train-mode pass of {tuple(x.shape)} reaches a BatchNorm with one value per channel "
                          "(batch size 1 at a 1x1 feature map); use a batch of 2 or more, a larger input, "
                          "or eval mode") from None
    finally:
        for h in handles:
            h.remove()
    if isinstance(out, (tuple, list)):
        out = out[0]
    if y is None and out.dim() == 2 and loss_fn is None:
        y = torch.randint(0, out.shape[1], (out.shape[0],), generator=torch.Generator().manual_seed(seed)).to(out.device)
    if y is not None:
        loss = (loss_fn or nn.functional.cross_entropy)(out, y)
    else:
        loss = out.float().pow(2).mean()
    loss.backward()
    names = {id(m): n for n, m in model.named_modules()}
    layers, seen = [], set()
    for module in order:
        if id(module) in seen:
            continue
        seen.add(id(module))
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if not grads:
            continue
        layers.append(LayerGradient(
            name=names[id(module)] or "(model)", type=type(module).__name__,
            grad_norm=float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))),
            param_norm=float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.detach().float()) for p in module.parameters(recurse=False)]))),
        ))
    model.zero_grad(set_to_none=True)
    dead = {}
    for key, values in outputs.items():
        for i, v in enumerate(values):
            dead[key if len(values) == 1 else f"{key}#{i + 1}"] = float(v)
    return GradientFlow(loss=float(loss.detach()), layers=layers, dead_relu=dead)


__all__ = ["GradientFlow", "LayerGradient", "gradient_flow", "human"]
