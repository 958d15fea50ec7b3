"""Collates for images of different sizes, through a multi-worker DataLoader, and batch_to_device."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from cnnlab._errors import CnnlabError
from cnnlab.data.annotated import CocoDetection, SegmentationFolder, VOCDetection
from cnnlab.data.collate import SegmentationCollate, batch_to_device, collate_detection, collate_segmentation
from cnnlab.data.joint_transforms import JointAugment, detection_transforms, segmentation_transforms
from tests.data._annotated_files import write_coco, write_voc, write_vocseg


def _plain(t) -> bool:
    return type(t) is torch.Tensor


@pytest.mark.parametrize("kind", ["coco", "voc"])
def test_detection_loader_with_two_workers(tmp_path, kind):
    transforms = detection_transforms(JointAugment(hflip=0.5))
    if kind == "coco":
        ds = CocoDetection(write_coco(tmp_path), transforms=transforms)
    else:
        ds = VOCDetection(write_voc(tmp_path), transforms=transforms)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_detection, shuffle=False)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [2, 1]
    images = [im for b, _ in batches for im in b]
    targets = [t for _, b in batches for t in b]
    assert [tuple(im.shape) for im in images] == [(3, 20, 40), (3, 32, 24), (3, 30, 30)]  # sizes untouched
    assert all(_plain(im) and im.dtype == torch.float32 for im in images)
    assert all(_plain(t["boxes"]) and t["boxes"].dtype == torch.float32 for t in targets)
    assert [t["boxes"].shape[0] for t in targets] == [2, 1, 0]  # the empty image is batched too
    assert [t["labels"].dtype for t in targets] == [torch.int64] * 3
    assert [t["image_id"] for t in targets] == ([10, 11, 12] if kind == "coco" else ["a", "b", "c"])


def test_segmentation_loader_pads_with_ignore_index(tmp_path):
    ds = SegmentationFolder(write_vocseg(tmp_path), transforms=segmentation_transforms(train=False))
    collate = SegmentationCollate(ignore_index=255, size_divisor=8)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    images, masks = next(iter(loader))
    # largest H is 32, largest W 40; both already multiples of 8
    assert images.shape == (3, 3, 32, 40) and masks.shape == (3, 32, 40)
    assert masks.dtype == torch.int64 and _plain(images) and _plain(masks)
    assert (masks[0, 20:] == 255).all() and (images[0, :, 20:] == 0).all()  # a.png is 20 tall
    assert (masks[1, :, 24:] == 255).all()  # b.png is 24 wide
    assert torch.equal(images[1, :, :32, :24], ds[1][0].as_subclass(torch.Tensor))


def test_segmentation_collate_size_divisor_and_lists(tmp_path):
    ds = SegmentationFolder(write_vocseg(tmp_path), transforms=segmentation_transforms(train=False))
    items = [ds[0], ds[2]]  # 20 x 40 and 30 x 30
    images, masks = SegmentationCollate(size_divisor=32)(items)
    assert images.shape == (2, 3, 32, 64) and masks.shape == (2, 32, 64)
    images, masks = SegmentationCollate(stack=False)(items)
    assert [tuple(m.shape) for m in masks] == [(20, 40), (30, 30)] and all(_plain(m) for m in masks)
    images, masks = collate_segmentation(items)
    assert images.shape == (2, 3, 30, 40)
    with pytest.raises(CnnlabError, match="size_divisor must be a positive integer"):
        SegmentationCollate(size_divisor=0)
    with pytest.raises(CnnlabError, match=r"a mask of size \(20, 40\) came with an image of size \(30, 30\)"):
        collate_segmentation([(items[1][0], items[0][1])])
    with pytest.raises(CnnlabError, match="empty batch"):
        collate_detection([])


def test_batch_to_device_keeps_the_structure():
    batch = ([torch.zeros(3, 4, 5)], [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64),
                                       "image_id": "x"}])
    moved = batch_to_device(batch, "meta")
    assert isinstance(moved, tuple) and isinstance(moved[0], list)
    assert moved[0][0].device.type == "meta" and moved[1][0]["boxes"].device.type == "meta"
    assert moved[1][0]["labels"].dtype == torch.int64 and moved[1][0]["image_id"] == "x"
    images, masks = batch_to_device((torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64)), "cpu")
    assert images.shape == (2, 3, 4, 4) and masks.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for pinned, non-blocking copies")
def test_batch_to_cuda_from_a_pinned_loader(tmp_path):
    ds = CocoDetection(write_coco(tmp_path), transforms=detection_transforms(train=False))
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_detection, pin_memory=True)
    images, targets = batch_to_device(next(iter(loader)), "cuda")
    assert all(im.is_cuda for im in images) and all(t["boxes"].is_cuda for t in targets)
    torch.cuda.synchronize()
    assert targets[0]["boxes"].cpu().tolist() == [[5, 2, 15, 10], [20, 4, 26, 10]]


def test_datasets_pipelines_and_collates_pickle_for_spawned_workers(tmp_path):
    """spawn (macOS, Windows, CUDA users) pickles the dataset and collate into each worker."""
    import pickle

    ds = CocoDetection(write_coco(tmp_path), transforms=detection_transforms(JointAugment(iou_crop=True)))
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == 3 and clone[0][1]["boxes"].shape[1] == 4
    assert pickle.loads(pickle.dumps(SegmentationCollate(size_divisor=8))).size_divisor == 8
