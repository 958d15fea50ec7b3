"""Receptive fields: computed analytically while tracing, and measured from gradient support.

Analytic: every tensor carries (size, jump, start) per spatial axis through the forward pass
(see ``_ops.propagate``). Because the propagation follows the actual tensors, branches are
handled exactly: a residual add or an inception concat takes the union of its inputs'
windows (the max over branches for aligned branches). Global pooling, flatten and SE
scaling mark a tensor as depending on the whole region reached.

Empirical: the bounding box of the non-zero input gradient of one output unit (the
"gradient support"), accumulated over a few random inputs so a max-pool that routes the
gradient to one element or a ReLU that is off for one input does not hide a pixel.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.analysis._trace import Tracer


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of a module's output: per spatial axis its ``size``, ``jump`` (stride in
    input pixels) and ``start`` (centre of output unit 0 in input pixel coordinates)."""

    size: tuple[float, ...]
    jump: tuple[float, ...]
    start: tuple[float, ...]
    whole: bool = False

    def window(self, index: Sequence[int], input_size: Sequence[int] | None = None) -> tuple[tuple[float, float], ...]:
        """Input pixels [lo, hi] (inclusive) seen by output unit ``index``; clipped to ``input_size`` if given."""
        out = []
        for i, (s, j, c) in enumerate(zip(self.size, self.jump, self.start)):
            centre = c + index[i] * j
            lo, hi = centre - (s - 1) / 2, centre + (s - 1) / 2
            if input_size is not None:
                lo, hi = max(lo, 0), min(hi, input_size[i] - 1)
            out.append((lo, hi))
        return tuple(out)


def receptive_fields(model: nn.Module, input_size: Sequence[int]) -> dict[str, ReceptiveField | None]:
    """Receptive field of every module's output (leaves and containers), by module name ('' = model)."""
    first = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=first.device if first is not None else "cpu")
    tracer = Tracer(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            tracer.run(x)
    finally:
        model.train(was)
    out: dict[str, ReceptiveField | None] = {}
    for rec in tracer.records.values():
        rf = rec.rf
        key = "" if rec.name == "(model)" else rec.name
        out[key] = None if rf is None else ReceptiveField(
            tuple(a.size for a in rf.axes), tuple(a.jump for a in rf.axes), tuple(a.start for a in rf.axes), rf.whole)
    return out


def empirical_receptive_field(
    model: nn.Module,
    input_size: Sequence[int],
    module: str = "",
    index: Sequence[int] | None = None,
    trials: int = 3,
    seed: int = 0,
) -> tuple[tuple[int, int], ...]:
    """Input pixels [lo, hi] per axis whose gradient w.r.t. one output unit of ``module`` is non-zero.

    Args:
        model: any module on the CPU; run in eval mode (its mode is restored).
        input_size: one sample's shape (C, H, W).
        module: dotted name of the module whose output unit is probed ('' = the model's output).
        index: spatial index of the unit (default: the centre); channels are summed.
        trials: random inputs whose gradient magnitudes are accumulated.
    """
    target = model.get_submodule(module) if module else model
    captured: dict[str, torch.Tensor] = {}

    class _Stop(Exception):
        pass

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        captured["out"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Stop  # the rest of the network does not matter

    dtype = next(model.parameters()).dtype
    was = model.training
    model.eval()
    handle = target.register_forward_hook(hook)
    g = torch.Generator().manual_seed(seed)
    try:
        # one batch of independent samples (eval mode): the unit's gradients add up across them
        x = torch.randn(trials, *input_size, generator=g, dtype=dtype, requires_grad=True)
        try:
            model(x)
        except _Stop:
            pass
        out = captured["out"]
        spatial = out.shape[2:]
        if not spatial:
            raise CnnlabError(f"output of {module or 'the model'} has no spatial dims: shape {tuple(out.shape)}")
        idx = tuple(index) if index is not None else tuple(s // 2 for s in spatial)
        unit = out[(slice(None), slice(None), *idx)].sum()
        (grad,) = torch.autograd.grad(unit, x)
        support = grad.abs().sum((0, 1))
    finally:
        handle.remove()
        model.train(was)
    nonzero = support.nonzero()
    if nonzero.numel() == 0:
        raise CnnlabError("the probed unit has zero gradient w.r.t. every input pixel")
    return tuple((int(nonzero[:, d].min()), int(nonzero[:, d].max())) for d in range(nonzero.shape[1]))
