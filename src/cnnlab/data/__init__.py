"""Datasets (named, downloadable, image folders), batched augmentation on tensors, preprocessing, loaders,
and the bundle of device batches a run trains on (``build_data(DataConfig(...), device)``)."""
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
from cnnlab.data.bundle import DataBundle, build_data
from cnnlab.data.config import DataConfig
from cnnlab.data.datasets import DATASETS, TensorDataset, load_dataset
from cnnlab.data.folder import ImageFolder, read_image
from cnnlab.data.loader import TensorLoader
from cnnlab.data.preprocess import Normalize, PCAWhiten
from cnnlab.data.samples import load_image_or_sample, sample_images
# detection and segmentation: images of any size with per-image targets (tv_tensors), DataLoader collates
from cnnlab.data.annotated import CocoDetection, SegmentationFolder, VOCDetection
from cnnlab.data.annotations import VOC_CLASSES
from cnnlab.data.collate import SegmentationCollate, batch_to_device, collate_detection, collate_segmentation
from cnnlab.data.joint_transforms import JointAugment, detection_transforms, segmentation_transforms
from cnnlab.data.segmentation_data import SegmentationBundle, build_segmentation_data

__all__ = [
    "DATASETS", "ColorJitter", "Compose", "CutMix", "Cutout", "DataBundle", "DataConfig", "ImageFolder",
    "LabelChangeWarning", "Mixup", "Normalize", "PCAWhiten", "RandomAffine", "RandomCrop", "RandomFlip",
    "RandomResizedCrop", "TensorDataset", "TensorLoader", "build_data", "load_dataset",
    "load_image_or_sample", "read_image", "sample_images",
]
__all__ += [
    "VOC_CLASSES", "CocoDetection", "JointAugment", "SegmentationCollate", "SegmentationFolder", "VOCDetection",
    "batch_to_device", "collate_detection", "collate_segmentation", "detection_transforms",
    "segmentation_transforms", "SegmentationBundle", "build_segmentation_data",
]
