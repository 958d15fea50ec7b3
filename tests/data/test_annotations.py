"""COCO JSON, VOC XML and VOC segmentation readers: targets in torchvision's detection convention, checked
against the hand-written files of _annotated_files, and every bad input a CnnlabError naming the file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cnnlab._errors import CnnlabError
from cnnlab.data.annotated import CocoDetection, SegmentationFolder, VOCDetection
from cnnlab.data.annotations import VOC_CLASSES, read_coco
from tests.data._annotated_files import (
    COCO_ANNOTATIONS,
    class_mask,
    voc_xml,
    write_coco,
    write_voc,
    write_vocseg,
)


def test_coco_targets_follow_torchvision_convention(tmp_path):
    ds = CocoDetection(write_coco(tmp_path))
    assert len(ds) == 3 and ds.num_classes == 3
    # labels contiguous by increasing category id: id 3 (bag) -> 1, id 7 (shirt) -> 2
    assert ds.category_ids == [3, 7] and ds.classes == ["bag", "shirt"]
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 20, 40)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and boxes.canvas_size == (20, 40)
    # bbox [5, 2, 10, 8] -> [5, 2, 15, 10]; [20, 4, 6, 6] -> [20, 4, 26, 10]
    assert boxes.tolist() == [[5, 2, 15, 10], [20, 4, 26, 10]] and boxes.dtype == torch.float32
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 10
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["area"].tolist() == [70.0, 36.0]  # given; else w * h
    expected = np.array(Image.open(tmp_path / "images" / "a.png"))
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_coco_keeps_images_without_annotations(tmp_path):
    """vision#1598: an image with no boxes is an item with empty (0, 4) boxes, not dropped or an error."""
    _, target = CocoDetection(write_coco(tmp_path))[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["image_id"] == 12


def test_coco_masks_match_pycocotools_and_the_hand_count(tmp_path):
    pytest.importorskip("pycocotools")
    ds = CocoDetection(write_coco(tmp_path), masks=True)
    _, target = ds[0]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.shape == (2, 20, 40) and masks.dtype == torch.uint8
    # polygon rectangle (5, 2)-(15, 10): COCO's rasteriser paints x 5..14, y 2..9, 80 pixels = its area
    expected = torch.zeros(20, 40, dtype=torch.uint8)
    expected[2:10, 5:15] = 1
    assert torch.equal(masks[0], expected)
    # uncompressed RLE written by hand for x 20..25, y 4..9
    expected = torch.zeros(20, 40, dtype=torch.uint8)
    expected[4:10, 20:26] = 1
    assert torch.equal(masks[1], expected)
    assert ds[2][1]["masks"].shape == (0, 30, 30)


def test_voc_boxes_are_zero_based_and_difficult_is_kept(tmp_path):
    ds = VOCDetection(write_voc(tmp_path), split="train")
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 3  # <part><name>head</name> is no class
    image, target = ds[0]
    assert image.shape == (3, 20, 40) and target["image_id"] == "a"
    # VOC 1-based inclusive (6, 3, 15, 10) -> continuous (5, 2, 15, 10); (1, 1, 40, 20) is the whole image
    assert target["boxes"].tolist() == [[5, 2, 15, 10], [0, 0, 40, 20]]
    assert target["boxes"].canvas_size == (20, 40)
    assert target["labels"].tolist() == [2, 1]
    assert target["difficult"].tolist() == [False, True]
    assert ds[2][1]["boxes"].shape == (0, 4)
    assert len(VOCDetection(tmp_path, split="val")) == 1 and len(VOCDetection(tmp_path, split=None)) == 3


def test_voc_with_the_20_voc_classes(tmp_path):
    ds = VOCDetection(write_voc(tmp_path), classes=VOC_CLASSES)
    assert ds.num_classes == 21
    assert ds[0][1]["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("cat") + 1]


def test_segmentation_folder_reads_palette_indices(tmp_path):
    ds = SegmentationFolder(write_vocseg(tmp_path), split="train", num_classes=3)
    assert len(ds) == 3
    for i, (w, h) in enumerate([(40, 20), (24, 32), (30, 30)]):
        image, target = ds[i]
        assert image.shape == (3, h, w)
        mask = target["mask"]
        assert isinstance(mask, tv_tensors.Mask) and mask.shape == (h, w)
        assert torch.equal(mask, torch.from_numpy(class_mask(w, h)))  # indices, not palette colours
    assert ds[0][1]["image_id"] == "a"
    pairs = SegmentationFolder(tmp_path, split=None)  # image/mask pairs by name, no split file
    assert len(pairs) == 3


# ---- bad input: each a CnnlabError naming the file and what is expected ----

def test_missing_image_is_named_at_construction(tmp_path):
    path = write_coco(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(CnnlabError, match=r"annotations\.json names image .*b\.png that does not exist"):
        CocoDetection(path)
    root = write_voc(tmp_path / "voc")
    (root / "JPEGImages" / "c.png").unlink()
    with pytest.raises(CnnlabError, match=r"c\.xml names image .*c\.png that does not exist"):
        VOCDetection(root)


@pytest.mark.parametrize("bbox, message", [
    ([35, 2, 10, 8], r"annotations\[0\] \(id 1\): box \[35.0, 2.0, 45.0, 10.0\] lies outside the 40x20 image"),
    ([5, 2, -3, 8], r"annotations\[0\] \(id 1\): bbox \[5, 2, -3, 8\] has a negative width"),
    ([5, 2, float("nan"), 8], r"annotations\[0\] \(id 1\): each bbox value must be a finite number"),
    ([5, 2, 8], r"'bbox' must be \[x, y, width, height\]"),
])
def test_coco_bad_boxes(tmp_path, bbox, message):
    ann = [dict(COCO_ANNOTATIONS[0], bbox=bbox)]
    with pytest.raises(CnnlabError, match=message) as info:
        read_coco(write_coco(tmp_path, annotations=ann))
    assert "annotations.json" in str(info.value)


def test_coco_box_within_a_pixel_of_the_border_is_clipped(tmp_path):
    ann = [dict(COCO_ANNOTATIONS[0], bbox=[30, 12, 10.01, 8.5])]  # x2 = 40.01, y2 = 20.5 on a 40 x 20 image
    parsed = read_coco(write_coco(tmp_path, annotations=ann))
    assert parsed.records[0].boxes == [[30.0, 12.0, 40.0, 20.0]]


def test_coco_unknown_category_and_image(tmp_path):
    ann = [dict(COCO_ANNOTATIONS[0], category_id=5)]
    with pytest.raises(CnnlabError, match=r"annotations\.json: annotations\[0\] \(id 1\): unknown category_id 5 "
                                          r"\(the file's categories are \[3, 7\]\)"):
        CocoDetection(write_coco(tmp_path, annotations=ann))
    ann = [dict(COCO_ANNOTATIONS[0], image_id=99)]
    with pytest.raises(CnnlabError, match=r"image_id 99 is not in 'images'"):
        CocoDetection(write_coco(tmp_path, annotations=ann))


def test_coco_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CnnlabError, match=r"bad\.json is not valid JSON"):
        read_coco(bad)
    with pytest.raises(CnnlabError, match=r"'categories' must be a list"):
        read_coco(write_coco(tmp_path, categories=None))
    with pytest.raises(CnnlabError, match=r"does not exist"):
        read_coco(tmp_path / "absent.json")


def test_coco_image_size_differs_from_the_json(tmp_path):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 50  # a.png is 40 wide
    path.write_text(json.dumps(data))
    with pytest.raises(CnnlabError, match=r"a\.png is 40x20 but .*annotations\.json says 50x20"):
        CocoDetection(path)[0]


def _voc_with(tmp_path, objects):
    root = write_voc(tmp_path)
    (root / "Annotations" / "a.xml").write_text(voc_xml("a.png", 40, 20, objects))
    return root


def test_voc_bad_boxes_and_classes(tmp_path):
    root = _voc_with(tmp_path, [("dog", (15, 3, 6, 10), 0)])
    with pytest.raises(CnnlabError, match=r"a\.xml: object 0 \(dog\): box .* has x2 < x1"):
        VOCDetection(root)
    root = _voc_with(tmp_path, [("dog", (6, 3, 45, 10), 0)])
    with pytest.raises(CnnlabError, match=r"a\.xml: object 0 \(dog\): box .* lies outside the 40x20 image"):
        VOCDetection(root)
    root = _voc_with(tmp_path, [("zebra", (6, 3, 15, 10), 0)])
    with pytest.raises(CnnlabError, match=r"a\.xml: object 0: unknown class 'zebra' \(expected one of"):
        VOCDetection(root, classes=VOC_CLASSES)
    (root / "Annotations" / "a.xml").write_text("<annotation><object>")
    with pytest.raises(CnnlabError, match=r"a\.xml is not valid XML"):
        VOCDetection(root, classes=VOC_CLASSES)


def test_voc_split_naming_a_missing_annotation(tmp_path):
    root = write_voc(tmp_path)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nzz\n")
    with pytest.raises(CnnlabError, match=r"train\.txt names annotation .*zz\.xml that does not exist"):
        VOCDetection(root)


def test_mask_of_another_size_is_refused(tmp_path):
    root = write_vocseg(tmp_path)
    Image.fromarray(np.zeros((21, 40), dtype=np.uint8), mode="L").save(root / "SegmentationClass" / "a.png")
    with pytest.raises(CnnlabError, match=r"mask .*a\.png is 40x21 but its image .*a\.png is 40x20"):
        SegmentationFolder(root)[0]


def test_mask_bad_values_and_rgb_masks_are_refused(tmp_path):
    root = write_vocseg(tmp_path)
    with pytest.raises(CnnlabError, match=r"a\.png holds values \[2\]; expected class indices 0\.\.1 or 255"):
        SegmentationFolder(root, num_classes=2)[0]
    Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8)).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(CnnlabError, match=r"a\.png is a RGB image; expected a palette \(P\) or greyscale"):
        SegmentationFolder(root)[0]


def test_segmentation_split_naming_a_missing_image(tmp_path):
    root = write_vocseg(tmp_path)
    (root / "JPEGImages" / "b.png").unlink()
    with pytest.raises(CnnlabError, match=r"train\.txt names image 'b' but .*JPEGImages has no b\."):
        SegmentationFolder(root)


def test_unreadable_image_names_the_file(tmp_path):
    path = write_coco(tmp_path)
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(CnnlabError, match=r"cannot read image .*a\.png"):
        CocoDetection(path)[0]


def test_voc_without_size_checks_boxes_against_the_image(tmp_path):
    root = write_voc(tmp_path)
    xml = voc_xml("a.png", 40, 20, [("dog", (6, 3, 45, 10), 0)]).replace(
        "<size><width>40</width><height>20</height><depth>3</depth></size>", "")
    (root / "Annotations" / "a.xml").write_text(xml)
    ds = VOCDetection(root)  # no <size>: the box can only be checked once the image is read
    with pytest.raises(CnnlabError, match=r"a\.xml: box .* lies outside the 40x20 image"):
        ds[0]
