"""The catalog of registered models: ``Family``, ``ModelInfo``, ``register_model``, ``list_models``, ``model_info``.

Split from ``registry`` (which builds models, ``create_model``) so that ``weights`` can look a
model's converters up without importing the builder that calls it: no import cycle.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from cnnlab._errors import CnnlabError, did_you_mean

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
