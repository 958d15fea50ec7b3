"""One forward pass that records, per module, the ops it ran: MACs, new activations, receptive field.

A ``TorchFunctionMode`` sees every torch function call (module or functional); forward
pre/post hooks on every module keep a stack so each op is charged to the innermost module
running it. Receptive fields travel with the tensors as an attribute (``_ops.RF_ATTR``).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnlab.analysis import _ops
from cnnlab.analysis._ops import RF, RF_ATTR, Axis

_IGNORED = {"__get__", "__set__", "dim", "size", "numel", "__len__", "__format__", "__repr__", "element_size", "is_floating_point"}
_NOT_NEW = {"detach", "detach_", "alias", "view_as_real", "view_as_complex"}


@dataclass
class ModuleRecord:
    """What one module did during the traced forward (its own ops only, children excluded)."""

    name: str
    type: str
    depth: int
    order: int
    is_leaf: bool
    trainable: int = 0
    frozen: int = 0
    macs: Counter = field(default_factory=Counter)  # kind -> MACs
    uncounted: Counter = field(default_factory=Counter)  # op name -> calls
    act_elements: int = 0
    act_bytes: int = 0
    output_shape: tuple | None = None
    rf: RF | None = None
    calls: int = 0


def _tensors(obj: object, out: list[torch.Tensor], depth: int = 0) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 2 and isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out, depth + 1)
    elif depth < 2 and isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out, depth + 1)
    return out


def _shares_memory(out: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """True for an in-place result or a view of an input: it allocates no new activation memory."""
    base = out._base
    for t in inputs:
        if out is t or (base is not None and (base is t or base is t._base)):
            return True
        if out.device.type != "meta" and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() != 0:
            return True
    return False


class _SaveInput(torch.autograd.Function):
    """Stands in for batch_norm on the meta device: same shape, saves its input like batch_norm does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def _fast_meta(name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """batch_norm on meta tensors runs a slow Python decomposition (~6 ms a call); its output is
    just a tensor shaped like its input, so make that directly."""
    if name == "batch_norm" and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
        x = args[0]
        return _SaveInput.apply(x) if torch.is_grad_enabled() and x.requires_grad or _any_grad(args) else torch.empty_like(x)
    return None


def _any_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


class _FastMetaMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = _fast_meta(getattr(func, "__name__", ""), args, kwargs or {})
        return func(*args, **(kwargs or {})) if out is None else out


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None) or str(func)
        out = _fast_meta(name, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        if name in _IGNORED or not self.tracer.stack:
            return out
        outs = [o for o in _tensors(out, []) if o.is_floating_point() or o.is_complex()]
        if not outs:
            return out
        self.tracer.record(name, args, kwargs, outs)
        return out


class Tracer:
    """Runs ``model(x)`` once and fills ``records`` (one per module, in first-call order)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack: list[ModuleRecord] = []
        self.records: dict[str, ModuleRecord] = {}
        self._by_module: dict[int, ModuleRecord] = {}
        for name, module in model.named_modules():
            is_leaf = next(module.children(), None) is None
            rec = ModuleRecord(name=name or "(model)", type=type(module).__name__,
                               depth=0 if not name else name.count(".") + 1, order=-1, is_leaf=is_leaf)
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    rec.trainable += p.numel()
                else:
                    rec.frozen += p.numel()
            self._by_module[id(module)] = rec
        self._order = 0

    def record(self, name: str, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        rec = self.stack[-1]
        inputs = _tensors(args, []) + _tensors(kwargs, [])
        kind = _ops.op_kind(name)
        if kind is None:
            rec.uncounted[name] += 1
        elif kind != "zero":
            try:
                rec.macs[kind] += _ops.count_macs(name, args, kwargs, outs[0])
            except (NotImplementedError, IndexError, TypeError, AttributeError):
                rec.uncounted[name] += 1
        if name not in _NOT_NEW:
            for o in outs:
                if not _shares_memory(o, inputs):
                    rec.act_elements += o.numel()
                    rec.act_bytes += o.numel() * o.element_size()
        tracked = [(t, t.__dict__.get(RF_ATTR, False)) for t in inputs]
        tracked = [(t, rf) for t, rf in tracked if rf is not False]
        if not tracked:
            return
        rf: RF | None = None
        if all(r is not None for _, r in tracked):
            try:
                rf = _ops.propagate(name, args, kwargs, outs[0], tracked)  # type: ignore[arg-type]
            except (TypeError, IndexError, ValueError, AttributeError, ZeroDivisionError):
                rf = None
        for o in outs:
            setattr(o, RF_ATTR, rf)

    def _pre(self, module: nn.Module, _args: tuple) -> None:
        rec = self._by_module[id(module)]
        if rec.order < 0:
            rec.order = self._order
            self._order += 1
            self.records[rec.name] = rec
        rec.calls += 1
        self.stack.append(rec)

    def _post(self, module: nn.Module, _args: tuple, output: object) -> None:
        rec = self.stack.pop()
        outs = _tensors(output, [])
        if outs:
            rec.output_shape = tuple(outs[0].shape) if len(outs) == 1 else tuple(tuple(o.shape) for o in outs)
            rec.rf = outs[0].__dict__.get(RF_ATTR)

    def run(self, x: torch.Tensor) -> object:
        spatial = x.dim() - 2  # (B, C, *spatial); no receptive field for (B, features)
        if spatial > 0:
            setattr(x, RF_ATTR, RF(tuple(Axis(1.0, 1.0, 0.0) for _ in range(spatial))))
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(self._pre))
            handles.append(module.register_forward_hook(self._post))
        try:
            with _Mode(self):
                return self.model(x)
        finally:
            for h in handles:
                h.remove()
            self.stack.clear()


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of ``model(x)`` (parameters and buffers excluded, each storage once)."""
    params = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}  # model state, not activations
    seen: dict[object, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) in params or id(t) in params:
            return t
        key = base.untyped_storage().data_ptr() if base.device.type != "meta" else id(base)
        if key == 0:
            key = id(base)
        if key not in seen:
            keep.append(base)
            seen[key] = base.untyped_storage().nbytes() if base.device.type != "meta" else base.numel() * base.element_size()
        return t

    fast = _FastMetaMode() if x.device.type == "meta" else contextlib.nullcontext()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fast:
        model(x)
    return sum(seen.values())
