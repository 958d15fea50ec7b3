"""The model registry: ``register_model``, ``create_model``, ``list_models``, ``model_info``.

The catalog itself (``Family``, ``ModelInfo`` and the lookups) lives in ``catalog``; it is
re-exported here, where every family imports it from.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab.layers import get_act_layer, get_norm_layer
from cnnlab.models.catalog import (  # noqa: F401  (re-exported: families import them from here)
    Converter,
    Family,
    ModelInfo,
    StateDict,
    list_models,
    model_info,
    register_model,
)
from cnnlab.models.weights import apply_weights


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
    if weights is not None:
        # pretrained heads (a classifier's fc, a detector's box predictor) are the source's; replaced below
        overrides.pop("num_classes", None)
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
            if not hasattr(model, "reset_classifier"):
                raise CnnlabError(f"{name} cannot change its number of classes after loading weights "
                                  f"(the weights have {model.num_classes}, asked {num_classes})")
            model.reset_classifier(num_classes)
    return model


def overwrite_param(kwargs: dict[str, Any], name: str, value: Any) -> None:
    """Force ``kwargs[name] = value`` for a builder; a caller's conflicting value raises (never silently lost)."""
    if name in kwargs and kwargs[name] != value:
        raise CnnlabError(f"option {name}={kwargs[name]!r} conflicts with this variant, which needs {name}={value!r}")
    kwargs[name] = value
