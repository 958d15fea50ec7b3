"""The model registry: ``register_model``, ``create_model``, ``list_models``, ``model_info``."""
from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab.layers import get_act_layer, get_norm_layer

StateDict = dict[str, torch.Tensor]
Converter = Callable[[StateDict], StateDict]


@dataclass(frozen=True)
class Family:
    """What all variants of one architecture share: its paper and its checkpoint converters.

    ``converters`` maps a source library (``"torchvision"``, ``"timm"``) to a function that
    turns a state_dict in that library's layout into cnnlab's layout.
    """

    name: str
    paper: str
    year: int
    url: str = ""
    converters: Mapping[str, Converter] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ModelInfo:
    """A registered model: its builder and what a user wants to know before building it."""

    name: str
    family: Family
    builder: Callable[..., nn.Module]
    default_input: tuple[int, int, int] = (3, 224, 224)
    task: str = "classification"
    pretrained: Mapping[str, str] = field(default_factory=dict)  # source library -> that library's model name
    notes: str = ""
    converters: Mapping[str, Converter] = field(default_factory=dict)  # overrides the family's, per variant

    @property
    def paper(self) -> str:
        return self.family.paper

    @property
    def year(self) -> int:
        return self.family.year

    def converter(self, source: str) -> Converter | None:
        return self.converters.get(source) or self.family.converters.get(source)

    @cached_property
    def num_params(self) -> int:
        """Parameter count at the builder's defaults (1000 classes, 3 channels), counted on the meta device."""
        with torch.device("meta"):
            model = self.builder()
        return sum(p.numel() for p in model.parameters())


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    family: Family,
    *,
    default_input: tuple[int, int, int] = (3, 224, 224),
    task: str = "classification",
    pretrained: Mapping[str, str] | None = None,
    notes: str = "",
    converters: Mapping[str, Converter] | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model builder under its function name (or ``name``)."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise CnnlabError(f"model {key!r} is registered twice ({_REGISTRY[key].builder.__module__} and {builder.__module__})")
        _REGISTRY[key] = ModelInfo(
            name=key,
            family=family,
            builder=builder,
            default_input=default_input,
            task=task,
            pretrained=dict(pretrained or {}),
            notes=notes,
            converters=dict(converters or {}),
        )
        return builder

    return decorator


def list_models(pattern: str | None = None, task: str | None = None) -> list[str]:
    """Registered model names, sorted, filtered by a shell-style ``pattern`` and a ``task``."""
    names = sorted(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if task:
        names = [n for n in names if _REGISTRY[n].task == task]
    return names


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; an unknown name raises with the closest names."""
    if not isinstance(name, str):
        raise CnnlabError(f"a model name must be a string such as 'resnet18' (`cnnlab models` lists them), "
                          f"got {type(name).__name__}")
    if name not in _REGISTRY:
        raise CnnlabError(f"unknown model {name!r}{did_you_mean(name, _REGISTRY)} (`cnnlab models` lists them all)")
    return _REGISTRY[name]


def _accepted_options(builder: Callable[..., nn.Module]) -> list[str]:
    """Keyword options a builder takes: its own, plus the model class's when it forwards **kwargs."""
    options = []
    sig = inspect.signature(builder)
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            ret = sig.return_annotation
            cls = ret if isinstance(ret, type) else None
            if cls is None and isinstance(ret, str):
                cls = inspect.getmodule(builder).__dict__.get(ret)  # type: ignore[union-attr]
            if isinstance(cls, type):
                options += [q for q in inspect.signature(cls.__init__).parameters if q not in ("self", "args", "kwargs")]
        elif p.name not in ("self",):
            options.append(p.name)
    return sorted(set(options))


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    weights: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: a registry name (``cnnlab.list_models()``).
        num_classes: outputs of the classifier; None keeps the model's own (1000 for ImageNet networks).
        in_channels: channels of the input images; None keeps the model's own (``default_input[0]``).
        weights: ``None`` (random init), ``"torchvision"`` or ``"timm"`` (that library's pretrained
            weights, downloaded through its own mechanism and converted), or a file path
            (safetensors or a torch file, in cnnlab's or the source library's layout).
        **overrides: architecture options of that family (``zero_init_residual=True``, ``width_mult=0.5``, ...).
    """
    info = model_info(name)
    from cnnlab.models.weights import apply_weights  # local: weights imports this module

    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise CnnlabError(f"num_classes must be a non-negative int, got {num_classes!r}")
    if in_channels is not None and (not isinstance(in_channels, int) or in_channels < 1):
        raise CnnlabError(f"in_channels must be a positive int, got {in_channels!r}")
    if in_channels is not None:
        overrides["in_channels"] = in_channels
    # layer names ("groupnorm", "silu") become factories here, once, whatever the family does with them
    if isinstance(overrides.get("norm_layer"), str):
        overrides["norm_layer"] = get_norm_layer(overrides["norm_layer"])
    if isinstance(overrides.get("act_layer"), str):
        overrides["act_layer"] = get_act_layer(overrides["act_layer"])
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if weights is not None and info.task == "classification":
        overrides.pop("num_classes", None)  # pretrained heads are the source's; replaced below when asked
    try:
        model = info.builder(**overrides)
    except CnnlabError:
        raise
    except (TypeError, ValueError) as e:
        if "unexpected keyword argument" not in str(e):
            # a value of the wrong type or range (drop_rate=2, drop_rate="abc") fails deep in torch
            given = {k: v for k, v in overrides.items() if k not in ("num_classes", "in_channels")}
            raise CnnlabError(f"{name} cannot be built with the options {given}: {e}") from None
        bad = str(e).split("'")[1] if "'" in str(e) else str(e)
        options = _accepted_options(info.builder)
        raise CnnlabError(
            f"{name} does not take the option {bad!r}{did_you_mean(bad, options)} "
            f"(it takes: {', '.join(options) or 'no options'})"
        ) from None
    model.model_name = name
    if weights is not None:
        apply_weights(model, info, weights)
        if num_classes is not None and num_classes != getattr(model, "num_classes", num_classes):
            model.reset_classifier(num_classes)
    return model


def overwrite_param(kwargs: dict[str, Any], name: str, value: Any) -> None:
    """Force ``kwargs[name] = value`` for a builder; a caller's conflicting value raises (never silently lost)."""
    if name in kwargs and kwargs[name] != value:
        raise CnnlabError(f"option {name}={kwargs[name]!r} conflicts with this variant, which needs {name}={value!r}")
    kwargs[name] = value
