"""transforms.v2 pipelines move boxes and masks with the image exactly (coordinates checked by hand), drop
degenerate boxes with every per-box field, and pad segmentation masks with the ignore index."""
from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from cnnlab._errors import CnnlabError
from cnnlab.data.annotated import CocoDetection, SegmentationFolder
from cnnlab.data.joint_transforms import JointAugment, detection_transforms, segmentation_transforms
from tests.data._annotated_files import write_coco, write_vocseg


def _item(height: int = 20, width: int = 40):
    """An image whose pixels inside the box (x 5..14, y 2..9) are 200, elsewhere 0, with a matching mask."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[:, 2:10, 5:15] = 200
    mask = torch.zeros(1, height, width, dtype=torch.uint8)
    mask[0, 2:10, 5:15] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes([[5.0, 2.0, 15.0, 10.0]], format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([3]),
        "masks": tv_tensors.Mask(mask),
        "image_id": 7,
    }
    return tv_tensors.Image(image), target


def test_flip_moves_box_and_mask_with_the_image():
    image, target = _item()
    out_image, out = detection_transforms(JointAugment(hflip=1.0))(image, target)
    # x -> W - x on a 40-wide image: [5, 15] -> [25, 35]; y unchanged
    assert out["boxes"].tolist() == [[25, 2, 35, 10]]
    assert out["boxes"].canvas_size == (20, 40)
    assert out_image.dtype == torch.float32 and out_image.max() == pytest.approx(200 / 255)
    lit = (out_image[0] > 0).nonzero()
    assert lit[:, 1].min() == 25 and lit[:, 1].max() == 34 and lit[:, 0].min() == 2 and lit[:, 0].max() == 9
    assert torch.equal(out["masks"][0].bool(), out_image[0] > 0)  # mask and image moved together
    assert out["labels"].tolist() == [3] and out["image_id"] == 7


def test_vertical_flip_moves_box_and_mask_with_the_image():
    image, target = _item()
    out_image, out = detection_transforms(JointAugment(hflip=0.0, vflip=1.0))(image, target)
    assert out["boxes"].tolist() == [[5, 10, 15, 18]]  # y -> H - y on a 20-high image: [2, 10] -> [10, 18]
    lit = (out_image[0] > 0).nonzero()
    assert lit[:, 0].min() == 10 and lit[:, 0].max() == 17 and lit[:, 1].min() == 5 and lit[:, 1].max() == 14
    assert torch.equal(out["masks"][0].bool(), out_image[0] > 0)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_scale_zooms_about_the_centre_and_keeps_the_canvas(factor):
    image, target = _item()  # box x 5..15, y 2..10 on 40 x 20; the centre is (20, 10)
    out_image, out = detection_transforms(JointAugment(hflip=0.0, scale=(factor, factor)))(image, target)
    assert out_image.shape == (3, 20, 40) and out["boxes"].canvas_size == (20, 40)
    expected = [20 + (5 - 20) * factor, 10 + (2 - 10) * factor, 20 + (15 - 20) * factor, 10 + (10 - 10) * factor]
    expected = [max(0.0, min(v, 40.0 if i % 2 == 0 else 20.0)) for i, v in enumerate(expected)]  # clamped
    assert out["boxes"].tolist() == [pytest.approx(expected)]
    lit = (out_image[0] > 0.5).nonzero()  # the bright pixels still fill the box, to the pixel the warp rounds to
    edges = [lit[:, 1].min(), lit[:, 0].min(), lit[:, 1].max() + 1, lit[:, 0].max() + 1]
    assert all(abs(float(e) - v) <= 0.5 for e, v in zip(edges, expected)), (edges, expected)
    _, seg = segmentation_transforms(JointAugment(hflip=0.0, scale=(factor, factor)))(
        image, {"mask": target["masks"]})  # a mask moves with it, padded with the ignore index
    assert torch.equal(seg["mask"][0] == 1, out_image[0] > 0.5)
    if factor < 1:
        assert seg["mask"][0, 0, 0] == 255


def test_resize_scales_box_and_mask_exactly():
    image, target = _item()
    out_image, out = detection_transforms(JointAugment(hflip=0.0, resize=(40, 80)), train=False)(image, target)
    assert out_image.shape == (3, 40, 80)
    assert out["boxes"].tolist() == [[10, 4, 30, 20]] and out["boxes"].canvas_size == (40, 80)
    expected = torch.zeros(40, 80, dtype=torch.uint8)
    expected[4:20, 10:30] = 1  # nearest neighbour at exactly 2x: every pixel doubles
    assert torch.equal(out["masks"][0], expected) and out["masks"].dtype == torch.uint8
    # shorter side 10 on 20 x 40 -> 10 x 20, box halves
    _, out = detection_transforms(JointAugment(resize=10), train=False)(*_item())
    assert out["boxes"].tolist() == [[2.5, 1, 7.5, 5]]


def test_degenerate_boxes_are_dropped_with_their_fields():
    image = tv_tensors.Image(torch.zeros(3, 20, 40, dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes([[5, 2, 15, 10], [8, 8, 8, 12], [1, 1, 30, 1.5]], format="XYXY",
                                          canvas_size=(20, 40)),
        "labels": torch.tensor([1, 2, 3]),
        "iscrowd": torch.tensor([0, 1, 0]),
        "area": torch.tensor([80.0, 0.0, 14.5]),
        "masks": tv_tensors.Mask(torch.stack([torch.full((20, 40), k, dtype=torch.uint8) for k in range(3)])),
        "image_id": 1,
    }
    _, out = detection_transforms(JointAugment(hflip=0.0))(image, target)
    # box 1 has zero width, box 2 is 0.5 px tall (< min_box_size 1): both go, with label, iscrowd, area, mask
    assert out["boxes"].tolist() == [[5, 2, 15, 10]]
    assert out["labels"].tolist() == [1] and out["iscrowd"].tolist() == [0] and out["area"].tolist() == [80.0]
    assert out["masks"].shape == (1, 20, 40) and out["masks"].unique().tolist() == [0]
    # evaluation never drops ground truth
    _, kept = detection_transforms(JointAugment(hflip=0.0), train=False)(image, target)
    assert kept["boxes"].shape == (3, 4)


def test_ssd_style_pipeline_keeps_targets_consistent(tmp_path):
    cfg = JointAugment(photometric=1.0, zoom_out=1.0, iou_crop=True, random_resize=(16, 48))
    ds = CocoDetection(write_coco(tmp_path), transforms=detection_transforms(cfg), masks=True)
    torch.manual_seed(0)
    for _ in range(5):
        for i in range(len(ds)):
            image, target = ds[i]
            h, w = image.shape[-2:]
            boxes = target["boxes"]
            assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
            assert boxes.canvas_size == (h, w)
            n = boxes.shape[0]
            assert target["labels"].shape == target["iscrowd"].shape == target["area"].shape == (n,)
            assert target["masks"].shape == (n, h, w)
            if n:
                assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
                assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()


def test_segmentation_crop_pads_the_mask_with_the_ignore_index(tmp_path):
    root = write_vocseg(tmp_path)
    plain_image, plain = SegmentationFolder(root)[0]  # a.png: 20 x 40
    ds = SegmentationFolder(root, transforms=segmentation_transforms(JointAugment(hflip=1.0, crop=(24, 48))))
    torch.manual_seed(0)
    image, target = ds[0]
    mask = target["mask"]
    assert image.shape == (3, 24, 48) and mask.shape == (24, 48)
    # the flipped 20 x 40 original sits at one offset of the padded canvas; everything around it is padding
    flipped_mask, flipped_image = plain["mask"].flip(-1), plain_image.flip(-1)
    image = (image * 255).round().to(torch.uint8)  # back to the file's values (ToDtype scales by 1/255)
    offsets = [(dy, dx) for dy in range(5) for dx in range(9)
               if torch.equal(mask[dy:dy + 20, dx:dx + 40], flipped_mask)
               and torch.equal(image[:, dy:dy + 20, dx:dx + 40], flipped_image)]
    assert len(offsets) == 1
    dy, dx = offsets[0]
    outside = torch.ones(24, 48, dtype=torch.bool)
    outside[dy:dy + 20, dx:dx + 40] = False
    assert (mask[outside] == 255).all() and (image[:, outside] == 0).all()
    # hand check of the flip: class 1 was the left quarter (x < 10), now x 30..39 of the window
    assert (flipped_mask[1:, 30:40] == 1).all() and (flipped_mask[10:, :20] == 2).all()


def test_segmentation_resize_uses_nearest_labels(tmp_path):
    ds = SegmentationFolder(write_vocseg(tmp_path), transforms=segmentation_transforms(
        JointAugment(resize=(50, 70)), train=False))
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 50, 70) and target["mask"].shape == (50, 70)
        assert set(target["mask"].unique().tolist()) <= {0, 1, 2, 255}  # no blended labels


@pytest.mark.parametrize("values, message", [
    ({"hflip": 1.5}, r"augment\.hflip must be a probability in \[0, 1\]"),
    ({"resize": -3}, r"augment\.resize must be a positive shorter side"),
    ({"random_resize": [40, 20]}, r"augment\.random_resize must be \(min, max\)"),
    ({"crop": [10]}, r"augment\.crop must be \(H, W\)"),
    ({"vflip": True}, r"augment\.vflip must be a probability"),
    ({"scale": [1.2, 0.8]}, r"augment\.scale must be \(lo, hi\) zoom factors"),
    ({"min_box_size": 0}, r"augment\.min_box_size must be >= 1"),
    ({"max_size": 100}, r"augment\.max_size .* needs an integer resize"),
    ({"hlfip": 0.5}, r"unknown augment option 'hlfip'; did you mean hflip"),
])
def test_bad_config_values(values, message):
    with pytest.raises(CnnlabError, match=message):
        JointAugment.from_mapping(values)


def test_iou_crop_is_detection_only():
    assert JointAugment.from_mapping({"crop": [8, 8], "resize": 10}).crop == (8, 8)
    with pytest.raises(CnnlabError, match=r"iou_crop .* detection only"):
        segmentation_transforms(JointAugment(iou_crop=True))
