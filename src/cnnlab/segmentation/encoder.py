"""The segmentation encoder: any registered classifier's ``feature_info`` stages, dilated to an output stride.

API (stable; every segmentation family builds on it)::

    build_encoder(name, *, output_stride=32, stages=None, weights=None, in_channels=3, norm_layer=None,
                  uniform_dilation=False) -> Encoder
    encoder(x) -> list[Tensor]            # the chosen stages' maps, shallow first
    encoder.channels, encoder.strides     # one entry per returned map
    encoder.body                          # the classifier (head and unused later stages dropped)
    encoder_from_smp(state_dict, prefix="encoder") -> state_dict
    stage_table(name, output_stride=32)   # the classifier's feature_info (meta device), to pick stages
    find_stage(name, feature_info, stride, model=...) -> index of the deepest stage of that stride

:func:`build_encoder` is a thin layer over :func:`cnnlab.detection.backbone.build_backbone` (``fpn=False``):
it builds the classifier ``name`` with ``output_stride`` (8 or 16: the last stages dilate instead of
striding, Chen et al.'s atrous convolution; basic-block ResNets too, vision#4801), taps the chosen
stages, keeps batch norm trainable (``norm_layer="batchnorm"`` by default: segmentation batches are large
enough for batch statistics, unlike detection's) and trains every stage. A classifier whose builder
takes no ``output_stride`` cannot dilate: asking it for 8 or 16 is a clear error. The stages' maps are
taken by forward hooks registered once on the classifier, so the encoder exports (``torch.export``, ONNX)
with dynamic height and width, and deep-copies (EMA).

state_dict layout: ``<attribute>.body.<classifier keys>`` (``encoder.body.stem.conv.weight``,
``encoder.body.layer1.0.residual.conv1.conv.weight``, ...). :func:`encoder_from_smp` maps smp's ResNet
encoder keys (``encoder.conv1.weight``, ``encoder.layer1.0.conv1.weight``: torchvision's ResNet names)
onto that layout, for every smp converter.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.models.base import FeatureInfo
from cnnlab.models.catalog import StateDict

__all__ = ["Encoder", "build_encoder", "encoder_from_smp", "find_stage", "stage_table", "OUTPUT_STRIDES"]

OUTPUT_STRIDES = (8, 16, 32)


class _StopForward(Exception):
    """Raised by the last stage's tap: what follows in the classifier is not the encoder's."""


class _Tap:
    """A forward hook that keeps its module's last output (an object found through the module, not a closure
    over the encoder: a deep copy of the model, an EMA's, and torch.export's copies of attributes still work)."""

    def __init__(self) -> None:
        self.output: Tensor | None = None
        self.last = False  # the encoder's last stage: the rest of the classifier need not run

    def __call__(self, _module: nn.Module, _inputs: object, output: Tensor) -> None:
        self.output = output
        if self.last and not torch.compiler.is_exporting():  # torch.export refuses exceptions as control flow
            raise _StopForward


def _tap_of(module: nn.Module) -> _Tap:
    return next(h for h in module._forward_hooks.values() if isinstance(h, _Tap))


class Encoder(nn.Module):
    """A classifier's chosen ``feature_info`` stages: images -> list of feature maps, shallow first.

    The stages' outputs are taken by forward hooks registered once, here, so that ``torch.export`` (and ONNX
    export with dynamic sizes) traces the encoder; the classifier's modules after the last stage are dropped.

    Args:
        body: the classifier (a ``cnnlab.models.base.Classifier``; its head and later stages dropped).
        stages: the ``FeatureInfo`` rows of the returned stages, in order.
        output_stride: the stride of the deepest stage the classifier was built with (8, 16 or 32).
    """

    def __init__(self, body: nn.Module, stages: Sequence[FeatureInfo], output_stride: int = 32) -> None:
        super().__init__()
        self.body = body
        self.stages = list(stages)
        self.channels = [s.channels for s in self.stages]
        self.strides = [s.stride for s in self.stages]
        self.output_stride = output_stride
        for stage in self.stages:
            module = body.get_submodule(stage.module)
            if not any(isinstance(h, _Tap) for h in module._forward_hooks.values()):  # one per stage, shared
                module.register_forward_hook(_Tap())
        # The stages after the last one tapped are skeletons (build_backbone dropped their parameters, not their
        # activations): they must not run. The last tap stops the forward; while exporting (no exceptions) they
        # are identities, so that nothing, in-place activations included, touches the tapped maps.
        modules = [f.module for f in getattr(body, "feature_info", [])]
        last = self.stages[-1].module
        _tap_of(body.get_submodule(last)).last = True
        for later in modules[modules.index(last) + 1:] if last in modules else []:
            parent, _, child = later.rpartition(".")
            setattr(body.get_submodule(parent) if parent else body, child, nn.Identity())

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = [_tap_of(self.body.get_submodule(s.module)) for s in self.stages]
        for tap in taps:
            tap.output = None
        try:
            self.body.forward_features(x)  # (B, C, H, W) -> the taps fill in; the last one stops the forward
        except _StopForward:
            pass
        outputs = [tap.output for tap in taps]
        for tap in taps:
            tap.output = None  # hold no activations between calls
        missing = [s.module for s, out in zip(self.stages, outputs) if out is None]
        if missing:
            raise CnnlabError(f"{getattr(self.body, 'model_name', type(self.body).__name__)}: the stages {missing} "
                              "did not run in forward_features; check the model's feature_info")
        return outputs  # type: ignore[return-value]


def _stage_list(feature_info: Sequence[FeatureInfo]) -> str:
    return ", ".join(f"{i}: {f.module} (stride {f.stride}, {f.channels} ch)" for i, f in enumerate(feature_info))


def build_encoder(
    name: str,
    *,
    output_stride: int = 32,
    stages: Sequence[int] | None = None,
    weights: str | os.PathLike | None = None,
    in_channels: int = 3,
    norm_layer: str | Callable[..., nn.Module] | None = None,
    uniform_dilation: bool = False,
) -> Encoder:
    """Classifier ``name`` as a segmentation encoder.

    Args:
        name: any registered classifier (``cnnlab.list_models(task="classification")``).
        output_stride: 32 (as classified), 16 or 8 (the last stages dilated; the classifier must take
            ``output_stride``, as cnnlab's ResNets do).
        stages: increasing indices into the classifier's ``feature_info``; None: every stage.
        weights: a cnnlab classification run folder or a weights file for the classifier; None: random init.
        in_channels: input image channels.
        norm_layer: None or ``"batchnorm"`` (trainable batch norm), ``"frozen_batchnorm"``, or another layer
            name or factory passed to the classifier.
        uniform_dilation: every conv of a dilated stage at that stage's rate (``stride / output_stride``), as
            smp's encoders (``make_dilated``); False: the first block of a dilated stage keeps the previous
            rate, as torchvision's ``replace_stride_with_dilation`` and cnnlab's ResNets.
    """
    from cnnlab.detection.backbone import build_backbone
    from cnnlab.models.registry import model_info

    info = model_info(name)
    if info.task != "classification":
        raise CnnlabError(f"backbone={name!r} is a {info.task} model; an encoder must be a registered classifier "
                          "(cnnlab.list_models(task='classification'))")
    if output_stride not in OUTPUT_STRIDES:
        raise CnnlabError(f"output_stride must be one of {OUTPUT_STRIDES} (the encoder's total stride), "
                          f"got {output_stride!r}")
    options = {"output_stride": output_stride} if output_stride != 32 else {}
    feature_info = stage_table(name, output_stride=output_stride, in_channels=in_channels)
    if not feature_info:
        raise CnnlabError(f"backbone={name!r} lists no feature_info stages, so it cannot serve as an encoder")
    if options and max(f.stride for f in feature_info) != output_stride:
        raise CnnlabError(f"backbone={name!r} built with output_stride={output_stride} still has stages of strides "
                          f"{[f.stride for f in feature_info]}; it does not dilate as asked")
    indices = list(range(len(feature_info))) if stages is None else list(stages)
    if not indices or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(feature_info)
                          for i in indices) or sorted(set(indices)) != indices:
        raise CnnlabError(f"stages={stages!r}: expected increasing indices in 0..{len(feature_info) - 1} of "
                          f"{name}'s stages [{_stage_list(feature_info)}]")
    if norm_layer is None:
        norm_layer = "batchnorm"
    backbone = build_backbone(name, fpn=False, returned_stages=[indices[-1]], weights=weights,
                              trainable_layers=len(feature_info), norm_layer=norm_layer, in_channels=in_channels,
                              model_options=options)
    if uniform_dilation and options:
        _dilate_uniformly(backbone.body, stage_table(name, in_channels=in_channels), output_stride)
    return Encoder(backbone.body, [feature_info[i] for i in indices], output_stride)


def _dilate_uniformly(body: nn.Module, nominal: Sequence[FeatureInfo], output_stride: int) -> None:
    """Set every KxK conv of each stage whose undilated stride exceeds ``output_stride`` to dilation
    ``stride // output_stride`` (same padding): smp's ``replace_strides_with_dilation``."""
    for stage in nominal:
        if stage.stride <= output_stride:
            continue
        rate = stage.stride // output_stride
        try:
            module = body.get_submodule(stage.module)
        except AttributeError:
            continue  # a stage after the last one returned: dropped
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d) and max(conv.kernel_size) > 1:
                conv.stride = (1, 1)
                conv.dilation = (rate, rate)
                conv.padding = ((conv.kernel_size[0] // 2) * rate, (conv.kernel_size[1] // 2) * rate)


def find_stage(encoder_name: str, feature_info: Sequence[FeatureInfo], stride: int, *, model: str) -> int:
    """Index of the deepest stage of ``stride`` in ``feature_info``; a clear error when there is none."""
    found = [i for i, f in enumerate(feature_info) if f.stride == stride]
    if not found:
        raise CnnlabError(f"{model} needs a stage of stride {stride} from its encoder, but backbone={encoder_name!r} "
                          f"has [{_stage_list(feature_info)}]; choose a backbone with such a stage")
    return found[-1]


def stage_table(name: str, *, output_stride: int = 32, in_channels: int = 3) -> list[FeatureInfo]:
    """The ``feature_info`` of classifier ``name`` at ``output_stride``, built on the meta device (no memory)."""
    from cnnlab.models.registry import create_model

    options = {"output_stride": output_stride} if output_stride != 32 else {}
    try:
        with torch.device("meta"):
            return list(getattr(create_model(name, in_channels=in_channels, **options), "feature_info", []))
    except CnnlabError as e:
        if options and "output_stride" in str(e):
            raise CnnlabError(f"backbone={name!r} cannot be dilated (its builder takes no output_stride), so it "
                              f"cannot run at output_stride={output_stride}; use output_stride=32 or a dilatable "
                              "backbone such as resnet18, resnet50") from None
        raise


# -- smp's encoder keys ----------------------------------------------------------------------------------------
SMP_ENCODER = "encoder."


def encoder_from_smp(state_dict: StateDict, prefix: str = "encoder") -> StateDict:
    """smp's ResNet encoder keys (``encoder.conv1.weight``, ``encoder.layer1.0.bn1.*``) -> cnnlab's encoder's
    (``<prefix>.body.stem.conv.weight``, ``<prefix>.body.layer1.0.residual.conv1.norm.*``).

    Only the ``encoder.*`` keys are read and returned; a key no torchvision ResNet has raises KeyError.
    """
    from cnnlab.models.resnet import from_torchvision

    body = from_torchvision({k[len(SMP_ENCODER):]: v for k, v in state_dict.items() if k.startswith(SMP_ENCODER)})
    return {f"{prefix}.body.{k}": v for k, v in body.items()}
