"""conv_autoencoder: shapes, the transposed-conv size formula, parameter count by hand, registry task."""
import pytest
import torch
from torch import nn

import cnnlab
from cnnlab._errors import CnnlabError


def test_registered_under_the_reconstruction_task():
    assert "conv_autoencoder" in cnnlab.list_models(task="reconstruction")
    assert "conv_autoencoder" not in cnnlab.list_models(task="classification")
    assert cnnlab.model_info("conv_autoencoder").task == "reconstruction"


@pytest.mark.parametrize("size", [8, 28, 32, (12, 20)])
def test_output_is_an_image_of_the_input_shape_in_0_1(size):
    h, w = (size, size) if isinstance(size, int) else size
    model = cnnlab.create_model("conv_autoencoder", in_channels=3).eval()
    x = torch.rand(2, 3, h, w)
    y = model(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1
    assert model.encode(x).shape == (2, 16, h // 4, w // 4)


def test_each_transposed_conv_doubles_the_size_by_the_formula():
    # (d - 1) * stride - 2 * pad + dilation * (k - 1) + output_padding + 1
    model = cnnlab.create_model("conv_autoencoder")
    for m in model.decoder:
        if isinstance(m, nn.ConvTranspose2d):
            for d in (3, 7, 14):
                (k,), (s,), (p,), (dil,), (op,) = m.kernel_size[:1], m.stride[:1], m.padding[:1], m.dilation[:1], m.output_padding[:1]
                expected = (d - 1) * s - 2 * p + dil * (k - 1) + op + 1
                assert expected == 2 * d
                assert m(torch.zeros(1, m.in_channels, d, d)).shape[-1] == expected


def test_parameter_count_by_hand():
    model = cnnlab.create_model("conv_autoencoder")
    conv = lambda cin, cout, k, bias: cin * cout * k * k + (cout if bias else 0)  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    expected = (conv(1, 32, 3, False) + bn(32) + conv(32, 64, 3, False) + bn(64)    # encoder
                + conv(64, 16, 1, True)                                             # to the code
                + conv(16, 64, 1, False) + bn(64)                                   # from the code
                + conv(64, 32, 4, False) + bn(32) + conv(32, 1, 4, True))           # decoder
    assert sum(p.numel() for p in model.parameters()) == expected == 54_449


def test_bad_input_and_options_are_clear():
    model = cnnlab.create_model("conv_autoencoder")
    with pytest.raises(CnnlabError, match=r"multiples of 4; got \(1, 1, 30, 30\)"):
        model(torch.rand(1, 1, 30, 30))
    with pytest.raises(CnnlabError, match="no classes"):
        cnnlab.create_model("conv_autoencoder", num_classes=10)
    with pytest.raises(CnnlabError, match="latent_channels"):
        cnnlab.create_model("conv_autoencoder", latent_channels=0)
