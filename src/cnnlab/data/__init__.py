"""Datasets (named, downloadable, image folders), batched augmentation on tensors, preprocessing, loaders."""
from cnnlab.data.augment import (
    ColorJitter,
    Compose,
    CutMix,
    Cutout,
    LabelChangeWarning,
    Mixup,
    RandomAffine,
    RandomCrop,
    RandomFlip,
    RandomResizedCrop,
)
from cnnlab.data.datasets import DATASETS, TensorDataset, load_dataset
from cnnlab.data.folder import ImageFolder, read_image
from cnnlab.data.loader import TensorLoader
from cnnlab.data.preprocess import Normalize, PCAWhiten
from cnnlab.data.samples import load_image_or_sample, sample_images

__all__ = [
    "DATASETS", "ColorJitter", "Compose", "CutMix", "Cutout", "ImageFolder", "LabelChangeWarning", "Mixup", "Normalize",
    "PCAWhiten", "RandomAffine", "RandomCrop", "RandomFlip", "RandomResizedCrop", "TensorDataset", "TensorLoader",
    "load_dataset", "load_image_or_sample", "read_image", "sample_images",
]
