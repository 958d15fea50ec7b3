"""Batches from tensors that already sit on the training device, augmented a whole batch at a time."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from cnnlab.data.augment import BatchTransform

Preprocess = Callable[[torch.Tensor], torch.Tensor]


class TensorLoader:
    """Shuffle, slice, convert to float, augment and normalise batches of a uint8 image tensor.

    The order and the augmentation of epoch ``e`` depend only on ``(seed, e)``, so a run
    resumed at an epoch boundary sees exactly the batches an uninterrupted run would.

    Args:
        images: uint8 (N, C, H, W), on the device the batches should be on.
        labels: int64 (N,), same device.
        batch_size, shuffle, drop_last: as in torch's DataLoader.
        transform: batch augmentation applied to floats in [0, 1] (training only).
        preprocess: normalisation applied last (e.g. :class:`Normalize`).
        channels_last: hand out batches in NHWC memory format (faster convs on CPU and tensor cores).
        seed: base seed of the shuffling and augmentation generator.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, transform: BatchTransform | None = None, preprocess: Preprocess | None = None,
                 channels_last: bool = False, seed: int = 0) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.transform, self.preprocess = transform, preprocess
        self.channels_last, self.seed = channels_last, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.images)
        order = torch.randperm(n, generator=gen, device=device) if self.shuffle else None
        for i in range(len(self)):
            if order is None:
                x, y = self.images[i * self.batch_size:(i + 1) * self.batch_size], self.labels[i * self.batch_size:(i + 1) * self.batch_size]
            else:
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                x, y = self.images[idx], self.labels[idx]
            yield prepare_batch(x, y, self.transform, self.preprocess, self.channels_last, gen)


def prepare_batch(x: torch.Tensor, y: torch.Tensor, transform: BatchTransform | None, preprocess: Preprocess | None,
                  channels_last: bool, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 -> float in [0, 1], augmentation, normalisation, memory format: the one path every batch takes."""
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if transform is not None:
        x, y = transform(x, y, gen)
    if preprocess is not None:
        x = preprocess(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y
