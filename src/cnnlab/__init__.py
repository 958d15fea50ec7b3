"""cnnlab: the landmark convolutional networks, built from shared blocks.

    >>> import cnnlab
    >>> model = cnnlab.create_model("resnet50", num_classes=10)
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from cnnlab._errors import CnnlabError

if TYPE_CHECKING:
    from cnnlab.analysis import summary
    from cnnlab.models import create_model, list_models, load_weights, model_info

__version__ = "0.2.0"
__all__ = ["CnnlabError", "create_model", "list_models", "load_weights", "model_info", "summary", "__version__"]

# Loaded on first use (PEP 562), not at `import cnnlab`: the models import torch (seconds), and every
# `cnnlab.x` import runs this file first, so `cnnlab --help` would pay for torch too.
_LAZY = {"summary": "cnnlab.analysis", "create_model": "cnnlab.models", "list_models": "cnnlab.models",
         "load_weights": "cnnlab.models", "model_info": "cnnlab.models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"cnnlab.{name}") is not None:
        value = importlib.import_module(f"cnnlab.{name}")  # `import cnnlab; cnnlab.models.X` as before
    else:
        raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
