"""Detection batches split over torchrun ranks: disjoint shards that together cover the epoch."""
from __future__ import annotations

import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.data.detection_data import DetectionBatches, TensorDetectionBatches
from cnnlab.engine.distributed import shard_batches


def _tensor_batches(n: int, batch_size: int) -> TensorDetectionBatches:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 8, 8).contiguous()  # canvas i is all i
    boxes = torch.tensor([[1.0, 1.0, 5.0, 6.0]]).repeat(n, 1)
    labels = torch.arange(n) % 3 + 1
    return TensorDetectionBatches(images, boxes, labels, torch.arange(n + 1), batch_size, shuffle=True, hflip=0.5,
                                  device=torch.device("cpu"), seed=3)


def _ids(batches) -> list[int]:
    return [t["image_id"] for _, targets in batches for t in targets]


@pytest.mark.parametrize("n", [12, 13])
def test_tensor_detection_shards_are_disjoint_and_cover_the_epoch(n):
    whole = _tensor_batches(n, 4)
    shards = [shard_batches(whole, rank, 2) for rank in range(2)]
    for epoch in (0, 1):
        for s in shards:
            s.set_epoch(epoch)
        ids = [_ids(s) for s in shards]
        assert len(ids[0]) == len(ids[1]) == -(-n // 2)
        assert set(ids[0]) | set(ids[1]) == set(range(n))
        assert len(set(ids[0]) & set(ids[1])) == 2 * -(-n // 2) - n  # only the padding repeats
        assert all(len(images) <= 2 for images, _ in shards[0])  # the global batch of 4, 2 per rank
        whole.set_epoch(epoch)
        flipped = {t["image_id"]: t["boxes"][0, 0].item() for _, ts in whole for t in ts}
        for s in shards:  # the same flips as one process draws for that canvas
            for _, ts in s:
                assert all(t["boxes"][0, 0].item() == flipped[t["image_id"]] for t in ts)


class _Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                                      "image_id": i}


def test_loader_detection_shards_use_a_distributed_sampler():
    whole = DetectionBatches(_Items(), batch_size=4, shuffle=True, num_workers=0, device=torch.device("cpu"), seed=0)
    shards = [shard_batches(whole, rank, 2) for rank in range(2)]
    for epoch in (0, 1):
        for s in shards:
            s.set_epoch(epoch)
        ids = [_ids(s) for s in shards]
        assert sorted(ids[0] + ids[1]) == list(range(10))
        assert len(shards[0]) == 3  # 5 images per rank, 2 per step
    shards[0].set_epoch(0)
    first = _ids(shards[0])
    shards[0].set_epoch(1)
    assert _ids(shards[0]) != first  # reshuffled per epoch


def test_a_global_batch_that_does_not_divide_is_an_error():
    with pytest.raises(CnnlabError, match="multiple of 2"):
        shard_batches(_tensor_batches(6, 3), 0, 2)
