"""Folding each BatchNorm that directly follows a convolution into the convolution, for inference.

In eval mode a BatchNorm is an affine map per channel, ``y = gamma * (x - mean) / sqrt(var + eps) + beta``;
when ``x = W * z + b`` is a convolution's output and nothing else reads ``x``, the two collapse into one
convolution with ``W' = W * s`` (``s = gamma / sqrt(var + eps)`` scaling output channel ``o``'s filter) and
``b' = (b - mean) * s + beta``. The BatchNorm becomes an ``Identity``.

Which BatchNorm follows which convolution is found by watching the data flow of one forward pass, not by
module order (``named_modules`` lists a ResNet's downsample conv after the block's last BN, and a DenseNet's
BN reads a concatenation): every torch call is intercepted by a ``TorchFunctionMode`` and a convolution's
output counts as folded only when its one and only reader is a BatchNorm module, at every call of both.
This runs any model eagerly (control flow, lists of images for detectors), where ``torch.fx`` symbolic
tracing stops at the first ``if`` on a tensor's shape.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.ops import FrozenBatchNorm2d

from cnnlab._errors import CnnlabError

# exact types: a subclass may add work to forward (timm's BatchNormAct2d applies the activation too)
BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
PROBE_SIZE = 64  # a classifier is probed at min(64, its default input), never below its min_input_size


@dataclass
class FoldReport:
    """What :func:`fold_bn` did. Args: folded: (conv name, BN name) pairs merged; left: BN name -> why it stayed."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)

    @property
    def num_folded(self) -> int:
        return len(self.folded)

    @property
    def num_left(self) -> int:
        return len(self.left)

    def __str__(self) -> str:
        text = f"folded {self.num_folded} BatchNorm into the conv before it, left {self.num_left}"
        reasons: dict[str, int] = defaultdict(int)
        for why in self.left.values():
            reasons[why] += 1
        return text + "".join(f"\n  {n} left: {why}" for why, n in reasons.items())


def probe_input(model: nn.Module, input_size: Any = None, *, batch: int = 1, small: bool = True) -> Any:
    """An input to run ``model`` on: ``input_size`` as given (a Tensor, or a list of images for a detector), a
    random batch of that ``(C, H, W)``, or, for a registered model, one of its registry input (for a classifier
    with ``small``: at most 64 px, never below its min_input_size). A detection model (registry task
    ``detection``) gets a list of ``batch`` images in 0..1."""
    if isinstance(input_size, torch.Tensor) or (isinstance(input_size, (list, tuple)) and input_size
                                                and all(isinstance(t, torch.Tensor) for t in input_size)):
        return input_size
    info = _registry_info(model)
    if input_size is None:
        if info is None:
            raise CnnlabError(f"cannot tell what input a {type(model).__name__} takes (it is not a registered "
                              "cnnlab model); pass input_size=(C, H, W) or an example input tensor")
        channels, height, width = info.default_input
        channels = getattr(model, "in_channels", channels)
        if small and info.task == "classification":  # small is enough to see the data flow, and fast
            smallest = getattr(model, "min_input_size", 1)
            height, width = max(min(PROBE_SIZE, height), smallest), max(min(PROBE_SIZE, width), smallest)
        input_size = (channels, height, width)
    size = tuple(input_size) if isinstance(input_size, (list, tuple)) else None
    if size is None or len(size) != 3 or not all(isinstance(v, int) and v >= 1 for v in size):
        raise CnnlabError(f"input_size must be (C, H, W), three positive integers, or an example input tensor; "
                          f"got {input_size!r}")
    param = next(iter(model.parameters()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    if info is not None and info.task == "detection":  # torchvision's interface: a list of CHW images in 0..1
        return [torch.rand(size, device=device, dtype=dtype) for _ in range(batch)]
    return torch.randn((batch, *size), device=device, dtype=dtype)


def _registry_info(model: nn.Module) -> Any:
    from cnnlab.models import model_info

    name = getattr(model, "model_name", None)
    try:
        return model_info(name) if isinstance(name, str) else None
    except CnnlabError:
        return None


def fold_bn(model: nn.Module, *, input_size: Any = None, inplace: bool = False) -> nn.Module:
    """Return ``model`` in eval mode with every BatchNorm that reads only a Conv2d's output folded into it.

    ``input_size`` ((C, H, W) or an example input) is needed only for a model that is not registered. The
    returned model carries ``bn_fold``, a :class:`FoldReport` of what was folded and what was left (a BN after
    a concatenation, a sum or an activation; a BN never reached by the probe forward; a BN without running
    statistics). ``inplace=False`` works on a deep copy.
    """
    if not isinstance(model, nn.Module):
        raise CnnlabError(f"fold_bn takes an nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    example = probe_input(model, input_size)
    pairs, left = find_conv_bn_pairs(model, example)
    modules = dict(model.named_modules())
    report = FoldReport(left=left)
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        _fold_into(conv, bn)
        _replace(model, bn_name, nn.Identity())
        report.folded.append((conv_name, bn_name))
    model.bn_fold = report
    return model


def find_conv_bn_pairs(model: nn.Module, example: Any) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(conv name, BN name) pairs where the BN is the only reader of the conv's output, and BN name -> why not.

    Runs ``model(example)`` once (no gradients) and records, for each conv output, every torch call that reads
    it and the innermost module running at that moment.
    """
    names = {m: n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(conv output) -> (conv name, the tensor: keeps id unique)
    readers: dict[str, set[str]] = defaultdict(set)  # conv name -> modules (or calls) that read its output
    bn_sources: dict[str, set[str]] = defaultdict(set)  # BN name -> convs (or "other") its input came from

    def pre_hook(module: nn.Module, args: tuple) -> None:
        stack.append(module)
        if type(module) in BATCH_NORMS:
            source = produced.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
            bn_sources[names[module]].add(source[0] if source else "")

    def post_hook(module: nn.Module, _args: tuple, output: Any) -> None:
        stack.pop()
        if type(module) is nn.Conv2d and isinstance(output, torch.Tensor):
            produced[id(output)] = (names[module], output)

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if not _has_tensor(result):  # x.shape, x.dim(): metadata, not a read of the values
                return result
            for arg in _tensors((args, kwargs)):
                if id(arg) in produced:
                    reader = stack[-1] if stack else None
                    if reader is not None and type(reader) in BATCH_NORMS:
                        readers[produced[id(arg)][0]].add(names[reader])
                    else:
                        readers[produced[id(arg)][0]].add(f"{getattr(func, '__name__', func)} in "
                                                          f"{names.get(reader, 'the model') or 'the model'}")
            return result

    handles = [m.register_forward_pre_hook(pre_hook) for m in names] + \
              [m.register_forward_hook(post_hook) for m in names]
    try:
        with torch.no_grad(), Reads():
            model(example)
    except CnnlabError:
        raise
    except Exception as e:  # noqa: BLE001 - the probe's input did not fit the model
        raise CnnlabError(f"fold_bn could not run {type(model).__name__} on its probe input "
                          f"({_describe(example)}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                          "pass input_size=(C, H, W) or an example input the model accepts") from None
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    pairs, left = [], {}
    for name, module in modules.items():
        if type(module) not in BATCH_NORMS:
            continue
        sources = bn_sources.get(name)
        if not sources:
            left[name] = "not reached by the probe forward"
        elif sources == {""}:
            left[name] = "its input is not a convolution's output (concatenation, sum, activation, ...)"
        elif len(sources) > 1 or "" in sources:
            left[name] = "it reads different tensors at different calls"
        elif readers[next(iter(sources))] != {name}:
            left[name] = "the convolution's output is also read elsewhere"
        elif isinstance(module, nn.BatchNorm2d) and module.running_mean is None:
            left[name] = "no running statistics (track_running_stats=False: eval mode uses the batch's)"
        else:
            pairs.append((next(iter(sources)), name))
    return pairs, left


def _fold_into(conv: nn.Conv2d, bn: nn.Module) -> None:
    """conv <- bn o conv, computed in float64 and stored in the conv's dtype."""
    weight = conv.weight.detach()
    scale = bn.running_var.detach().double().add(bn.eps).rsqrt()
    if getattr(bn, "weight", None) is not None:  # affine=False: gamma = 1, beta = 0
        scale = scale * bn.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.detach().double()) * scale
    if getattr(bn, "bias", None) is not None:
        bias = bias + bn.bias.detach().double()
    # weight: (out_channels, in_channels / groups, kh, kw); channel o of the output is scaled, grouped or not
    with torch.no_grad():
        conv.weight.copy_((weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype))
    conv.bias = nn.Parameter(bias.to(device=weight.device, dtype=weight.dtype), requires_grad=conv.weight.requires_grad)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def _has_tensor(tree: Any) -> bool:
    return bool(_tensors(tree))


def _describe(example: Any) -> str:
    if isinstance(example, torch.Tensor):
        return f"a tensor of shape {tuple(example.shape)}"
    return f"{len(example)} images of shape {tuple(example[0].shape)}"
