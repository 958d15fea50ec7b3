"""The focal loss (Lin et al. 2017): against torchvision.ops.sigmoid_focal_loss (values and gradients), hand-computed
cases, and RetinaNet's per-anchor classification and box losses on hand-built matches."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal_loss

from cnnlab._errors import CnnlabError
from cnnlab.detection.boxes import BoxCoder, Matcher
from cnnlab.detection.losses import FocalLoss, focal_classification_loss, l1_box_loss, sigmoid_focal_loss


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 0.0), (-1.0, 2.0), (0.9, 1.5), (0.25, 5.0)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_equals_torchvision_values_and_gradients(alpha, gamma, reduction):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 7, generator=g) * 4).requires_grad_()  # large logits too: the stable log path
    targets = (torch.rand(64, 7, generator=g) < 0.2).float()
    targets[0, :3] = torch.tensor([0.3, 0.7, 1.0])  # soft targets as well
    theirs_in = logits.detach().clone().requires_grad_()
    ours = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    theirs = tv_focal_loss(theirs_in, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    weights = torch.rand(ours.shape, generator=g)  # a non-uniform upstream gradient for reduction="none"
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(logits.grad, theirs_in.grad, rtol=1e-5, atol=1e-7)


def test_module_and_no_alpha():
    logits, targets = torch.randn(10, 3), (torch.rand(10, 3) < 0.5).float()
    torch.testing.assert_close(FocalLoss(alpha=None, gamma=2.0, reduction="sum")(logits, targets),
                               tv_focal_loss(logits, targets, alpha=-1, gamma=2.0, reduction="sum"))
    assert "gamma=2.0" in repr(FocalLoss())
    # gamma = 0 and no alpha: the plain binary cross-entropy
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=None, gamma=0.0, reduction="mean"),
                               F.binary_cross_entropy_with_logits(logits, targets))


def test_hand_computed():
    # logit 0: p = 0.5 for both targets; -log(p_t) = ln 2, (1 - p_t)^2 = 1/4; alpha_t = 0.25 (positive), 0.75 (negative)
    loss = sigmoid_focal_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), alpha=0.25, gamma=2.0)
    torch.testing.assert_close(loss, torch.tensor([0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)]))
    # an easy negative, p = 0.01 (the prior init): CE = -ln 0.99 = 0.01005; FL = 0.75 * 0.01^2 * CE = 7.54e-7,
    # 1e4 / 0.75 = 13333 times less than the cross-entropy
    easy = sigmoid_focal_loss(torch.tensor([math.log(0.01 / 0.99)]), torch.tensor([0.0]), alpha=0.25, gamma=2.0)
    assert float(easy) == pytest.approx(0.75 * 1e-4 * -math.log(0.99), rel=1e-5)
    assert float(easy) == pytest.approx(7.5377e-7, rel=1e-4)
    # a hard positive, p = 0.1: (0.9)^2 = 0.81 of its alpha-weighted cross-entropy survives
    hard = sigmoid_focal_loss(torch.tensor([math.log(0.1 / 0.9)]), torch.tensor([1.0]), alpha=0.25, gamma=2.0)
    assert float(hard) == pytest.approx(0.25 * 0.81 * -math.log(0.1), rel=1e-5)


def test_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(CnnlabError, match="alpha is the weight of the positives"):
        sigmoid_focal_loss(x, x, alpha=1.5)
    with pytest.raises(CnnlabError, match="gamma must be a number >= 0"):
        sigmoid_focal_loss(x, x, gamma=-1.0)
    with pytest.raises(CnnlabError, match="reduction must be one of none, mean, sum"):
        FocalLoss(reduction="avg")
    with pytest.raises(CnnlabError, match=r"inputs \(3,\) and targets \(2,\) must have the same shape"):
        sigmoid_focal_loss(x, torch.zeros(2))


def test_classification_loss_on_hand_built_matches():
    # 4 anchors, 3 channels (background + 2 classes): anchor 0 matched to box 0 (class 2), anchor 1 ignored,
    # anchors 2 and 3 negatives; one positive, so the sum is divided by 1
    logits = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(3))
    matched = torch.tensor([0, Matcher.BETWEEN_THRESHOLDS, Matcher.BELOW_LOW_THRESHOLD, Matcher.BELOW_LOW_THRESHOLD])
    loss = focal_classification_loss(logits, [torch.tensor([2])], [matched])
    target = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = tv_focal_loss(logits[0, [0, 2, 3]], target, reduction="sum")
    torch.testing.assert_close(loss, expected)

    # two images: the per-image losses (each over its own positives) are averaged
    logits2 = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(4))
    matched2 = [torch.tensor([0, 1, 1, -1, -2]), torch.full((5,), -1)]  # the second image has no boxes
    loss2 = focal_classification_loss(logits2, [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64)], matched2)
    t0 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    first = tv_focal_loss(logits2[0, :4], t0, reduction="sum") / 3
    second = tv_focal_loss(logits2[1], torch.zeros(5, 3), reduction="sum") / 1  # no positives: every anchor negative
    torch.testing.assert_close(loss2, (first + second) / 2)


def test_box_loss_on_hand_built_matches():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 15.0, 15.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 40.0, 20.0]])
    deltas = torch.tensor([[[0.1, -0.2, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
    # anchor 0 on box 0 (target deltas 0), anchor 1 on box 1 (dx = 10/20 = 0.5, dw = ln 2), anchor 2 negative
    loss = l1_box_loss(deltas, [anchors], [boxes], [torch.tensor([0, 1, -1])], coder)
    assert float(loss) == pytest.approx((0.6 + 0.5 + math.log(2)) / 2, rel=1e-6)
    # no positives: zero, not NaN
    empty = l1_box_loss(deltas, [anchors], [torch.zeros(0, 4)], [torch.full((3,), -1)], coder)
    assert float(empty) == 0.0
