"""Segmentation data: fashion_seg (on fake Fashion-MNIST), vocseg:/masks: folders the tests write, the batches'
shapes, dtypes, labels and normalisation, masks moving with flips and rescaling, and the bad-input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab.data.datasets as D
import cnnlab.data.fashion_seg as FS
from cnnlab._errors import CnnlabError
from cnnlab.data.bundle import build_data
from cnnlab.data.config import DataConfig, is_detection_data, is_segmentation_data
from cnnlab.data.fashion_det import FashionDetConfig, load_fashion_det
from cnnlab.data.preprocess import Normalize
from cnnlab.data.segmentation_data import (
    VOC_SEG_CLASSES,
    SegAugment,
    TensorSegmentationBatches,
    build_segmentation_data,
    fit_tensor_normalize,
    voc_palette,
)
from tests.data._annotated_files import IMAGES, class_mask, write_vocseg

SMALL = FashionDetConfig(canvas=64, train=40, val=10, test=20, min_scale=12, max_scale=30)


def cfg(name: str, **kw) -> DataConfig:
    return DataConfig(name=name, num_workers=0, **kw)


def unnormalise(x: torch.Tensor, state: dict) -> torch.Tensor:
    """A normalised batch back to [0, 1] with the bundle's recorded statistics."""
    mean = torch.tensor(state["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(state["std"]).view(1, -1, 1, 1)
    return x * std + mean


def test_names_are_recognised_and_refused_by_the_other_builders():
    for name in ("fashion_seg", "nuclei", "vocseg:/data/VOC2012", "masks:some/folder"):
        assert is_segmentation_data(name) and not is_detection_data(name)
    assert not is_segmentation_data("voc:/data/VOC2012") and not is_segmentation_data("fashion_det")
    with pytest.raises(CnnlabError, match="segmentation dataset.*--task segmentation"):
        build_data(cfg("masks:some/folder"), "cpu")
    with pytest.raises(CnnlabError, match="unknown segmentation data 'fashion'.*fashion_seg, nuclei"):
        build_segmentation_data(cfg("fashion"), "cpu")


def test_normalisation_from_histograms_equals_normalize_fit():
    images = torch.randint(0, 256, (7, 3, 9, 5), dtype=torch.uint8)
    ours, reference = fit_tensor_normalize("standard", images), Normalize.fit(images)
    np.testing.assert_allclose(ours.mean, reference.mean, rtol=1e-12)
    np.testing.assert_allclose(ours.std, reference.std, rtol=1e-9)
    assert fit_tensor_normalize("none", images) is None
    with pytest.raises(CnnlabError, match="normalize='pca' does not apply to segmentation"):
        fit_tensor_normalize("pca", images)


def test_semantic_masks_equal_fashion_dets_topmost_item_rule(tmp_path, monkeypatch):
    _fake_fashion(monkeypatch)
    composed = load_fashion_det(SMALL, root=tmp_path)["train"]
    masks = FS.semantic_masks(composed)
    overlapped = 0
    for i in range(len(composed)):  # oracle: fashion_det's own per-canvas rule (later item on top)
        np.testing.assert_array_equal(masks[i], composed.semantic_mask(i))
        overlapped += int((composed.instance_masks(i).sum(0) > 1).any())
    assert overlapped > 0  # the overlap rule was exercised


def _fake_fashion(monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(400, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(100, 28, 28), dtype=np.uint8)
    train_y, test_y = torch.from_numpy(rng.integers(0, 10, 400)), torch.from_numpy(rng.integers(0, 10, 100))
    monkeypatch.setattr(D, "fashion_mnist", lambda root=None, download=True: D.TensorDataset(
        "fashion_mnist", D.FASHION_CLASSES, torch.from_numpy(train)[:, None], train_y, torch.from_numpy(test)[:, None],
        test_y))
    monkeypatch.setattr(FS, "FASHION_SEG_CONFIG", SMALL)


def test_fashion_seg_bundle_shapes_labels_normalisation(tmp_path, monkeypatch):
    _fake_fashion(monkeypatch)
    b = build_segmentation_data(cfg("fashion_seg", root=str(tmp_path), batch_size=8, eval_batch_size=16), "cpu")
    assert b.classes == ["background", *D.FASHION_CLASSES] and b.num_classes == 11 and b.ignore_index == 255
    assert b.input_shape == (1, 64, 64) and (len(b.train), len(b.val), len(b.test)) == (5, 1, 2)
    splits = load_fashion_det(SMALL, root=tmp_path)
    raw_train = torch.from_numpy(splits["train"].images)[:, None]
    reference = Normalize.fit(raw_train)  # the classification normaliser, on the training canvases only
    assert b.preprocess_state["kind"] == "standard"
    np.testing.assert_allclose(b.preprocess_state["mean"], reference.mean, rtol=1e-9)
    np.testing.assert_allclose(b.preprocess_state["std"], reference.std, rtol=1e-9)
    assert torch.equal(b.test_images, torch.from_numpy(splits["test"].images)[:, None])
    test = list(b.test)  # in order: canvas i is the i-th item, its mask fashion_det's semantic mask
    images, masks = torch.cat([x for x, _ in test]), torch.cat([m for _, m in test])
    assert images.dtype == torch.float32 and images.shape == (20, 1, 64, 64)
    assert masks.dtype == torch.int64 and masks.shape == (20, 64, 64)
    for i in range(20):
        assert torch.equal(masks[i], torch.from_numpy(splits["test"].semantic_mask(i)).long())
    torch.testing.assert_close(unnormalise(images, b.preprocess_state), b.test_images.float() / 255,
                               atol=1e-6, rtol=0)
    assert set(masks.unique().tolist()) <= set(range(11)) and len(masks.unique()) > 3
    assert torch.equal(masks > 0, b.test_images[:, 0] > 0)  # background exactly where no item is painted
    limited = build_segmentation_data(cfg("fashion_seg", root=str(tmp_path), batch_size=8, train_limit=20), "cpu")
    assert len(limited.train) == 2 and len(limited.train.images) == 20
    small = build_segmentation_data(cfg("fashion_seg", root=str(tmp_path), image_size=32), "cpu")
    assert small.input_shape == (1, 32, 32) and small.test_images.shape == (20, 1, 32, 32)


def _match(x: torch.Tensor, m: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> str:
    """Which canvas an augmented item is, and whether flipped: image and mask must agree."""
    for j in range(len(images)):
        for kind, img, mask in (("same", images[j], masks[j]), ("flipped", images[j].flip(-1), masks[j].flip(-1))):
            if torch.equal(x, img):
                assert torch.equal(m, mask.long()), "the mask did not move with its image"
                return kind
    raise AssertionError("an augmented item matches no canvas")


def test_fashion_seg_flips_move_masks_and_epochs_are_seeded(tmp_path, monkeypatch):
    _fake_fashion(monkeypatch)
    b = build_segmentation_data(cfg("fashion_seg", root=str(tmp_path), batch_size=8, flip=True, normalize="none"),
                                "cpu", seed=3)
    raw, raw_masks = b.train.images.float() / 255, b.train.masks
    lit = raw.flatten(1).any(1)  # empty canvases look the same flipped or not: left out
    kinds = [_match(x, m, raw[lit], raw_masks[lit]) for xs, ms in b.train for x, m in zip(xs, ms) if x.any()]
    assert kinds.count("flipped") > 5 and kinds.count("same") > 5
    b.train.set_epoch(2)
    first = [m for _, m in b.train]
    b.train.set_epoch(2)
    assert all(torch.equal(a, c) for a, c in zip(first, [m for _, m in b.train]))
    b.train.set_epoch(5)
    assert not all(torch.equal(a, c) for a, c in zip(first, [m for _, m in b.train]))
    # torchrun: two ranks take disjoint halves of the same epoch at half the batch
    b.train.set_epoch(1)
    whole = torch.cat([m for _, m in b.train]).flatten(1).sum(1).sort().values
    shards = [b.train.shard(r, 2) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    parts = [torch.cat([m for _, m in s]) for s in shards]
    assert all(len(p) == 20 for p in parts) and shards[0].batch_size == 4
    assert torch.equal(torch.cat(parts).flatten(1).sum(1).sort().values, whole)


def test_scale_jitter_moves_masks_with_images_and_pads_with_ignore():
    # 4 blocks of 16 x 16, label k painted with grey 50 k: after rescale and crop, each label sits on its grey
    images, masks = torch.zeros((6, 1, 32, 32), dtype=torch.uint8), torch.zeros((6, 32, 32), dtype=torch.uint8)
    for k, (r, c) in enumerate(((0, 0), (0, 16), (16, 0), (16, 16))):
        masks[:, r:r + 16, c:c + 16] = k
        images[:, 0, r:r + 16, c:c + 16] = 50 * k
    batches = TensorSegmentationBatches(images, masks, 6, shuffle=True, augment=SegAugment(hflip=0.5, scale=(0.5, 1.5)),
                                        preprocess=None, device=torch.device("cpu"), seed=0)
    sizes = set()
    for epoch in range(3):
        batches.set_epoch(epoch)
        for x, m in batches:
            assert x.shape == (6, 1, 32, 32) and m.shape == (6, 32, 32) and m.dtype == torch.int64
            pad = m == 255
            assert (x[:, 0][pad] == 0).all()  # padding: image 0, mask ignored
            for k in range(4):  # interior pixels of each label carry its grey (edges blur under bilinear resizing)
                inner = (m == k) & (torch.nn.functional.max_pool2d((m != k).float()[:, None], 5, 1, 2)[:, 0] == 0)
                if inner.any():
                    torch.testing.assert_close(x[:, 0][inner], torch.full_like(x[:, 0][inner], 50 * k / 255),
                                               atol=1e-5, rtol=0)
            sizes.update(pad.flatten(1).sum(1).tolist())
    assert len(sizes) > 3 and 0 in sizes  # rescaled differently per item; some enlarged (no padding)


def test_refused_augmentations_name_themselves(tmp_path, monkeypatch):
    _fake_fashion(monkeypatch)
    with pytest.raises(CnnlabError, match=r"data\.rotate, data\.mixup do not apply to segmentation"):
        build_segmentation_data(cfg("fashion_seg", root=str(tmp_path), rotate=10.0, mixup=0.2), "cpu")
    with pytest.raises(CnnlabError, match="data.jitter does not apply to fashion_seg"):
        build_segmentation_data(cfg("fashion_seg", root=str(tmp_path), jitter=0.2), "cpu")
    with pytest.raises(CnnlabError, match="data.scale must be"):
        build_segmentation_data(cfg("fashion_seg", root=str(tmp_path), scale=(2.0, 1.0)), "cpu")


def _vocseg(tmp_path):
    root = write_vocseg(tmp_path / "voc")  # a (40 x 20), b (24 x 32), c (30 x 30); class_mask labels 0, 1, 2, 255
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    return root


def _palette_png(labels: np.ndarray, path) -> None:
    """A palette PNG of class indices, with VOC's full colour map (without one Pillow may renumber the indices)."""
    image = Image.fromarray(labels, mode="P")
    image.putpalette(voc_palette().flatten().tolist())
    image.save(path)


def _pixels(root, stem):
    return torch.from_numpy(np.array(Image.open(root / "JPEGImages" / f"{stem}.png").convert("RGB"))).permute(2, 0, 1)


def test_vocseg_batches_are_padded_labelled_and_normalised(tmp_path):
    root = _vocseg(tmp_path)
    b = build_segmentation_data(cfg(f"vocseg:{root}", batch_size=2), "cpu")
    assert b.classes == VOC_SEG_CLASSES and len(b.classes) == 21 and b.classes[0] == "background"
    a, bb = _pixels(root, "a").double() / 255, _pixels(root, "b").double() / 255  # the training pixels
    everything = torch.cat([a.flatten(1), bb.flatten(1)], 1)
    np.testing.assert_allclose(b.preprocess_state["mean"], everything.mean(1).numpy(), rtol=1e-9)
    np.testing.assert_allclose(b.preprocess_state["std"], everything.std(1, unbiased=False).numpy(), rtol=1e-9)
    (x, m), = list(b.train)  # one batch of a (20 x 40) and b (32 x 24), padded to 32 x 40
    assert x.shape == (2, 3, 32, 40) and x.dtype == torch.float32 and m.shape == (2, 32, 40) and m.dtype == torch.int64
    first_is_a = bool(m[0, 25, 0] == 255)  # a is 20 rows tall: its row 25 is padding (b's is class 1)
    (x_a, m_a), (x_b, m_b) = ((x[0], m[0]), (x[1], m[1])) if first_is_a else ((x[1], m[1]), (x[0], m[0]))
    assert torch.equal(m_a[:20, :40], torch.from_numpy(class_mask(40, 20)).long()) and (m_a[20:] == 255).all()
    assert torch.equal(m_b[:, :24], torch.from_numpy(class_mask(24, 32)).long()) and (m_b[:, 24:] == 255).all()
    torch.testing.assert_close(unnormalise(x_a[None], b.preprocess_state)[0, :, :20, :40], a.float(),
                               atol=1e-6, rtol=0)
    assert b.input_shape == (3, 20, 40) and b.test_images.shape == (1, 3, 30, 30)
    (xt, mt), = list(b.test)  # no test.txt: test is val (c)
    assert torch.equal(mt[0], torch.from_numpy(class_mask(30, 30)).long())
    sized = build_segmentation_data(cfg(f"vocseg:{root}", batch_size=2, image_size=16, flip=True), "cpu")
    (x, m), = list(sized.train)
    assert x.shape == (2, 3, 16, 16) and sized.input_shape == (3, 16, 16)
    assert set(m.unique().tolist()) <= {0, 1, 2, 255}
    (xt, mt), = list(sized.test)  # evaluation: shorter side 16
    assert xt.shape == (1, 3, 16, 16) and sized.test_images.shape == (1, 3, 16, 16)


def test_vocseg_flips_move_the_mask(tmp_path):
    root = _vocseg(tmp_path)
    b = build_segmentation_data(cfg(f"vocseg:{root}", batch_size=1, flip=True, normalize="none"), "cpu")
    originals = {(20, 40): (_pixels(root, "a"), class_mask(40, 20)), (32, 24): (_pixels(root, "b"), class_mask(24, 32))}
    seen = set()
    for epoch in range(6):
        b.train.set_epoch(epoch)
        for x, m in b.train:
            image, mask = originals[tuple(x.shape[-2:])]
            image, mask = image.float() / 255, torch.from_numpy(mask).long()
            if torch.allclose(x[0], image, atol=1e-6):
                assert torch.equal(m[0], mask)
                seen.add("same")
            else:
                torch.testing.assert_close(x[0], image.flip(-1), atol=1e-6, rtol=0)
                assert torch.equal(m[0], mask.flip(-1))
                seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_vocseg_colour_masks_use_the_voc_palette(tmp_path):
    root = _vocseg(tmp_path)
    palette = voc_palette()
    assert palette[1].tolist() == [128, 0, 0] and palette[15].tolist() == [192, 128, 128]  # aeroplane, person
    assert palette[255].tolist() == [224, 224, 192]  # the border colour
    labels = class_mask(40, 20)
    labels[5, 5] = 15
    Image.fromarray(palette[labels]).save(root / "SegmentationClass" / "a.png")  # RGB colours, not indices
    b = build_segmentation_data(cfg(f"vocseg:{root}", batch_size=1), "cpu")
    got = {tuple(m.shape[-2:]): m[0] for _, m in b.train}
    assert torch.equal(got[(20, 40)], torch.from_numpy(labels).long())
    rgb = palette[labels]
    rgb[3, 7] = (10, 20, 30)
    Image.fromarray(rgb).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(CnnlabError, match=r"a\.png has colour \(10, 20, 30\) at x=7, y=3.*not in the VOC palette"):
        build_segmentation_data(cfg(f"vocseg:{root}"), "cpu")


@pytest.mark.parametrize("fault, message", [
    ("index", r"SegmentationClass/a\.png holds values \[30\]; expected class indices 0\.\.20 or 255"),
    ("size", r"mask .*a\.png is 8x8 but its image .*a\.png is 40x20"),
    ("missing", r"Segmentation/train\.txt names mask .*a\.png that does not exist"),
    ("rgb_index", r"mask .*a\.png is a LA image"),
])
def test_vocseg_bad_masks_name_the_file(tmp_path, fault, message):
    root = _vocseg(tmp_path)
    path = root / "SegmentationClass" / "a.png"
    if fault == "index":
        labels = class_mask(40, 20)
        labels[2, 2] = 30  # a palette index outside VOC's 21 classes
        _palette_png(labels, path)
    elif fault == "size":
        _palette_png(np.zeros((8, 8), dtype=np.uint8), path)
    elif fault == "missing":
        path.unlink()
    else:
        Image.fromarray(np.zeros((20, 40, 2), dtype=np.uint8), mode="LA").save(path)
    with pytest.raises(CnnlabError, match=message):
        build_segmentation_data(cfg(f"vocseg:{root}"), "cpu")


def _masks_folder(root, n=10, classes=("background", "road", "car")):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint8)).save(root / "images" / f"im{k:02d}.png")
        Image.fromarray((np.arange(16)[None].repeat(12, 0) * 3 // 16).clip(max=k % 3).astype(np.uint8)).save(
            root / "masks" / f"im{k:02d}.png")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_masks_folder_classes_and_rule_split(tmp_path):
    root = _masks_folder(tmp_path / "m")
    b = build_segmentation_data(cfg(f"masks:{root}", batch_size=4, eval_batch_size=4), "cpu")
    assert b.classes == ["background", "road", "car"] and b.input_shape == (3, 12, 16)  # grey files read as RGB
    assert (len(b.train.dataset), len(b.val.dataset), len(b.test.dataset)) == (8, 1, 1)  # i % 10 == 4 val, 9 test
    assert [s[0] for s in b.val.dataset.samples] == ["im04"] and [s[0] for s in b.test.dataset.samples] == ["im09"]
    labels = torch.cat([m for _, m in b.train])
    assert set(labels.unique().tolist()) == {0, 1, 2}
    halves = [b.train.shard(r, 2) for r in range(2)]  # torchrun: disjoint halves at half the batch, normalised
    ids = [[] for _ in halves]
    for k, half in enumerate(halves):
        for x, m in half:
            assert x.shape == (2, 3, 12, 16) and x.dtype == torch.float32 and abs(float(x.mean())) < 1
        ids[k] = [half.dataset.samples[i][0] for i in half.loader.sampler]
    assert sorted(ids[0] + ids[1]) == sorted(s[0] for s in b.train.dataset.samples)
    (root / "classes.txt").unlink()  # no names: the classes are counted from the masks
    assert build_segmentation_data(cfg(f"masks:{root}"), "cpu").classes == ["background", "class_1", "class_2"]
    (root / "train.txt").write_text("im00\nim01\nim02\n")
    (root / "val.txt").write_text("im03\n")
    b = build_segmentation_data(cfg(f"masks:{root}", train_limit=2), "cpu")
    assert [s[0] for s in b.train.dataset.samples] == ["im00", "im01"] and len(b.test.dataset) == 1


def test_masks_folder_faults(tmp_path):
    root = _masks_folder(tmp_path / "m", classes=("background", "road"))
    with pytest.raises(CnnlabError, match=r"masks/im02\.png holds values \[2\]; expected class indices 0\.\.1"):
        list(build_segmentation_data(cfg(f"masks:{root}"), "cpu").train)
    (root / "classes.txt").write_text("road\ncar\n")
    with pytest.raises(CnnlabError, match=r"classes\.txt lists \['road', 'car'\].*the first 'background'"):
        build_segmentation_data(cfg(f"masks:{root}"), "cpu")
    (root / "classes.txt").unlink()
    (root / "masks" / "im05.png").unlink()
    with pytest.raises(CnnlabError, match=r"image .*im05\.\* has no mask .*masks/im05\.png; every image needs"):
        build_segmentation_data(cfg(f"masks:{root}"), "cpu")
    with pytest.raises(CnnlabError, match=r"masks:.*nowhere is not a folder"):
        build_segmentation_data(cfg(f"masks:{tmp_path / 'nowhere'}"), "cpu")
    (tmp_path / "bare").mkdir()
    with pytest.raises(CnnlabError, match=r"no images/ folder \(expected images/ and masks/"):
        build_segmentation_data(cfg(f"masks:{tmp_path / 'bare'}"), "cpu")
    (root / "masks" / "im05.png").write_bytes((root / "masks" / "im04.png").read_bytes())
    for k in range(3, 10):  # 3 images left: too few for the rule split
        (root / "images" / f"im{k:02d}.png").unlink()
    with pytest.raises(CnnlabError, match=r"3 images are too few for the rule split.*give split lists train\.txt"):
        build_segmentation_data(cfg(f"masks:{root}"), "cpu")
    with pytest.raises(CnnlabError, match="data.scale .* needs data.image_size"):
        build_segmentation_data(cfg(f"vocseg:{_vocseg(tmp_path)}", scale=(0.5, 2.0)), "cpu")


def test_images_table_is_what_the_voc_tests_assume():
    assert [(n, w, h) for n, w, h in IMAGES] == [("a.png", 40, 20), ("b.png", 24, 32), ("c.png", 30, 30)]
