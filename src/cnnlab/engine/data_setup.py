"""Kept for existing imports: building a run's data is the data layer's job (:mod:`cnnlab.data.bundle`)."""
from cnnlab.data.bundle import (
    ORIENTATION_SENSITIVE,
    DataBundle,
    DeviceBatches,
    FolderBatches,
    build_augment,
    build_data,
    fit_preprocess,
    preprocess_from_state,
    resize_images,
    split_validation,
    stratified_subset,
)
from cnnlab.data.config import DataConfig

_FolderBatches = FolderBatches  # the old private name

__all__ = [
    "ORIENTATION_SENSITIVE", "DataBundle", "DataConfig", "DeviceBatches", "FolderBatches", "build_augment", "build_data",
    "fit_preprocess", "preprocess_from_state", "resize_images", "split_validation", "stratified_subset",
]
