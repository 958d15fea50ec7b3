"""Batched augmentation: exact geometry, label mixing by lambda and by area, warnings, repeatability."""
from __future__ import annotations

import warnings

import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.data import augment as A
from cnnlab.engine.config import DataConfig
from cnnlab.engine.data_setup import build_augment


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b=6, c=1, h=8, w=8):
    return torch.rand(b, c, h, w, generator=gen(42)), torch.arange(b) % 3


def test_flip_all_and_none():
    x, y = batch()
    assert torch.equal(A.RandomFlip(p=1.0)(x, y, gen())[0], x.flip(3))
    assert torch.equal(A.RandomFlip(p=1.0, vertical=True)(x, y, gen())[0], x.flip(2))
    assert torch.equal(A.RandomFlip(p=0.0)(x, y, gen())[0], x)


def test_random_crop_is_a_shift_of_the_padded_image():
    x, y = batch()
    out, _ = A.RandomCrop(padding=2)(x, y, gen())
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # every output is one of the 25 windows of its own padded image
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    assert torch.equal(A.RandomCrop(padding=0)(x, y, gen())[0], x)


def test_affine_identity_and_half_turn():
    x, y = batch(h=9, w=9)
    assert torch.allclose(A.RandomAffine()(x, y, gen())[0], x, atol=1e-5)
    # a 180 degree rotation of an odd-sized image is a flip of both axes
    theta = torch.tensor([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]).expand(len(x), 2, 3)
    assert torch.allclose(A._warp(x, theta), x.flip(2).flip(3), atol=1e-5)


def test_cutout_zeroes_a_square():
    x = torch.ones(4, 1, 16, 16)
    out, _ = A.Cutout(size=4)(x, None, gen())
    zeros = (out == 0).sum((1, 2, 3))
    assert ((zeros > 0) & (zeros <= 16)).all() and (zeros == 16).any()


def test_mixup_labels_follow_the_images():
    # image i is constant = its class value, so the mixed pixel value reveals lambda
    y = torch.tensor([0, 1, 2, 0])
    x = torch.zeros(4, 1, 4, 4) + torch.tensor([1.0, 0.0, 0.0, 1.0]).view(4, 1, 1, 1)
    out, soft = A.Mixup(num_classes=3, alpha=0.4)(x, y, gen(3))
    assert torch.allclose(soft.sum(1), torch.ones(4))
    assert torch.allclose(out[:, 0, 0, 0], soft[:, 0], atol=1e-6)  # share of class 0 == pixel value


def test_cutmix_label_weight_is_the_pasted_area():
    y = torch.tensor([0, 1])
    x = torch.stack([torch.zeros(1, 10, 10), torch.ones(1, 10, 10)])
    for seed in range(5):
        out, soft = A.CutMix(num_classes=2, alpha=1.0)(x, y, gen(seed))
        pasted = out[0].mean().item() if soft[0, 1] > 0 else 0.0  # fraction of image 0 now from image 1
        assert soft[0, 1].item() == pytest.approx(pasted)
        assert torch.allclose(soft.sum(1), torch.ones(2))


def test_color_jitter_keeps_range_and_resized_crop_keeps_shape():
    x, y = batch(c=3)
    out, _ = A.ColorJitter(0.5, 0.5, 0.5)(x, y, gen())
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    assert A.RandomResizedCrop()(x, y, gen())[0].shape == x.shape


def test_hue_shift_matches_torchvision():
    from torchvision.transforms import functional as TF

    x = torch.rand(6, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    x[0] = 0.5  # grey: no hue to turn
    x[1, :, :2] = 0  # black pixels
    shifts = torch.tensor([0.1, -0.3, 0.5, -0.5, 0.0, 0.25])
    ref = torch.stack([TF.adjust_hue(img, float(s)) for img, s in zip(x, shifts)])
    assert (A.shift_hue(x, shifts) - ref).abs().max() < 1e-5
    jitter = A.ColorJitter(hue=0.2)
    out, _ = jitter(x, torch.zeros(6, dtype=torch.long), gen())
    assert torch.allclose(out[0], x[0]) and not torch.allclose(out[2], x[2])  # grey stays grey
    assert torch.allclose(out.amax(1), x.amax(1), atol=1e-6)  # a hue turn keeps the HSV value
    with pytest.raises(CnnlabError, match="hue"):
        A.ColorJitter(hue=0.7)


def test_same_seed_same_batch():
    x, y = batch()
    t = A.Compose([A.RandomFlip(), A.RandomCrop(2), A.RandomAffine(10, 0.1, (0.9, 1.1), 5), A.Cutout(3)])
    assert torch.equal(t(x, y, gen(7))[0], t(x, y, gen(7))[0])
    assert not torch.equal(t(x, y, gen(7))[0], t(x, y, gen(8))[0])


def test_label_changing_transforms_warn_on_digits_only():
    with pytest.warns(A.LabelChangeWarning, match="6 into a 9"):
        build_augment(DataConfig(rotate=120.0), 10, "mnist")
    with pytest.warns(A.LabelChangeWarning, match="vertical"):
        build_augment(DataConfig(vflip=True), 10, "digits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_augment(DataConfig(rotate=15.0, flip=True), 10, "mnist")
        build_augment(DataConfig(vflip=True, rotate=180.0), 10, "fashion_mnist")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists only with a GPU")
def test_batched_pipeline_never_waits_for_the_gpu():
    # every transform, the normalisation and the label mixing stay on the device: a Python float or
    # a fresh tensor built from a list would block the host until the GPU catches up, every batch
    from cnnlab.data.loader import prepare_batch
    from cnnlab.data.preprocess import Normalize

    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, device="cuda")
    y = torch.arange(16, device="cuda") % 3
    norm = Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    for mix in (A.Mixup(3, 0.4), A.CutMix(3, 1.0)):
        t = A.Compose([A.RandomFlip(), A.RandomCrop(2), A.RandomResizedCrop(), A.RandomAffine(10, 0.1, (0.9, 1.1), 5),
                       A.ColorJitter(0.3, 0.3, 0.3, 0.1), A.Cutout(4), mix])
        prepare_batch(x, y, t, norm, True, cuda_gen)  # first call: caches the normalisation constants
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, soft = prepare_batch(x, y, t, norm, True, cuda_gen)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.shape == (16, 3, 12, 12) and soft.shape == (16, 3)
