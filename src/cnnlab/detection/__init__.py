"""Object detection: boxes, proposals, the R-CNN family, mAP.

Models follow torchvision's detection interface: ``model(images, targets)`` with a list of C x H x W
images in 0..1 (any sizes) returns a dict of losses in training and one dict of ``boxes``, ``labels``,
``scores`` per image in eval. Importing this package registers its models (``cnnlab models --task detection``).
"""
import importlib
import pkgutil

# Every module of this package whose name does not start with "_" is imported, so that the models it
# registers are in the registry whichever cnnlab module was imported first.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

from cnnlab.detection.metrics import DetectionMetrics, evaluate  # noqa: E402  (cnnlab.detection.evaluate)

__all__ = ["DetectionMetrics", "evaluate"]
