"""Structured (channel) pruning through Torch-Pruning: whole filters removed, so the model really shrinks.

Torch-Pruning (Fang et al., CVPR 2023, "DepGraph") traces the model on an example input into a
dependency graph, so that removing output channel *c* of a conv also removes input channel *c* of
every layer that reads it: the following BatchNorm and conv, the other branch of a residual sum,
the matching slice of a concatenation (DenseNet, Inception), the groups of a grouped or depthwise
conv. Channels of a coupled group are ranked together by the magnitude of their weights
(``tp.importance.MagnitudeImportance``). The layer that produces the model's output keeps its
outputs (the class logits), so the output shape does not change.

A pruned model no longer matches its registry builder. It is saved as a plain state_dict (the
tensors carry the new shapes) plus :func:`structure_of` (the per-layer channel counts, JSON), and
rebuilt with :func:`apply_structure` on a freshly built model of the same name, then
``cnnlab.load_weights`` (pickling the module, as ``torch.save(model)`` or ``tp.state_dict`` do, is
not used: checkpoints load with ``weights_only``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.compress.prune_unstructured import PRUNABLE, SCOPES, check_amount, select_layers

# the module attributes that hold channel counts, per layer type (what Torch-Pruning rewrites besides the tensors)
STRUCTURE_ATTRS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._BatchNorm, ("num_features",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.PReLU, ("num_parameters",)),
)


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The conv/linear layer run last in a forward pass: the classifier, whose outputs are kept."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=n: order.append(name))
             for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    try:
        with torch.no_grad():
            _forward(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def _forward(model: nn.Module, example_input: torch.Tensor) -> Any:
    try:
        return model(example_input)
    except Exception as e:  # noqa: BLE001 - any failure of the user's model is reported the same way
        first = str(e).splitlines()[0] if str(e) else ""
        raise CnnlabError(f"{type(model).__name__} does not run on the example input of shape "
                          f"{tuple(example_input.shape)}: {type(e).__name__}: {first}; give an input the model "
                          "takes, (1, C, H, W)") from None


@dataclass
class StructuredReport:
    """What channel pruning did: parameters and multiply-adds (cnnlab.summary) before and after.

    Args:
        channels: per pruned conv/linear, (output channels before, after); untraced: conv/linear
            layers the example forward did not reach (left as they were).
    """

    amount: float
    scope: str
    input_size: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    output_shape: tuple[int, ...]
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"amount": self.amount, "scope": self.scope, "input_size": list(self.input_size),
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "output_shape": list(self.output_shape), "kept_outputs": self.kept, "untraced": self.untraced,
                "channels": {k: list(v) for k, v in self.channels.items()}}

    def table(self) -> str:
        pr, mr = self.params_after / self.params_before, self.macs_after / max(1, self.macs_before)
        lines = [f"channel pruning, {self.amount:.0%} of the channels of each coupled group ({self.scope} scope), "
                 f"input {tuple(self.input_size)}",
                 f"parameters {self.params_before:,} -> {self.params_after:,} ({pr:.1%} kept)",
                 f"MACs       {self.macs_before:,} -> {self.macs_after:,} ({mr:.1%} kept)",
                 f"output shape {tuple(self.output_shape)} (layers kept whole: {', '.join(self.kept) or 'none'})"]
        if self.untraced:
            lines.append(f"not reached by the example forward, left unpruned: {', '.join(self.untraced)}")
        return "\n".join(lines)


class ChannelPruner:
    """Removes ``amount`` of the channels of every prunable group, in ``steps`` equal steps (call :meth:`step`).

    Args:
        model: any nn.Module that Torch-Pruning can trace; changed in place.
        amount: fraction of channels removed at the end, in [0, 1).
        example_input: one batch the model takes, e.g. ``torch.randn(1, 3, 64, 64)``.
        scope: ``layer`` (each group loses ``amount``) or ``global`` (one ranking over all groups).
        ignored: module names whose outputs are kept (default: the last conv/linear, the classifier).
        round_to: keep channel counts multiples of this (e.g. 8 for SIMD-friendly shapes).
        steps: how many :meth:`step` calls reach ``amount`` (a fine-tune can run between them).
    """

    def __init__(self, model: nn.Module, amount: float, *, example_input: torch.Tensor, scope: str = "layer",
                 ignored: Sequence[str] | None = None, round_to: int | None = None, steps: int = 1) -> None:
        try:
            import torch_pruning as tp
        except ImportError:
            raise CnnlabError("structured pruning needs Torch-Pruning: pip install 'cnnlab[compress]' "
                              "(or torch-pruning)") from None
        self.amount = check_amount(amount)
        if scope not in SCOPES:
            raise CnnlabError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if not isinstance(steps, int) or steps < 1:
            raise CnnlabError(f"steps must be an integer >= 1, got {steps!r}")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise CnnlabError(f"round_to must be an integer >= 1 or None, got {round_to!r}")
        if not isinstance(example_input, torch.Tensor):
            raise CnnlabError(f"example_input must be a tensor batch, e.g. torch.randn(1, 3, 64, 64), "
                              f"got {type(example_input).__name__}")
        self.model, self.example_input, self.scope, self.steps, self.done = model, example_input, scope, steps, 0
        was_training = model.training
        model.eval()  # trace what inference runs (no BatchNorm statistics updated, no auxiliary heads)
        try:
            reference = _forward(model, example_input)
            if not isinstance(reference, torch.Tensor):
                raise CnnlabError(f"{type(model).__name__} returns {type(reference).__name__}, not a tensor; channel "
                                  "pruning traces models whose forward maps one tensor to one tensor (classifiers, "
                                  "segmenters)")
            self.output_shape = tuple(reference.shape)
            self.kept = output_layers(model, example_input) if ignored is None else list(ignored)
            named = dict(model.named_modules())
            keep = list(select_layers(model, self.kept).values()) if self.kept else []
            self.channels_before = {n: _out_channels(m) for n, m in named.items() if isinstance(m, PRUNABLE) and n}
            try:
                self.pruner = tp.pruner.BasePruner(
                    model, example_input, importance=tp.importance.MagnitudeImportance(p=2),
                    global_pruning=scope == "global", pruning_ratio=self.amount, iterative_steps=steps,
                    ignored_layers=keep, round_to=round_to)
            except CnnlabError:
                raise
            except Exception as e:  # noqa: BLE001 - Torch-Pruning fails in many ways on what it cannot trace
                raise CnnlabError(f"Torch-Pruning cannot trace {type(model).__name__} on an input of shape "
                                  f"{tuple(example_input.shape)}: {type(e).__name__}: {e}; channel pruning needs a "
                                  "model whose forward is plain tensor operations") from None
            traced = set(self.pruner.DG.module2node)
            self.untraced = [n for n, m in named.items() if isinstance(m, PRUNABLE) and n and m not in traced]
        finally:
            model.train(was_training)

    def step(self) -> None:
        """Prune the next ``amount / steps`` of the channels; check that the model still runs with the same output."""
        if self.done >= self.steps:
            raise CnnlabError(f"all {self.steps} pruning steps are done; build a new ChannelPruner to prune further")
        was_training = self.model.training
        self.model.eval()
        try:
            self.pruner.step()
            self.done += 1
            try:
                with torch.no_grad():
                    out = self.model(self.example_input)
            except Exception as e:  # noqa: BLE001
                raise CnnlabError(f"after channel pruning {type(self.model).__name__} no longer runs "
                                  f"({type(e).__name__}: {str(e).splitlines()[0]}): its forward probably hard-codes a "
                                  "channel count (a view/reshape, a constant tensor); add that layer to ignored"
                                  ) from None
            if tuple(out.shape) != self.output_shape:
                raise CnnlabError(f"channel pruning changed the output shape {self.output_shape} -> "
                                  f"{tuple(out.shape)}; add the layers that make the output to ignored")
        finally:
            self.model.train(was_training)

    def channels(self) -> dict[str, tuple[int, int]]:
        """Output channels (before, now) of every conv/linear whose count changed."""
        now = {n: _out_channels(m) for n, m in self.model.named_modules() if n in self.channels_before}
        return {n: (b, now[n]) for n, b in self.channels_before.items() if now.get(n, b) != b}


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features


def count(model: nn.Module, input_size: Sequence[int]) -> tuple[int, int]:
    """(parameters, multiply-adds for one image) as ``cnnlab.analysis.summary`` counts them."""
    from cnnlab.analysis import summary

    totals = summary(model, tuple(input_size), training_memory=False).totals
    return totals.params, totals.macs


def prune_structured(model: nn.Module, amount: float, *, example_input: torch.Tensor, scope: str = "layer",
                     ignored: Sequence[str] | None = None, round_to: int | None = None) -> StructuredReport:
    """Remove ``amount`` of the channels of ``model`` in one shot, in place; see :class:`ChannelPruner`.

    For the prune -> fine-tune schedule see :func:`cnnlab.compress.prune.prune`.
    """
    input_size = tuple(example_input.shape[1:])
    params0, macs0 = count(model, input_size)
    pruner = ChannelPruner(model, amount, example_input=example_input, scope=scope, ignored=ignored,
                           round_to=round_to)
    pruner.step()
    return structured_report(pruner, params0, macs0)


def structured_report(pruner: ChannelPruner, params_before: int, macs_before: int) -> StructuredReport:
    input_size = tuple(pruner.example_input.shape[1:])
    params, macs = count(pruner.model, input_size)
    return StructuredReport(pruner.amount, pruner.scope, input_size, params_before, params, macs_before, macs,
                            pruner.output_shape, pruner.channels(), pruner.kept, pruner.untraced)


def structure_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The channel counts of every conv, linear and norm layer (JSON-able): with the state_dict, a pruned model."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        for kind, attrs in STRUCTURE_ATTRS:
            if isinstance(module, kind):
                out[name] = {a: list(v) if isinstance(v, tuple) else v for a, v in
                             ((a, getattr(module, a)) for a in attrs)}
    return out


def apply_structure(model: nn.Module, structure: Mapping[str, Mapping[str, Any]],
                    state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Reshape a freshly built ``model`` to a pruned one: channel counts from ``structure``, tensor shapes from
    ``state_dict`` (whose values are then loaded with ``cnnlab.load_weights`` or ``load_state_dict``). In place.
    """
    named = dict(model.named_modules())
    unknown = [n for n in structure if n not in named]
    if unknown:
        raise CnnlabError(f"the pruned structure names layers {unknown[:3]} that {type(model).__name__} does not have; "
                          "was it saved from another architecture?")
    for name, attrs in structure.items():
        module = named[name]
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for name, module in named.items():
        prefix = f"{name}." if name else ""
        for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            saved = state_dict.get(prefix + pname)
            if saved is None or saved.shape == tensor.shape:
                continue
            fresh = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(module, pname, nn.Parameter(fresh, requires_grad=tensor.requires_grad))
            else:
                module._buffers[pname] = fresh
    return model

