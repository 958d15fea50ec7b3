"""``cnnlab.summary``: the per-layer table (shapes, parameters, MACs, activations, receptive field)."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.analysis._ops import CONVENTIONS
from cnnlab.analysis._result import Row, Summary, Totals
from cnnlab.analysis._trace import ModuleRecord, Tracer, saved_for_backward

OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2, "rmsprop": 1}


def _resolve(model_or_name: nn.Module | str, input_size: Sequence[int] | None, device: str | torch.device | None):
    """(model, input_size, device, name, built_here)."""
    if isinstance(input_size, str):  # tuple('3x32x32') would be a tuple of characters
        raise CnnlabError(f"input_size must be a tuple of ints for one sample, e.g. (3, 224, 224), got the string "
                          f"{input_size!r}")
    if isinstance(model_or_name, str):
        from cnnlab.models.registry import create_model, model_info

        info = model_info(model_or_name)
        size = tuple(input_size) if input_size is not None else tuple(info.default_input)
        dev = torch.device(device) if device is not None else torch.device("meta")  # shapes only: fast, no memory
        with dev:
            model = create_model(model_or_name)
        return model, size, dev, model_or_name, True
    if not isinstance(model_or_name, nn.Module):
        raise CnnlabError(f"summary expects a model name or an nn.Module, got {type(model_or_name).__name__}")
    first = next(model_or_name.parameters(), None)
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    name = getattr(model_or_name, "model_name", None)
    if input_size is None and isinstance(name, str):  # a registered model's own default, e.g. 1x28x28 for simple_cnn
        from cnnlab.models.registry import list_models, model_info

        if name in list_models():
            input_size = model_info(name).default_input
            channels = getattr(model_or_name, "in_channels", None)
            if isinstance(channels, int):
                input_size = (channels, *tuple(input_size)[1:])
    size = tuple(input_size) if input_size is not None else (3, 224, 224)
    return model_or_name, size, dev, getattr(model_or_name, "model_name", type(model_or_name).__name__), False


def _check_size(size: tuple) -> None:
    if len(size) < 1 or not all(isinstance(s, int) and s > 0 for s in size):
        raise CnnlabError(f"input_size must be positive ints for one sample, e.g. (3, 224, 224), got {size!r}")


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool, restore_buffers: bool):
    """Temporarily switch train/eval; a train-mode pass must not change BN running stats."""
    was = [m.training for m in model.modules()]
    saved = [b.detach().clone() for b in model.buffers()] if restore_buffers else []
    model.train(training)
    for m in model.modules():
        # BatchNorm stays in eval mode for the training pass: it saves the same input tensor for
        # backward either way (train mode adds only per-channel mean/invstd), works at batch 1,
        # and avoids the slow meta-device decomposition of train-mode batch_norm
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        yield
    finally:
        for m, t in zip(model.modules(), was):
            m.training = t
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


def summary(
    model_or_name: nn.Module | str,
    input_size: Sequence[int] | None = None,
    *,
    depth: int | None = None,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    optimizer: str = "adam",
    device: str | torch.device | None = None,
    training_memory: bool = True,
) -> Summary:
    """Per-layer table and totals of a model for one input size.

    Args:
        model_or_name: a registered name (built on the meta device: shapes only, fast) or any nn.Module.
        input_size: one sample's shape, e.g. (3, 224, 224); default: the model's default input.
        depth: how many module levels to show (None: every leaf); deeper modules fold into their parent.
        batch_size, dtype, optimizer: for the training-memory estimate (and the bytes columns, via dtype).
        device: where to run the forward pass (default: the meta device for names, the model's own otherwise).
        training_memory: also run one train-mode pass to measure what autograd saves for backward.
    """
    model, size, dev, name, built = _resolve(model_or_name, input_size, device)
    _check_size(size)
    if depth is not None and depth < 0:
        raise CnnlabError(f"depth must be >= 0 or None, got {depth}")
    if optimizer not in OPTIMIZER_STATES:
        raise CnnlabError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZER_STATES)}")
    if batch_size < 1:
        raise CnnlabError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CnnlabError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    try:
        return _summarise(model, size, dev, name, depth, batch_size, dtype, optimizer, training_memory)
    except (NotImplementedError, RuntimeError) as e:
        if not (built and dev.type == "meta"):
            raise
        # an op without a meta kernel (data-dependent shapes): build for real on the CPU instead
        model, size, dev, name, built = _resolve(model_or_name, input_size, "cpu")
        try:
            return _summarise(model, size, dev, name, depth, batch_size, dtype, optimizer, training_memory)
        except RuntimeError as e2:
            raise CnnlabError(f"{name} cannot run on an input of size {size}: {e2}") from e


def _summarise(model, size, dev, name, depth, batch_size, dtype, optimizer, training_memory) -> Summary:
    x = torch.zeros(1, *size, device=dev) if dev.type != "meta" else torch.empty(1, *size, device=dev)
    if dev.type != "meta":
        x.normal_()
    tracer = Tracer(model)
    with _mode(model, False, False), torch.no_grad():
        try:
            tracer.run(x)
        except CnnlabError:
            raise
        except (RuntimeError, ValueError) as e:
            if "meta" in str(e).lower() or dev.type == "meta" and isinstance(e, NotImplementedError):
                raise
            raise CnnlabError(f"{name} cannot run on an input of size {size}: {e}") from e
    saved = None
    if training_memory:
        with _mode(model, True, dev.type != "meta"):
            try:
                saved = saved_for_backward(model, x)
            except Exception:  # noqa: BLE001 - e.g. detection models need targets in train mode: no estimate
                saved = None
    itemsize = torch.empty((), dtype=dtype).element_size()
    records = list(tracer.records.values())
    everything = {r.name: r for r in tracer._by_module.values()}
    unrun = [r for r in tracer._by_module.values() if r.order < 0 and (r.trainable or r.frozen)]
    rows = _rows(records, unrun, depth, itemsize, everything)
    params = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    frozen = sum(p.numel() for p in params.values() if not p.requires_grad)
    macs_by_kind: dict[str, int] = {}
    for r in records:
        for k, v in r.macs.items():
            macs_by_kind[k] = macs_by_kind.get(k, 0) + v
    uncounted: dict[str, list[str]] = {}
    for r in records:
        for op in r.uncounted:
            uncounted.setdefault(f"{r.type}.{op}" if r.is_leaf else op, []).append(r.name)
    act_elements = sum(r.act_elements for r in records) + x.numel()
    totals = Totals(
        params=trainable + frozen,
        trainable=trainable,
        frozen=frozen,
        macs=sum(macs_by_kind.values()),
        macs_by_kind=macs_by_kind,
        param_bytes=(trainable + frozen) * itemsize,
        input_elements=x.numel(),
        act_elements=act_elements,
        act_bytes=act_elements * itemsize,
        saved_bytes=None if saved is None else saved * itemsize // 4,  # measured in float32
        uncounted=uncounted,
    )
    return Summary(name=name, input_size=tuple(size), rows=rows, totals=totals, depth=depth, batch_size=batch_size,
                   dtype=str(dtype).replace("torch.", ""), itemsize=itemsize, optimizer=optimizer,
                   optimizer_states=OPTIMIZER_STATES[optimizer], conventions=CONVENTIONS)


def _ancestor(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def _rows(records: list[ModuleRecord], unrun: list[ModuleRecord], depth: int | None, itemsize: int,
          everything: dict[str, ModuleRecord]) -> list[Row]:
    groups: dict[str, list[ModuleRecord]] = {}
    keys: dict[str, float] = {}
    own: dict[str, bool] = {}
    for r in records:
        if r.depth == 0 and not r.is_leaf:
            head, is_own = r.name, depth != 0
        elif depth is not None and r.depth > depth:
            head, is_own = _ancestor(r.name, depth) if depth else "(model)", False
        else:
            head, is_own = r.name, not r.is_leaf and (depth is None or r.depth < depth)
        key = head + (" (own ops)" if is_own else "")
        groups.setdefault(key, []).append(r)
        own[key] = is_own
        keys[key] = max(keys.get(key, -1.0), r.order + (0.5 if is_own else 0.0))
    rows = []
    for key, recs in groups.items():
        if own[key]:
            r = recs[0]
            if not (r.macs or r.uncounted or r.act_elements or r.trainable or r.frozen):
                continue
            descendants = [o.order for o in records if o.name.startswith(r.name + ".") or r.depth == 0]
            keys[key] = max(descendants, default=r.order) + 0.5
        head = everything.get(key.replace(" (own ops)", ""), recs[0])
        rows.append((keys[key], _row(key, head, recs, itemsize, own[key])))
    for r in unrun:
        rows.append((1e9 + len(rows), Row(name=r.name, type=r.type + " (not run)", output_shape=None,
                                         trainable=r.trainable, frozen=r.frozen, macs=0, uncounted=[],
                                         act_elements=0, act_bytes=0, rf=None, jump=None, rf_whole=False)))
    return [row for _, row in sorted(rows, key=lambda t: t[0])]


def _row(key: str, head: ModuleRecord, recs: list[ModuleRecord], itemsize: int, is_own: bool) -> Row:
    if head.order < 0:  # a container never called itself (its parent calls its children): show the last output
        last = max(recs, key=lambda r: r.order)
        head = ModuleRecord(name=head.name, type=head.type, depth=head.depth, order=last.order, is_leaf=False,
                            output_shape=last.output_shape, rf=last.rf)
    rf = None if is_own else head.rf
    return Row(
        name=key,
        type=head.type,
        output_shape=None if is_own else head.output_shape,
        trainable=sum(r.trainable for r in recs),
        frozen=sum(r.frozen for r in recs),
        macs=sum(sum(r.macs.values()) for r in recs),
        uncounted=sorted({op for r in recs for op in r.uncounted}),
        act_elements=sum(r.act_elements for r in recs),
        act_bytes=sum(r.act_elements for r in recs) * itemsize,
        rf=None if rf is None else tuple(round(a.size, 2) for a in rf.axes),
        jump=None if rf is None else tuple(round(a.jump, 4) for a in rf.axes),
        rf_whole=bool(rf and rf.whole),
        rf_start=None if rf is None else tuple(a.start for a in rf.axes),
    )
