"""Building a registered model for a run's data: options, transfer-learning weights, an input check."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError


def load_model_weights(model: nn.Module, weights: Any, name: str, default_head: str) -> None:
    """``model.weights=FILE`` into ``model``: every tensor must fit but the heads' (``model.head_names``, else
    ``model.head_name``: a segmenter's auxiliary classifier is class-dependent too), which may differ in size when
    the number of classes changed (fine-tuning on new classes)."""
    from cnnlab.models import load_weights

    result = load_weights(model, weights, strict=False)
    heads = tuple(getattr(model, "head_names", None) or (getattr(model, "head_name", default_head),))
    bad = [k for k in result.missing + result.unexpected + [m.split(":")[0] for m in result.mismatched]
           if not any(k == head or k.startswith(head + ".") for head in heads)]
    if bad:
        raise CnnlabError(f"model.weights={weights} does not fit {name}: {', '.join(bad[:8])}"
                          + (" ..." if len(bad) > 8 else ""))


def build_registered_model(config: Any, input_shape: tuple[int, ...], weights: str | None,
                           num_classes: int | None = None) -> nn.Module:
    """``create_model(config.model.name, ...)`` for images of ``input_shape`` (C, H, W).

    ``weights`` is ``"torchvision"``/``"timm"`` (pretrained, head replaced for ``num_classes``) or a
    weights file: everything but a classifier head of another size must fit (transfer learning).
    """
    from cnnlab.models import create_model

    from_file = weights is not None and weights not in ("torchvision", "timm")
    options = dict(config.model.options)
    data_name = config.data.name
    if num_classes is not None and options.pop("num_classes", num_classes) != num_classes:
        raise CnnlabError(f"model.options.num_classes={config.model.options['num_classes']} but data "
                          f"{data_name!r} has {num_classes} classes; leave it out (it comes from the data)")
    if options.pop("in_channels", input_shape[0]) != input_shape[0]:
        raise CnnlabError(f"model.options.in_channels={config.model.options['in_channels']} but data "
                          f"{data_name!r} has {input_shape[0]}-channel images")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    model = create_model(config.model.name, in_channels=input_shape[0], weights=None if from_file else weights,
                         **extra, **options)
    if from_file:
        load_model_weights(model, weights, config.model.name, default_head="fc")
    check = getattr(model, "check_input", None)
    if check is not None:
        try:
            with torch.device("meta"):
                check(torch.empty(1, *input_shape))
        except CnnlabError as e:
            raise CnnlabError(f"data {data_name!r} has images of shape {tuple(input_shape)}, which "
                              f"{config.model.name} cannot take: {e}; resize them with data.image_size") from None
    return model


def model_channels(config: Any) -> int | None:
    """The image channels the configured model takes (its ``in_channels`` option, else its default input's)."""
    from cnnlab.models import model_info

    if "in_channels" in config.model.options:
        return config.model.options["in_channels"]
    return model_info(config.model.name).default_input[0]


def rebuild_model(meta: dict[str, Any], options: dict[str, Any]) -> nn.Module:
    """A run's model, untrained, from its checkpoint metadata (model, task, classes, input shape) and
    ``config.model.options``: what ``cnnlab eval`` loads the weights into and report.html counts."""
    from cnnlab.engine.tasks import task_class
    from cnnlab.models import create_model

    options = {k: v for k, v in options.items() if k not in ("in_channels", "num_classes")}
    task = task_class(meta.get("task", "classification"))
    model_kwargs = getattr(task, "model_kwargs", None)  # a task whose models take other arguments (detection: K + 1)
    if model_kwargs is not None:
        return create_model(meta["model"], **model_kwargs(int(meta["num_classes"]), tuple(meta["input_shape"])),
                            **options)
    if task.model_takes_num_classes:  # runs before tasks: classifiers
        options["num_classes"] = meta["num_classes"]
    return create_model(meta["model"], in_channels=int(meta["input_shape"][0]), **options)
