"""PSPNet: the pyramid pooling module, smp's PSPNet oracle, the paper's dilated network with its auxiliary head."""
import pytest
import torch
from torch import nn

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.layers.pyramid_pooling import PyramidPooling
from cnnlab.segmentation.pspnet import pspnet
from tests.oracle import assert_same_output, randomize_norm_stats

smp = pytest.importorskip("segmentation_models_pytorch")


def test_pyramid_pooling_concatenates_bins_1_2_3_6_with_the_input():
    torch.manual_seed(0)
    psp = PyramidPooling(8, (1, 2, 3, 6)).eval()
    x = torch.randn(2, 8, 12, 18)
    with torch.no_grad():
        out = psp(x)
        assert out.shape == (2, 16, 12, 18)  # 4 branches of 8 / 4 channels + the 8 input channels
        torch.testing.assert_close(out[:, 8:], x)
        # the 1x1 bin by hand: the image mean through the 1x1 conv (+bias, no norm: smp's), ReLU, spread everywhere
        conv = psp.branches[0].proj.conv
        glob = torch.relu(torch.einsum("oc,bc->bo", conv.weight[:, :, 0, 0], x.mean((2, 3))) + conv.bias)
        torch.testing.assert_close(out[:, :2], glob[:, :, None, None].expand(2, 2, 12, 18))
        # the 6x6 bin: 2x3-pixel block means (12 / 6, 18 / 6) through its conv + BN + ReLU
        branch = psp.branches[3]
        blocks = x.reshape(2, 8, 6, 2, 6, 3).mean((3, 5))
        torch.testing.assert_close(branch.proj(blocks), branch.proj(branch.pool(x)))
    assert [type(b.proj.norm).__name__ if hasattr(b.proj, "norm") else None for b in psp.branches] == \
        [None, "BatchNorm2d", "BatchNorm2d", "BatchNorm2d"]
    assert hasattr(PyramidPooling(8, global_norm=True).branches[0].proj, "norm")


def test_resnet34_pspnet_takes_smp_weights_and_gives_the_same_logits():
    torch.manual_seed(0)
    theirs = randomize_norm_stats(smp.PSPNet("resnet34", encoder_weights=None, classes=3))
    ours = cnnlab.create_model("pspnet", backbone="resnet34", num_classes=3)
    result = cnnlab.load_weights(ours, theirs.state_dict())
    assert result.layout == "smp" and result.ok  # smp's unused layer3/layer4 keys are dropped, the rest strict
    assert_same_output(ours, theirs, torch.randn(2, 3, 64, 96), atol=1e-4)


def test_smp_defaults_cut_the_encoder_at_stride_8():
    model = pspnet(backbone="resnet18", num_classes=3)
    assert model.encoder.strides == [2, 4, 8] and model.encoder.channels[-1] == 128
    assert model.decoder.bottleneck.conv.kernel_size == (1, 1) and model.head.kernel_size == (3, 3)
    out = model(torch.randn(1, 3, 70, 90))  # not a multiple of 8: still the input's size (smp's would be 72x96)
    assert out.shape == (1, 3, 70, 90)


def test_paper_preset_is_dilated_with_an_auxiliary_head_in_train_and_eval():
    model = pspnet(backbone="resnet18", num_classes=4, preset="paper")
    assert model.encoder.strides == [2, 4, 8, 8, 8]  # output stride 8: layer3 and layer4 dilated
    assert model.decoder.psp.branches[0].proj.norm is not None and model.aux_head is not None
    x, target = torch.randn(2, 3, 48, 64), torch.randint(0, 4, (2, 48, 64))
    out = model(x)
    assert set(out) == {"out", "aux"} and out["out"].shape == out["aux"].shape == (2, 4, 48, 64)
    loss = nn.functional.cross_entropy(out["out"], target) + model.aux_loss_weight * \
        nn.functional.cross_entropy(out["aux"], target)
    loss.backward()
    assert model.aux_head.classifier.weight.grad is not None
    with torch.no_grad():
        assert set(model.eval()(x)) == {"out", "aux"}
    assert isinstance(pspnet(backbone="resnet18", aux_loss=False, preset="paper").eval()(x), torch.Tensor)


def test_bad_options_are_clear_errors():
    with pytest.raises(CnnlabError, match="preset='deep'"):
        pspnet(backbone="resnet18", preset="deep")
    with pytest.raises(CnnlabError, match="encoder_depth=7, but backbone='resnet18' has 5 stages"):
        pspnet(backbone="resnet18", encoder_depth=7)
    with pytest.raises(CnnlabError, match="output_stride must be one of"):
        pspnet(backbone="resnet18", output_stride=4)
    with pytest.raises(CnnlabError, match="penultimate stage"):
        pspnet(backbone="resnet18", encoder_depth=1, aux_loss=True)
    with pytest.raises(CnnlabError, match="bins must be positive ints"):
        PyramidPooling(8, (1, 0))
