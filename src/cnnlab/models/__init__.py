"""Classification networks. Each family module registers its variants on import."""
import importlib
import pkgutil

from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import (
    Family,
    ModelInfo,
    create_model,
    list_models,
    model_info,
    overwrite_param,
    register_model,
)
from cnnlab.models.weights import LoadResult, load_weights, read_state_dict

_INFRASTRUCTURE = {"base", "catalog", "registry", "weights"}
# Every other module of this package is a family; importing it registers its variants.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")
# The models of the other tasks (cnnlab.segmentation: autoencoders now) share this registry; importing them
# here means every lookup sees them all, whichever cnnlab module was imported first (`import cnnlab` is lazy).
importlib.import_module("cnnlab.segmentation")
importlib.import_module("cnnlab.detection")

__all__ = [
    "Classifier", "Family", "FeatureInfo", "LoadResult", "ModelInfo", "create_model", "list_models",
    "load_weights", "model_info", "overwrite_param", "read_state_dict", "register_model",
]
