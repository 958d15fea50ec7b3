"""SegNet and DeconvNet: max-unpooling with the encoder's indices, shapes, parameter counts, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.segmentation.deconvnet import DecoderStage, EncoderStage, deconvnet, segnet
from tests.oracle import meta_count


@pytest.mark.parametrize("size", [(8, 12), (9, 13)])  # odd sizes: the pool drops the last row/column
def test_unpooling_puts_each_maximum_back_where_it_was(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)  # continuous values: no ties
    encoder, decoder = EncoderStage(nn.Sequential()), DecoderStage(nn.Sequential())
    pooled, indices, pre_pool = encoder(x)
    restored = decoder(pooled, indices, pre_pool)
    assert restored.shape == x.shape
    # by hand: in every full 2x2 block, the position of its maximum keeps x's value, the other three are 0
    h, w = size[0] // 2 * 2, size[1] // 2 * 2
    blocks = x[..., :h, :w].reshape(2, 3, h // 2, 2, w // 2, 2)
    is_max = blocks == blocks.amax(dim=(3, 5), keepdim=True)
    expected = torch.zeros_like(x)
    expected[..., :h, :w] = torch.where(is_max, blocks, torch.zeros(())).reshape(2, 3, h, w)
    torch.testing.assert_close(restored, expected, rtol=0, atol=0)
    assert (restored != 0).sum() == pooled.numel()  # one value per block, the rest of the map is sparse


def test_segnet_runs_the_indices_through_vgg16():
    torch.manual_seed(0)
    model = segnet(num_classes=3)
    assert len(model.encoder) == len(model.decoder) == 5
    convs = sum(isinstance(m, nn.Conv2d) for m in model.decoder.modules()) + 1  # + the classifier conv
    assert convs == 13  # Badrinarayanan et al. 2017, Sec. 3: "The decoder network has 13 convolutional layers"
    x = torch.randn(2, 3, 64, 97)
    out = model(x)
    assert out.shape == (2, 3, 64, 97) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 64, 97))).backward()
    assert model.encoder[0].convs[0].conv.weight.grad is not None


def test_parameter_counts_are_the_papers():
    # SegNet paper, Table 6: SegNet 29.5M, DeconvNet 252M parameters (both on VGG-16's 13 convs)
    assert abs(meta_count(segnet) - 29.5e6) / 29.5e6 < 0.005
    assert abs(meta_count(deconvnet) - 252e6) / 252e6 < 0.005
    with torch.device("meta"):
        assert deconvnet()(torch.empty(2, 3, 224, 224)).shape == (2, 21, 224, 224)


def test_deconvnet_deconvolves_back_to_the_input_size():
    model = deconvnet(num_classes=3, fc_channels=32, fc_kernel=2)  # a 2x2 "fc6" on the 2x3 map of 64x96 px
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in model.modules()) == 14  # deconv-fc6 + 13
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 3, 64, 96)


def test_backbone_weights_initialise_the_encoder(tmp_path):
    with torch.device("meta"):
        vgg = cnnlab.create_model("vgg11_bn", num_classes=2)
    vgg.head = nn.Identity()  # a file of the conv stages only (the 120M-parameter head is not needed)
    vgg.to_empty(device="cpu")
    for p in vgg.parameters():
        nn.init.normal_(p)
    torch.save(vgg.state_dict(), tmp_path / "vgg.pt")
    model = segnet(backbone="vgg11_bn", num_classes=2, backbone_weights=tmp_path / "vgg.pt")
    torch.testing.assert_close(model.encoder[2].convs[1].conv.weight, vgg.stages[2][1].conv.weight)
    torch.testing.assert_close(model.encoder[4].convs[0].norm.bias, vgg.stages[4][0].norm.bias)


def test_bad_input_is_a_clear_error():
    with pytest.raises(CnnlabError, match="every stage of its backbone must end in a 2x2/2 max pool.*'stem'"):
        segnet(backbone="resnet18")
    with pytest.raises(CnnlabError, match="num_classes must be an int >= 1"):
        segnet(num_classes=0)
    model = deconvnet(num_classes=2, fc_channels=8, fc_kernel=2)
    with pytest.raises(CnnlabError, match=r"H and W >= 64"):
        model(torch.randn(1, 3, 32, 96))


def test_summary_counts_segnets_macs_as_torchs_flop_counter():
    # max_unpool carries its indices as the second argument: the summary must not read them as the kernel size
    from torch.utils.flop_counter import FlopCounterMode

    from cnnlab.analysis import summary

    model = cnnlab.create_model("segnet", num_classes=3).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    macs = summary(model, (3, 32, 32), training_memory=False).totals.macs_by_kind
    assert macs["conv"] + macs.get("linear", 0) == counter.get_total_flops() // 2  # torch counts convs and matmuls only


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, None], ids=["bn", "no-norm"])
def test_backbone_weights_initialise_fc6_and_fc7_from_the_classifiers_fc_layers(tmp_path, norm_layer):
    """A random VGG-16-BN state_dict (its FC layers 16 wide: the test stays small): fc6 and fc7 become the
    classifier's fully connected layers reshaped into a 7x7 and a 1x1 conv, as Noh et al. (and FCN) convert them."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with torch.device("meta"):
        vgg = cnnlab.create_model("vgg16_bn", num_classes=2)
    vgg.head = nn.Identity()
    vgg.to_empty(device="cpu")
    for p in vgg.parameters():
        nn.init.normal_(p)
    state = dict(vgg.state_dict())
    fc6, fc7 = nn.Linear(512 * 7 * 7, 16), nn.Linear(16, 16)  # VGG's head.fc6 / head.fc7 over the 7x7 pool5 map
    state.update({"head.fc6.weight": fc6.weight.detach(), "head.fc6.bias": fc6.bias.detach(),
                  "head.fc7.weight": fc7.weight.detach(), "head.fc7.bias": fc7.bias.detach(),
                  "head.fc.weight": torch.randn(2, 16), "head.fc.bias": torch.randn(2)})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "vgg16_bn.safetensors")
    model = deconvnet(num_classes=3, fc_channels=16, norm_layer=norm_layer,
                      backbone_weights=tmp_path / "vgg16_bn.safetensors")
    conv6, conv7 = model.bottleneck.fc6.conv, model.bottleneck.fc7.conv
    torch.testing.assert_close(conv6.weight, fc6.weight.reshape(16, 512, 7, 7), rtol=0, atol=0)
    torch.testing.assert_close(conv7.weight, fc7.weight.reshape(16, 16, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(model.encoder[4].convs[2].conv.weight, vgg.stages[4][2].conv.weight)
    pool5 = torch.randn(2, 512, 7, 7)
    with torch.no_grad():  # the oracle: the classifier's fc6 on the flattened map (no bias where BN follows)
        expected = F.linear(pool5.flatten(1), fc6.weight, fc6.bias if norm_layer is None else None)
        torch.testing.assert_close(conv6(pool5).flatten(1), expected, rtol=1e-4, atol=1e-4)
    if norm_layer is None:
        torch.testing.assert_close(conv7.bias, fc7.bias, rtol=0, atol=0)
    else:
        assert conv6.bias is None and conv7.bias is None
    with pytest.raises(CnnlabError, match="fc6 .* does not fit deconvnet's fc6 conv"):  # another fc width
        deconvnet(num_classes=3, fc_channels=8, backbone_weights=tmp_path / "vgg16_bn.safetensors")
