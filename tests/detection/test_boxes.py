"""Box coder, matcher, sampler and target checks, against torchvision's ``_utils`` and hand computations."""
import math

import pytest
import torch
from torchvision.models.detection import _utils as tv
from torchvision.ops import box_iou

from cnnlab._errors import CnnlabError
from cnnlab.detection.boxes import BalancedSampler, BoxCoder, Matcher, check_targets


def _random_boxes(n: int, seed: int, size: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_by_hand():
    # reference box centred 5 px right of the proposal, twice as wide: dx = 5/10, dw = log 2
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    reference = torch.tensor([[0.0, 0.0, 20.0, 10.0]])
    codes = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(reference, proposal)
    torch.testing.assert_close(codes, torch.tensor([[10 * 0.5, 0.0, 5 * math.log(2.0), 0.0]]))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_coder_matches_torchvision_and_round_trips(weights):
    ours, theirs = BoxCoder(weights), tv.BoxCoder(weights)
    gt, anchors = _random_boxes(50, 0), _random_boxes(50, 1)
    codes = ours.encode(gt, anchors)
    torch.testing.assert_close(codes, theirs.encode_single(gt, anchors))
    decoded = ours.decode(codes, anchors)
    assert decoded.shape == (50, 1, 4)
    torch.testing.assert_close(decoded[:, 0], gt, rtol=1e-4, atol=1e-3)
    # k sets of codes per box (one per class in the RoI head)
    multi = torch.randn(50, 4 * 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours.decode(multi, anchors), theirs.decode(multi, [anchors]))


def test_decode_without_boxes():
    assert BoxCoder().decode(torch.zeros(0, 12), torch.zeros(0, 4)).shape == (0, 3, 4)


def test_decode_clips_huge_sizes():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = BoxCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), box)
    assert torch.isfinite(out).all()
    assert out[0, 0, 2] - out[0, 0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-5)


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_matches_torchvision(low_quality):
    iou = box_iou(_random_boxes(6, 3), _random_boxes(200, 4))
    ours = Matcher(0.5, 0.3, low_quality)(iou.clone())
    theirs = tv.Matcher(0.5, 0.3, low_quality)(iou.clone())
    assert torch.equal(ours, theirs)
    assert set(ours.tolist()) <= {-2, -1, *range(6)} and (ours >= 0).any() and (ours == -1).any()


def test_matcher_by_hand():
    iou = torch.tensor([[0.9, 0.4, 0.1, 0.2],
                        [0.2, 0.5, 0.2, 0.25]])
    assert Matcher(0.7, 0.3)(iou.clone()).tolist() == [0, -2, -1, -1]
    # box 1's best prediction (column 1, IoU 0.5) becomes its positive
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou.clone()).tolist() == [0, 1, -1, -1]


def test_matcher_without_boxes():
    out = Matcher(0.7, 0.3)(torch.zeros(0, 5))
    assert out.tolist() == [-1] * 5 and out.dtype == torch.int64


def test_sampler_consumes_rng_as_torchvision():
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(-1, 3, (300,), generator=g), torch.randint(-1, 2, (40,), generator=g)]
    torch.manual_seed(7)
    ours = BalancedSampler(64, 0.25)(labels)
    torch.manual_seed(7)
    theirs = tv.BalancedPositiveNegativeSampler(64, 0.25)(labels)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        assert torch.equal(a, b)


def test_sampler_counts_and_generator():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = BalancedSampler(32, 0.5)([labels], generator=torch.Generator().manual_seed(0))
    assert int(pos[0].sum()) == 10 and int(neg[0].sum()) == 22  # too few positives: negatives fill up
    assert not (pos[0].bool() & (labels != 1)).any() and not (neg[0].bool() & (labels != 0)).any()
    again = BalancedSampler(32, 0.5)([labels], generator=torch.Generator().manual_seed(0))
    assert torch.equal(neg[0], again[1][0])


def _target(boxes, labels):
    return {"boxes": boxes, "labels": labels}


@pytest.mark.parametrize("target, field", [
    (_target(torch.tensor([[5.0, 0.0, 1.0, 4.0]]), torch.tensor([1])), "boxes"),  # x2 < x1
    (_target(torch.tensor([[0.0, 0.0, float("nan"), 4.0]]), torch.tensor([1])), "boxes"),
    (_target(torch.tensor([[0.0, 0.0, 2.0, 4.0]]), torch.tensor([3])), "labels"),  # >= num_classes
    (_target(torch.tensor([[0.0, 0.0, 2.0, 4.0]]), torch.tensor([0])), "labels"),  # background
    (_target(torch.tensor([[0, 0, 2, 4]]), torch.tensor([1])), "boxes"),  # int boxes
    (_target(torch.tensor([0.0, 0.0, 2.0, 4.0]), torch.tensor([1])), "boxes"),  # shape (4,)
    (_target(torch.tensor([[0.0, 0.0, 2.0, 4.0]]), torch.tensor([1.0])), "labels"),  # float labels
    (_target(torch.tensor([[0.0, 0.0, 2.0, 4.0]]), torch.tensor([1, 2])), "labels"),  # count
])
def test_check_targets_names_image_and_field(target, field):
    good = _target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(CnnlabError, match=rf"targets\[1\]\['{field}'\]"):
        check_targets([good, target], 2, num_classes=3)


def test_check_targets_accepts_empty_and_valid():
    check_targets([_target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)),
                   _target(torch.tensor([[0.0, 0.0, 2.0, 4.0]]), torch.tensor([2]))], 2, num_classes=3)
