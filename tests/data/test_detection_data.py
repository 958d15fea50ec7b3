"""build_detection_data: voc:/coco: splits (files, or the documented rule), batches on the device in the
detection interface, deterministic per-(seed, epoch) order and augmentation, fashion_det's tensor batches,
and bad input (degenerate boxes dropped with a warning, the rest CnnlabErrors naming file and field)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import cnnlab.data.datasets as D
import cnnlab.data.detection_data as DD
from cnnlab._errors import CnnlabError
from cnnlab.data.annotations import DegenerateBoxWarning
from cnnlab.data.config import DataConfig
from cnnlab.data.detection_data import build_detection_data, is_detection_data
from cnnlab.data.fashion_det import FashionDetConfig
from tests.data._annotated_files import voc_xml, write_coco, write_voc


def cfg(name: str, **kw) -> DataConfig:
    return DataConfig(name=name, **{"batch_size": 2, "eval_batch_size": 2, "num_workers": 0, **kw})


def ids(batches) -> list:
    return [t["image_id"] for _, targets in batches for t in targets]


def test_names_are_recognised():
    assert all(is_detection_data(n) for n in ("fashion_det", "trees", "voc:/x", "coco:/x/a.json"))
    assert not is_detection_data("fashion_mnist")
    with pytest.raises(CnnlabError, match="unknown detection data 'fashion'"):
        build_detection_data(cfg("fashion"), "cpu")


def test_voc_splits_from_imagesets_and_batches_in_the_detection_interface(tmp_path):
    root = write_voc(tmp_path / "voc")  # train.txt: a b c; val.txt: b; no test.txt -> test is val
    b = build_detection_data(cfg(f"voc:{root}"), torch.device("cpu"))
    assert b.classes == ["cat", "dog"] and b.input_shape == (3, 20, 40)
    assert len(b.train) == 1 and len(b.val) == 1 and len(b.test) == 1  # 3 images, batch 2, drop_last
    images, targets = next(iter(b.val))
    assert isinstance(images, list) and images[0].shape == (3, 32, 24) and images[0].dtype == torch.float32
    assert targets[0]["image_id"] == "b" and targets[0]["boxes"].tolist() == [[1, 1, 10, 30]]
    assert targets[0]["labels"].tolist() == [1] and targets[0]["boxes"].dtype == torch.float32
    assert ids(b.test) == ["b"]
    every = build_detection_data(cfg(f"voc:{root}", batch_size=1), "cpu")
    by_id = {t["image_id"]: t for _, ts in every.train for t in ts}
    assert by_id["a"]["boxes"].tolist() == [[5, 2, 15, 10], [0, 0, 40, 20]]  # VOC 1-based -> 0-based
    assert by_id["a"]["labels"].tolist() == [2, 1] and by_id["c"]["boxes"].shape == (0, 4)


def _many_voc(tmp_path, n=12):
    root = write_voc(tmp_path / "voc")
    shutil.rmtree(root / "ImageSets")
    for k in range(3, n):
        (root / "Annotations" / f"x{k:02d}.xml").write_text(
            voc_xml("a.png", 40, 20, [("dog", (6, 3, 15, 10), 0)]))
    return root


def test_voc_without_split_files_uses_the_rule_split(tmp_path):
    root = _many_voc(tmp_path)  # sorted stems: a b c x03 .. x11; i % 10 == 4 -> val (x04), == 9 -> test (x09)
    b = build_detection_data(cfg(f"voc:{root}", batch_size=1), "cpu")
    assert ids(b.val) == ["x04"] and ids(b.test) == ["x09"]
    assert sorted(ids(b.train)) == ["a", "b", "c", "x03", "x05", "x06", "x07", "x08", "x10", "x11"]
    for name in ("x04.xml", "x09.xml", "x10.xml", "x11.xml", "x08.xml", "x07.xml"):
        (root / "Annotations" / name).unlink()
    with pytest.raises(CnnlabError, match=r"6 images are too few for the rule split"):
        build_detection_data(cfg(f"voc:{root}"), "cpu")


def _coco_many(tmp_path, n=10, file_prefix="images/"):
    write_coco(tmp_path)
    data = {"images": [{"id": k, "file_name": f"{file_prefix}a.png", "width": 40, "height": 20} for k in range(n)],
            "annotations": [{"id": k, "image_id": k, "category_id": 1, "bbox": [1, 2, 3 + k, 4]} for k in range(n)],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "many.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_single_file_rule_split_and_images_folder(tmp_path):
    path = _coco_many(tmp_path, file_prefix="")  # file_name "a.png": found in images/ beside the JSON
    b = build_detection_data(cfg(f"coco:{path}", batch_size=1), "cpu")
    assert b.classes == ["thing"] and b.input_shape == (3, 20, 40)
    assert ids(b.val) == [4] and ids(b.test) == [9] and sorted(ids(b.train)) == [0, 1, 2, 3, 5, 6, 7, 8]
    _, targets = next(iter(b.val))
    assert targets[0]["boxes"].tolist() == [[1, 2, 8, 6]] and targets[0]["iscrowd"].tolist() == [0]


def test_coco_train_and_val_files_are_the_splits(tmp_path):
    path = write_coco(tmp_path)
    train = path.with_name("instances_train.json")
    path.rename(train)
    data = json.loads(train.read_text())
    data["images"], data["annotations"] = data["images"][:1], data["annotations"][:2]
    train.with_name("instances_val.json").write_text(json.dumps(data))
    b = build_detection_data(cfg(f"coco:{train}", batch_size=1), "cpu")
    assert sorted(ids(b.train)) == [10, 11, 12] and ids(b.val) == [10] and ids(b.test) == [10]
    assert b.classes == ["bag", "shirt"]
    data["categories"] = [{"id": 3, "name": "bag"}]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] == 3]
    train.with_name("instances_val.json").write_text(json.dumps(data))
    with pytest.raises(CnnlabError, match=r"instances_val\.json: categories \['bag'\] differ"):
        build_detection_data(cfg(f"coco:{train}"), "cpu")


def test_set_epoch_fixes_order_and_augmentation_whatever_the_workers(tmp_path):
    path = _coco_many(tmp_path, n=30)

    def epoch_batches(workers: int, epoch: int):
        b = build_detection_data(cfg(f"coco:{path}", batch_size=4, flip=True, num_workers=workers), "cpu", seed=3)
        b.train.set_epoch(epoch)
        return [(t["image_id"], t["boxes"].tolist(), float(im[0, 0, 0]))
                for images, targets in b.train for im, t in zip(images, targets)]

    e2 = epoch_batches(0, 2)
    assert e2 == epoch_batches(0, 2) == epoch_batches(2, 2)  # resume and worker count change nothing
    assert e2 != epoch_batches(0, 3)
    flipped = [boxes for _, boxes, _ in e2 if boxes[0][0] != 1]  # bbox x 1..(4 + k): flipped x1 = 40 - x2
    assert flipped and all(b[0][2] == 39 for b in flipped) and len(flipped) < len(e2)


def test_train_limit_and_batch_sizes(tmp_path):
    path = _coco_many(tmp_path, n=30)
    b = build_detection_data(cfg(f"coco:{path}", batch_size=4, eval_batch_size=3, train_limit=10), "cpu")
    assert len(b.train) == 2 and len(ids(b.train)) == 8  # 10 images, drop_last
    assert len(b.val) == 1 and len(ids(b.val)) == 3  # 3 val images (i % 10 == 4), not shuffled
    assert ids(b.val) == [4, 14, 24]


def test_classification_augmentations_are_refused(tmp_path):
    path = _coco_many(tmp_path)
    for bad in (dict(rotate=10.0), dict(mixup=0.2), dict(shear=5.0)):
        with pytest.raises(CnnlabError, match="do not apply to detection data"):
            build_detection_data(cfg(f"coco:{path}", **bad), "cpu")


def test_vflip_and_scale_move_the_boxes(tmp_path):
    path = _coco_many(tmp_path, n=30)  # 40 x 20 images; image k's box x 1..(4 + k), y 2..6 (see _coco_many)
    plain = build_detection_data(cfg(f"coco:{path}", batch_size=4), "cpu", seed=3)
    original = {t["image_id"]: t["boxes"].tolist() for _, ts in plain.train for t in ts}
    b = build_detection_data(cfg(f"coco:{path}", batch_size=4, vflip=True), "cpu", seed=3)
    moved = 0
    for _, targets in b.train:
        for t in targets:
            (x1, y1, x2, y2), = original[t["image_id"]]
            assert t["boxes"].tolist() in ([[x1, y1, x2, y2]], [[x1, 20 - y2, x2, 20 - y1]])
            moved += t["boxes"].tolist() != [[x1, y1, x2, y2]]
    assert 0 < moved < len(original)
    b = build_detection_data(cfg(f"coco:{path}", batch_size=4, scale=[0.5, 0.5]), "cpu", seed=3)
    for _, targets in b.train:
        for t in targets:
            (x1, y1, x2, y2), = original[t["image_id"]]
            assert t["boxes"].tolist() == [pytest.approx([20 + (x1 - 20) / 2, 10 + (y1 - 10) / 2,
                                                          20 + (x2 - 20) / 2, 10 + (y2 - 10) / 2])]


def test_degenerate_boxes_are_dropped_with_a_warning(tmp_path):
    many = _coco_many(tmp_path)  # a single file for the rule split; image 0's box made zero-height
    data = json.loads(many.read_text())
    data["annotations"][0]["bbox"] = [1, 2, 3, 0]
    many.write_text(json.dumps(data))
    with pytest.warns(DegenerateBoxWarning, match=r"many\.json: dropped 1 zero-area box\(es\).*image 0"):
        b = build_detection_data(cfg(f"coco:{many}", batch_size=1, train_limit=1), "cpu")
    _, targets = next(iter(b.train))
    assert targets[0]["image_id"] == 0 and targets[0]["boxes"].shape == (0, 4)
    assert targets[0]["iscrowd"].shape == (0,) and targets[0]["area"].shape == (0,)  # per-box fields go too
    # in evaluation too: the val image keeps its box, the dropped one is nowhere
    assert [t["boxes"].shape[0] for _, ts in b.val for t in ts] == [1]


def test_voc_one_pixel_box_is_kept_and_zero_area_after_reading_cannot_occur(tmp_path):
    root = write_voc(tmp_path / "voc", {"a": [("dog", (6, 3, 6, 10), 0)], "b": [("cat", (2, 2, 10, 30), 0)],
                                        "c": []})
    b = build_detection_data(cfg(f"voc:{root}", batch_size=1), "cpu")
    by_id = {t["image_id"]: t for _, ts in b.train for t in ts}
    assert by_id["a"]["boxes"].tolist() == [[5, 2, 6, 10]]  # xmin == xmax: one pixel wide, kept


@pytest.mark.parametrize("box, message", [
    ((15, 3, 6, 10), r"a\.xml: object 0 \(dog\): box .* has x2 < x1"),
    ((6, 3, 45, 10), r"a\.xml: object 0 \(dog\): box .* lies outside the 40x20 image"),
    (("nan", 3, 9, 10), r"a\.xml: object 0 \(dog\): <bndbox> values must be finite"),
    (("abc", 3, 9, 10), r"a\.xml: object 0 \(dog\): <bndbox> values must be numbers"),
])
def test_voc_bad_boxes_name_the_file_and_object(tmp_path, box, message):
    root = write_voc(tmp_path / "voc", {"a": [("dog", box, 0)], "b": [], "c": []})
    with pytest.raises(CnnlabError, match=message):
        build_detection_data(cfg(f"voc:{root}"), "cpu")


def test_bad_files_name_the_file(tmp_path):
    root = write_voc(tmp_path / "voc")
    (root / "JPEGImages" / "b.png").unlink()
    with pytest.raises(CnnlabError, match=r"b\.xml names image .*b\.png that does not exist"):
        build_detection_data(cfg(f"voc:{root}"), "cpu")
    (root / "Annotations" / "c.xml").write_text("<annotation><object><name>dog</name>")
    with pytest.raises(CnnlabError, match=r"c\.xml is not valid XML"):
        build_detection_data(cfg(f"voc:{root}"), "cpu")
    with pytest.raises(CnnlabError, match=r"no Annotations/ folder"):
        build_detection_data(cfg(f"voc:{tmp_path / 'nothing'}"), "cpu")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CnnlabError, match=r"bad\.json is not valid JSON"):
        build_detection_data(cfg(f"coco:{bad}"), "cpu")
    with pytest.raises(CnnlabError, match=r"coco:.*absent\.json does not exist"):
        build_detection_data(cfg(f"coco:{tmp_path / 'absent.json'}"), "cpu")
    many = _coco_many(tmp_path / "c")
    data = json.loads(many.read_text())
    data["annotations"][3]["bbox"] = [1, 2, float("nan"), 4]
    many.write_text(json.dumps(data))
    with pytest.raises(CnnlabError, match=r"many\.json: annotations\[3\] \(id 3\): each bbox value must be a finite"):
        build_detection_data(cfg(f"coco:{many}"), "cpu")
    data["annotations"][3]["bbox"] = [1, 2, 3, 4]
    data["images"][2]["file_name"] = "images/zz.png"
    many.write_text(json.dumps(data))
    with pytest.raises(CnnlabError, match=r"many\.json names image .*zz\.png that does not exist"):
        build_detection_data(cfg(f"coco:{many}"), "cpu")


def _fake_fashion(monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(400, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(100, 28, 28), dtype=np.uint8)
    train_y, test_y = torch.from_numpy(rng.integers(0, 10, 400)), torch.from_numpy(rng.integers(0, 10, 100))
    monkeypatch.setattr(D, "fashion_mnist", lambda root=None, download=True: D.TensorDataset(
        "fashion_mnist", D.FASHION_CLASSES, torch.from_numpy(train)[:, None], train_y, torch.from_numpy(test)[:, None],
        test_y))
    monkeypatch.setattr(DD, "FASHION_DET_CONFIG", FashionDetConfig(canvas=64, train=40, val=10, test=20,
                                                                   min_scale=12, max_scale=30))


def test_fashion_det_bundle_flips_images_and_boxes_together(tmp_path, monkeypatch):
    _fake_fashion(monkeypatch)
    b = build_detection_data(cfg("fashion_det", root=str(tmp_path), batch_size=8, eval_batch_size=16, flip=True),
                             "cpu", seed=1)
    assert b.classes == D.FASHION_CLASSES and b.input_shape == (3, 64, 64)
    assert (len(b.train), len(b.val), len(b.test)) == (5, 1, 2)
    assert ids(b.val) == list(range(10))
    b.train.set_epoch(4)
    first = [(t["image_id"], t["boxes"].tolist()) for _, ts in b.train for t in ts]
    b.train.set_epoch(4)
    assert first == [(t["image_id"], t["boxes"].tolist()) for _, ts in b.train for t in ts]
    train = b.train
    original = {i: train.boxes[train.offsets[i]:train.offsets[i + 1]] for i in range(len(train.images))}
    flipped = same = 0
    for images, targets in b.train:
        for im, t in zip(images, targets):
            assert im.shape == (3, 64, 64) and im.dtype == torch.float32 and torch.equal(im[0], im[1])
            lit = (im[0] > 0).nonzero()
            if len(t["boxes"]):  # the nonzero pixels span exactly the union of the boxes, flipped or not
                bx = t["boxes"]
                assert [int(lit[:, 1].min()), int(lit[:, 0].min()), int(lit[:, 1].max()) + 1,
                        int(lit[:, 0].max()) + 1] == [bx[:, 0].min(), bx[:, 1].min(), bx[:, 2].max(), bx[:, 3].max()]
            else:
                assert len(lit) == 0
            o = original[t["image_id"]]
            mirrored = torch.stack([64 - o[:, 2], o[:, 1], 64 - o[:, 0], o[:, 3]], 1)
            if torch.equal(t["boxes"], o):
                same += 1
            else:
                assert torch.equal(t["boxes"], mirrored)
                flipped += 1
    assert flipped > 5 and same > 5
    for extra in (dict(vflip=True), dict(jitter=0.2)):
        with pytest.raises(CnnlabError, match=r"do not apply to fashion_det .*use data\.flip and data\.scale"):
            build_detection_data(cfg("fashion_det", root=str(tmp_path), **extra), "cpu")
    limited = build_detection_data(cfg("fashion_det", root=str(tmp_path), batch_size=8, train_limit=20), "cpu")
    assert len(limited.train) == 2 and len(ids(limited.train)) == 16


def test_fashion_det_zoom_moves_boxes_with_the_pixels(tmp_path, monkeypatch):
    _fake_fashion(monkeypatch)
    plain = build_detection_data(cfg("fashion_det", root=str(tmp_path), batch_size=8, flip=True), "cpu", seed=1)
    zoomed = build_detection_data(cfg("fashion_det", root=str(tmp_path), batch_size=8, flip=True,
                                      scale=[0.6, 1.4]), "cpu", seed=1)
    assert plain.train.scale is None and zoomed.train.scale == (0.6, 1.4)
    assert zoomed.val.scale is None and zoomed.test.scale is None  # evaluation sees the canvases as they are
    zoomed.train.set_epoch(2)
    plain.train.set_epoch(2)
    factors = []
    for (zi, zt), (pi, pt) in zip(zoomed.train, plain.train):
        assert [t["image_id"] for t in zt] == [t["image_id"] for t in pt]  # the same order and flips as unzoomed
        for im, t, p in zip(zi, zt, pt):
            assert im.shape == (3, 64, 64) and torch.equal(im[0], im[1])
            if not len(p["boxes"]):
                continue
            union = torch.cat([p["boxes"][:, :2].min(0).values, p["boxes"][:, 2:].max(0).values])
            lit = (im[0] > 0.05).nonzero()
            if len(t["boxes"]) == len(p["boxes"]):  # nothing cropped away: the same items, scaled about the centre
                assert torch.equal(t["labels"], p["labels"])
                f = (t["boxes"][:, 2:] - t["boxes"][:, :2]) / (p["boxes"][:, 2:] - p["boxes"][:, :2])
                inside = (t["boxes"] > 0).all() and (t["boxes"] < 64).all()
                if inside:  # unclipped: one factor for every box, and the centre stays where it was
                    factors.append(f.mean().item())
                    assert torch.allclose(f, f.mean().expand_as(f), atol=1e-5)
                    moved = (union - 32) * f.mean() + 32
                    z = torch.cat([t["boxes"][:, :2].min(0).values, t["boxes"][:, 2:].max(0).values])
                    assert torch.allclose(z, moved, atol=1.0)  # centring at whole pixels: within half a pixel each
                    # the painted pixels span the zoomed boxes' union, up to the resampling kernel's reach: the
                    # bilinear kernel spans one source pixel (f output pixels when enlarging, one when shrinking
                    # with antialiasing), plus half a pixel where a box edge falls inside a pixel
                    span = torch.tensor([lit[:, 1].min(), lit[:, 0].min(), lit[:, 1].max() + 1, lit[:, 0].max() + 1])
                    assert (span - z).abs().max() <= max(f.mean().item(), 1.0) + 0.5
            assert ((t["boxes"][:, 2:] - t["boxes"][:, :2]) >= 1).all() and (t["boxes"] >= 0).all() \
                and (t["boxes"] <= 64).all()
    assert min(factors) < 0.9 and max(factors) > 1.1  # drawn in the range, both ways
    again = build_detection_data(cfg("fashion_det", root=str(tmp_path), batch_size=8, flip=True, scale=[0.6, 1.4]),
                                 "cpu", seed=1)
    again.train.set_epoch(2)
    zoomed.train.set_epoch(2)
    assert all(torch.equal(a, b) for (ai, _), (bi, _) in zip(again.train, zoomed.train) for a, b in zip(ai, bi))
