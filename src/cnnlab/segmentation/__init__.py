"""Dense prediction: autoencoders (reconstruction) and segmentation (FCN, U-Net, PSPNet, DeepLab).

Importing this package registers its models (``cnnlab models --task segmentation``).
"""
import importlib
import pkgutil

# Every module of this package whose name does not start with "_" is imported, so that the models it
# registers are in the registry whichever cnnlab module was imported first.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

from cnnlab.segmentation.autoencoder import AutoencoderStage, ConvAutoencoder, conv_autoencoder  # noqa: E402
from cnnlab.segmentation.metrics import SegmentationMetrics  # noqa: E402

__all__ = ["AutoencoderStage", "ConvAutoencoder", "SegmentationMetrics", "conv_autoencoder"]
