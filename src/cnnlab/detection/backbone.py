"""Detection backbones from any registered classifier, through its ``feature_info``.

:func:`build_backbone` builds the classifier by name, optionally loads its weights (a cnnlab
classification run folder, or a weights file: transfer learning, as the notes recommend), freezes its
batch norms and its first stages, drops what detection does not run (the classifier head, stages after
the last one returned), and taps the chosen stages' outputs. With ``fpn=True`` a feature pyramid
(Lin et al. 2017, ``torchvision.ops.FeaturePyramidNetwork`` plus an extra level: max-pooled for Faster R-CNN,
or RetinaNet's P6 and P7 by strided convs) turns them into maps of ``fpn_channels`` channels each.

state_dict layout, as torchvision's ``BackboneWithFPN``: ``body.*`` is the classifier in cnnlab's own
layout (``body.stem.conv.weight``, ``body.layer1.0...``), ``fpn.inner_blocks.*``/``fpn.layer_blocks.*``
are torchvision's FPN.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from cnnlab._errors import CnnlabError
from cnnlab.models.base import FeatureInfo

__all__ = ["Backbone", "build_backbone", "run_tapped", "default_stages", "freeze_batchnorm", "load_backbone_weights"]

FROZEN = ("frozen_batchnorm", "frozenbatchnorm", "frozen")
# the FPN's extra levels above the last stage: "pool" (Faster R-CNN's P6, a stride-2 max pool of P5; for the RPN),
# "p6p7" (RetinaNet's P6 and P7, 3x3 stride-2 convs from P5, as torchvision's retinanet_resnet50_fpn),
# "p6p7_c5" (the same from C5, the last stage's own map, as Lin et al. 2017 and torchvision's v2 builder),
# "none" (no level above the last stage: SSD's extra blocks follow instead)
EXTRA_BLOCKS = ("pool", "p6p7", "p6p7_c5", "none")


class _StopForward(Exception):
    """Raised by the last tapped stage's hook: the rest of the classifier is not needed."""


def run_tapped(model: nn.Module, x: Tensor, modules: Sequence[str]) -> dict[str, Tensor]:
    """Run ``model.forward_features(x)`` up to the last of ``modules``; their outputs by module path."""
    outputs: dict[str, Tensor] = {}
    last = modules[-1]

    def hook(_module, _inputs, output, key):
        outputs[key] = output
        if key == last and not torch.compiler.is_exporting():  # torch.export refuses exceptions as control flow
            raise _StopForward

    handles = [model.get_submodule(m).register_forward_hook(lambda mod, i, o, k=m: hook(mod, i, o, k))
               for m in modules]
    try:
        model.forward_features(x)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in modules if m not in outputs]
    if missing:
        raise CnnlabError(f"{getattr(model, 'model_name', type(model).__name__)}: the stages {missing} did not run "
                          "in forward_features; check the model's feature_info")
    return outputs


class Backbone(nn.Module):
    """A classifier's chosen stages, optionally through an FPN: images -> ``OrderedDict`` of feature maps.

    Args:
        body: the classifier (a ``cnnlab.models.base.Classifier``).
        stages: the ``FeatureInfo`` rows of the stages returned, in order.
        fpn_channels: channels of every FPN level; None returns the stages' own maps.
        extra_block: the FPN's extra levels, one of :data:`EXTRA_BLOCKS` (default ``"pool"``).
    """

    def __init__(self, body: nn.Module, stages: Sequence[FeatureInfo], fpn_channels: int | None = None,
                 extra_block: str = "pool") -> None:
        super().__init__()
        # the normalisation the body was trained with (set from a run folder's); None: the detector's default
        self.image_mean: tuple[float, ...] | None = None
        self.image_std: tuple[float, ...] | None = None
        self.body = body
        self.stages = list(stages)
        self.fpn: FeaturePyramidNetwork | None = None
        extra_names: list[str] = []
        if fpn_channels is not None:
            extra, extra_names = _extra_block(extra_block, self.stages[-1].channels, fpn_channels)
            self.fpn = FeaturePyramidNetwork([s.channels for s in self.stages], fpn_channels, extra_blocks=extra)
            self.out_channels = fpn_channels
        else:  # the stages' own maps; out_channels only when they agree (heads shared by every map need that)
            self.channels = [s.channels for s in self.stages]
            self.out_channels = self.channels[0] if len(set(self.channels)) == 1 else None
        # the maps' names, as torchvision's ("0", "1", ..., plus "pool" or "p6", "p7" from the FPN's extra block)
        self.names = [str(i) for i in range(len(self.stages))] + extra_names
        self.strides = [s.stride for s in self.stages] + [self.stages[-1].stride * 2 ** (i + 1)
                                                          for i in range(len(extra_names))]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        taps = run_tapped(self.body, x, [s.module for s in self.stages])
        features = OrderedDict((str(i), taps[s.module]) for i, s in enumerate(self.stages))
        return self.fpn(features) if self.fpn is not None else features


def _extra_block(kind: str, last_channels: int, fpn_channels: int) -> tuple[ExtraFPNBlock | None, list[str]]:
    """The FPN's extra block of ``kind`` (see :data:`EXTRA_BLOCKS`) and the names of the maps it adds."""
    if kind == "none":
        return None, []
    if kind == "pool":
        return LastLevelMaxPool(), ["pool"]
    if kind in ("p6p7", "p6p7_c5"):
        block = LastLevelP6P7(fpn_channels if kind == "p6p7" else last_channels, fpn_channels)
        block.use_P5 = kind == "p6p7"  # torchvision picks P5 whenever the channels agree; the name decides here
        return block, ["p6", "p7"]
    raise CnnlabError(f"extra_block must be one of {', '.join(EXTRA_BLOCKS)} (the FPN's levels above the last stage), "
                      f"got {kind!r}")


def default_stages(feature_info: Sequence[FeatureInfo], fpn: bool) -> list[int]:
    """Stage indices returned by default.

    FPN: every stage of stride >= 4 (ResNet: layer1..layer4, as torchvision). Without: the deepest stage of
    stride <= 16, the map Faster R-CNN's paper puts the RPN on (VGG-16's conv5 at stride 16); the last
    stage when every stage has a smaller stride.
    """
    if fpn:
        picked = [i for i, f in enumerate(feature_info) if f.stride >= 4]
        return picked or list(range(len(feature_info)))
    upto16 = [i for i, f in enumerate(feature_info) if f.stride <= 16]
    return [upto16[-1] if upto16 else len(feature_info) - 1]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` by a ``FrozenBatchNorm2d`` with the same statistics and affine terms.

    Detection batches are small (2 images per GPU), too few for batch statistics; torchvision freezes them.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.weight is not None:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen.to(child.weight.device if child.weight is not None else "cpu"))
        else:
            freeze_batchnorm(child)
    return module


def _probe(model: nn.Module, stages: Sequence[FeatureInfo], channels: int) -> tuple[list[str], dict[str, int]]:
    """One small forward: the modules with parameters that never run (to drop) and each run module's stage.

    A module belongs to stage i when it finishes after stage i-1's output and before stage i's.
    """
    all_stages = list(model.feature_info)
    size = max(int(getattr(model, "min_input_size", 32)), 64)
    finished: list[str] = []
    stage_done: list[int] = []  # len(finished) when each stage finished
    handles = []
    holders = {n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False)) or
               any(True for _ in m.buffers(recurse=False))}
    for n, m in holders.items():
        handles.append(m.register_forward_hook(lambda _m, _i, _o, n=n: finished.append(n)))
    for f in all_stages:
        handles.append(model.get_submodule(f.module).register_forward_hook(
            lambda _m, _i, _o: stage_done.append(len(finished))))
    was_training = model.training
    model.eval()  # no running statistics updated by the probe
    first = next(model.parameters(), None)
    device = first.device if first is not None else None
    try:
        with torch.no_grad():
            run_tapped(model, torch.zeros(1, channels, size, size, device=device), [s.module for s in stages])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stage_of: dict[str, int] = {}
    for position, name in enumerate(finished):
        stage_of.setdefault(name, next((i for i, done in enumerate(stage_done) if position < done), len(stage_done)))
    unused = [n for n in holders if n not in stage_of]
    return unused, stage_of


def _drop(model: nn.Module, names: list[str]) -> None:
    for name in sorted(names, key=len):
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            continue  # under a module already dropped
        if name and hasattr(parent, child):
            setattr(parent, child, nn.Identity())


def load_backbone_weights(model: nn.Module, weights: str | os.PathLike) -> dict | None:
    """Weights from a cnnlab classification run folder or a file, into the (pruned) classifier.

    Keys of modules detection dropped (the head) are skipped; a missing or mis-shaped key of the body raises.
    Returns the run's normalisation (``{"mean": [...], "std": [...]}``) when it has one, else None.
    """
    from cnnlab.models.weights import load_weights, read_state_dict

    if not str(weights).strip():  # Path("") is ".", a folder: say what is wrong instead of "no run folder"
        raise CnnlabError("backbone_weights is empty; expected a cnnlab classification run folder or a weights "
                          "file (or leave it unset for random initialisation)")
    path = Path(weights)
    norm = None
    if path.is_dir():
        from cnnlab.engine.runs import load_run

        run = load_run(path)
        source, where = run.model.state_dict(), f"run {path} (model {getattr(run.model, 'model_name', '?')})"
        pre = run.preprocess or {}
        if pre.get("mean") is not None and pre.get("std") is not None:
            norm = {"mean": list(pre["mean"]), "std": list(pre["std"])}
    elif path.is_file():
        source, where = read_state_dict(path), str(path)
    else:
        raise CnnlabError(f"backbone_weights {str(weights)!r} is neither a run folder nor a weights file")
    own = model.state_dict()
    source = dict(source)
    for k, v in list(source.items()):  # a grey-image run: its first conv sees the mean of R, G and B
        target = own.get(k)
        if target is not None and v.ndim == 4 and target.ndim == 4 and v.shape[1] == 1 and target.shape[1] == 3 \
                and v.shape[0] == target.shape[0] and v.shape[2:] == target.shape[2:]:
            source[k] = v.repeat(1, 3, 1, 1) / 3
    result = load_weights(model, source, strict=False)
    # unexpected keys are the dropped head's (or an EMA's extras); the final layer may differ (other classes)
    head = getattr(model, "head_name", "fc") + "."
    problems = [k for k in result.missing + result.mismatched
                if not k.startswith(head) and not k.endswith("num_batches_tracked")]  # counters: not weights
    if problems or len(result.missing) == len(own):
        shown = ", ".join(problems[:6]) + (f", ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        raise CnnlabError(f"backbone weights from {where} do not fit {getattr(model, 'model_name', '?')}: "
                          f"{shown or 'no key in common'}; the run or file must hold the same architecture as backbone=")
    return norm


def build_backbone(
    name: str,
    *,
    fpn: bool,
    returned_stages: Sequence[int] | None = None,
    weights: str | os.PathLike | None = None,
    trainable_layers: int | None = None,
    norm_layer: str | Callable[..., nn.Module] | None = None,
    fpn_channels: int = 256,
    in_channels: int = 3,
    model_options: Mapping[str, Any] | None = None,
    extra_block: str = "pool",
) -> Backbone:
    """A registered classifier as a detection backbone.

    Args:
        name: any registered classifier (``cnnlab.list_models(task="classification")``).
        fpn: put a feature pyramid on the returned stages.
        returned_stages: indices into the classifier's ``feature_info``; None: :func:`default_stages`.
        weights: a cnnlab classification run folder or a weights file for the classifier; None: random init.
        trainable_layers: how many of the last stages (of ``feature_info``) train; the rest are frozen.
            None: all (no weights) or 3 (with weights), as torchvision.
        norm_layer: ``"frozen_batchnorm"`` (every BatchNorm2d frozen), ``"batchnorm"`` (kept, batch statistics),
            another layer name or factory (passed to the classifier); None: frozen with weights, batchnorm without.
        fpn_channels: channels of every FPN level.
        extra_block: the FPN's levels above the last stage (:data:`EXTRA_BLOCKS`): ``"pool"`` (Faster R-CNN's),
            ``"p6p7"`` (RetinaNet's P6, P7 from P5, as torchvision), ``"p6p7_c5"`` (from C5, as the paper),
            ``"none"`` (one level per returned stage).
        in_channels: input image channels.
        model_options: more keyword arguments of the classifier's builder (``{"output_stride": 8}`` for a dilated
            ResNet, as DeepLab needs).
    """
    from cnnlab.models.registry import create_model, model_info

    info = model_info(name)
    if info.task != "classification":
        raise CnnlabError(f"backbone={name!r} is a {info.task} model; a backbone must be a registered classifier "
                          "(cnnlab.list_models(task='classification'))")
    if extra_block not in EXTRA_BLOCKS:  # a typo fails before the classifier is built
        _extra_block(extra_block, 0, 0)
    if norm_layer is None:
        norm_layer = "frozen_batchnorm" if weights is not None else "batchnorm"
    options = dict(model_options or {})
    if not (isinstance(norm_layer, str) and norm_layer.lower() in FROZEN + ("batchnorm",)) \
            and norm_layer is not FrozenBatchNorm2d:
        options["norm_layer"] = norm_layer
    model = create_model(name, in_channels=in_channels, **options)
    feature_info = list(getattr(model, "feature_info", []))
    if not feature_info:
        raise CnnlabError(f"backbone={name!r} lists no feature_info stages, so detection cannot tap it")
    indices = list(returned_stages) if returned_stages is not None else default_stages(feature_info, fpn)
    if not indices or any(not isinstance(i, int) or not 0 <= i < len(feature_info) for i in indices) \
            or sorted(set(indices)) != indices:
        raise CnnlabError(f"returned_stages={returned_stages!r}: expected increasing indices in 0..{len(feature_info) - 1} "
                          f"of {name}'s stages {[f'{f.module} (stride {f.stride})' for f in feature_info]}")
    stages = [feature_info[i] for i in indices]

    unused, stage_of = _probe(model, stages, in_channels)
    _drop(model, unused)  # the head and later stages: no parameters that never get a gradient
    norm = load_backbone_weights(model, weights) if weights is not None else None
    if norm_layer is FrozenBatchNorm2d or (isinstance(norm_layer, str) and norm_layer.lower() in FROZEN):
        freeze_batchnorm(model)

    num_stages = len(feature_info)
    if trainable_layers is None:
        trainable_layers = 3 if weights is not None else num_stages
    if not 0 <= trainable_layers <= num_stages:
        raise CnnlabError(f"trainable_backbone_layers must be in 0..{num_stages} ({name} has {num_stages} stages), "
                          f"got {trainable_layers}")
    first_trainable = num_stages - trainable_layers
    for module_name, stage in stage_of.items():
        if stage < first_trainable:
            for p in model.get_submodule(module_name).parameters(recurse=False):
                p.requires_grad_(False)
    backbone = Backbone(model, stages, fpn_channels if fpn else None, extra_block=extra_block)
    if norm is not None and len(norm["mean"]) in (1, in_channels):  # the run's normalisation, per input channel
        backbone.image_mean = tuple(norm["mean"] * (in_channels // len(norm["mean"])))
        backbone.image_std = tuple(norm["std"] * (in_channels // len(norm["std"])))
    return backbone
