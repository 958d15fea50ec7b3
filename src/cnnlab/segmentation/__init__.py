"""Dense prediction: autoencoders (reconstruction) now; FCN, U-Net, PSPNet, DeepLab later.

Importing this package registers its models (``cnnlab models --task reconstruction``).
"""
from cnnlab.segmentation.autoencoder import AutoencoderStage, ConvAutoencoder, conv_autoencoder

__all__ = ["AutoencoderStage", "ConvAutoencoder", "conv_autoencoder"]
