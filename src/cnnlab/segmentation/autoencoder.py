"""``conv_autoencoder``: a plain convolutional autoencoder (encoder, latent code, decoder).

The encoder halves the resolution at every stage with a strided 3x3 conv; a 1x1 conv makes the
latent code; the decoder mirrors the encoder with learned up-sampling, 4x4 transposed convs of
stride 2 and padding 1, each exactly doubling the size:
``(d - 1) * 2 - 2 * 1 + 1 * (4 - 1) + 0 + 1 = 2d`` (the transposed-conv output formula). The
last layer maps to the input's channels through a sigmoid, so outputs are images in [0, 1]
(trained with MSE or per-pixel BCE: ``cnnlab train --model conv_autoencoder --set loss=bce``).
On 28x28 Fashion-MNIST with the default table the code is 16 x 7 x 7 = 784 numbers, as many
as the pixels: the bottleneck is spatial, a compression only with fewer ``latent_channels``.
With ``latent_dim=32`` the code is a flat vector of 32 numbers (a linear layer after the 1x1 conv,
and one back before the decoder), comparable with PCA at the same dimensionality (``cnnlab latent``).

``denoising_autoencoder`` (Vincent et al. 2008) is the same network trained on corrupted inputs:
in training mode Gaussian noise of ``noise_std`` is added to the input, and the loss still compares
the output with the clean image, so the network must learn the data's structure, not the identity.
In eval mode nothing is added.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct
from cnnlab.models.registry import Family, register_model

DENOISING = Family(
    name="Denoising autoencoder",
    paper="Vincent et al., Extracting and Composing Robust Features with Denoising Autoencoders (ICML 2008)",
    year=2008,
)

AUTOENCODER = Family(
    name="Autoencoder",
    paper="Hinton & Salakhutdinov, Reducing the Dimensionality of Data with Neural Networks (Science 2006); "
          "convolutional: Masci et al., Stacked Convolutional Auto-Encoders (ICANN 2011)",
    year=2006,
)


@dataclass(frozen=True)
class AutoencoderStage:
    """One encoder stage (a stride-2 3x3 conv to ``out_channels``), mirrored by one decoder stage."""

    out_channels: int


# two halvings: 28x28 -> 14x14 -> 7x7, the code 16@7x7
DEFAULT_STAGES = (AutoencoderStage(32), AutoencoderStage(64))


class ConvAutoencoder(nn.Module):
    """Encoder (strided convs), 1x1 latent conv, decoder (transposed convs), sigmoid output.

    Args:
        in_channels: image channels (the output has as many).
        stages: encoder stages, outermost first; each halves the size (H and W must divide by 2^len).
        latent_channels: channels of the code at the smallest resolution.
        norm_layer, act_layer: factories for every hidden layer (BatchNorm, ReLU by default).
        latent_dim: a flat code of this many numbers (linear layers to and from it); None: the spatial code.
        input_size: (H, W) of the images, needed only with ``latent_dim`` (the linear layers' sizes).
        noise_std: Gaussian noise added to the input in training mode (a denoising autoencoder), in the
            input's units (1 = one standard deviation of the data under cnnlab's standard normalisation).
    """

    def __init__(self, in_channels: int = 1, stages: Sequence[AutoencoderStage] = DEFAULT_STAGES,
                 latent_channels: int = 16, norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] = nn.ReLU, latent_dim: int | None = None,
                 input_size: int | Sequence[int] = 28, noise_std: float = 0.0) -> None:
        super().__init__()
        if not stages:
            raise CnnlabError("conv_autoencoder needs at least one stage")
        if latent_channels < 1:
            raise CnnlabError(f"latent_channels must be a positive number of channels, got {latent_channels}")
        if latent_dim is not None and (not isinstance(latent_dim, int) or latent_dim < 1):
            raise CnnlabError(f"latent_dim must be a positive int (the code's length) or None, got {latent_dim!r}")
        if not noise_std >= 0:
            raise CnnlabError(f"noise_std must be >= 0 (the input noise's standard deviation), got {noise_std!r}")
        self.in_channels, self.latent_channels, self.factor = in_channels, latent_channels, 2 ** len(stages)
        self.latent_dim, self.noise_std = latent_dim, float(noise_std)
        self.to_code: nn.Module = nn.Identity()
        self.from_code: nn.Module = nn.Identity()
        if latent_dim is not None:
            h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            if h % self.factor or w % self.factor:
                raise CnnlabError(f"input_size {(h, w)} must divide by {self.factor} (2 per stage)")
            self.input_size = (h, w)
            grid = (latent_channels, h // self.factor, w // self.factor)
            self.to_code = nn.Sequential(nn.Flatten(), nn.Linear(grid[0] * grid[1] * grid[2], latent_dim))
            self.from_code = nn.Sequential(nn.Linear(latent_dim, grid[0] * grid[1] * grid[2]), nn.Unflatten(1, grid))
        widths = [in_channels, *(s.out_channels for s in stages)]
        self.encoder = nn.Sequential(*(ConvNormAct(c_in, c_out, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer)
                                       for c_in, c_out in zip(widths[:-1], widths[1:])))
        self.to_latent = nn.Conv2d(widths[-1], latent_channels, 1)  # (B, C, H/f, W/f) -> the code
        self.from_latent = ConvNormAct(latent_channels, widths[-1], 1, norm_layer=norm_layer, act_layer=act_layer)
        up: list[nn.Module] = []
        for c_in, c_out in zip(widths[:1:-1], widths[-2:0:-1]):  # every stage but the outermost, reversed
            up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=norm_layer is None),
                   *([norm_layer(c_out)] if norm_layer else []), act_layer()]
        up += [nn.ConvTranspose2d(widths[1], in_channels, 4, stride=2, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*up)
        for m in self.modules():  # the conv default (Kaiming-uniform, a=sqrt(5)) as in torch; BN at (1, 0)
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise CnnlabError(f"conv_autoencoder expects input of shape (B, {self.in_channels}, H, W) with H and W "
                              f"multiples of {self.factor}; got {tuple(x.shape)}")
        if self.latent_dim is not None and tuple(x.shape[2:]) != self.input_size:
            raise CnnlabError(f"this autoencoder has a flat code (latent_dim={self.latent_dim}) for "
                              f"{self.input_size[0]}x{self.input_size[1]} images, got {tuple(x.shape)}; "
                              "set input_size to the images' size")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the code: (B, latent_channels, H/f, W/f), or (B, latent_dim) with a flat code."""
        self.check_input(x)
        return self.to_code(self.to_latent(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The code -> images (B, C, H, W) in [0, 1]."""
        return self.decoder(self.from_latent(self.from_code(z)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_std > 0:  # corrupt the input, reconstruct the clean image
            x = x + self.noise_std * torch.randn_like(x)
        return self.decode(self.encode(x))


@register_model(AUTOENCODER, default_input=(1, 28, 28), task="reconstruction",
                notes="Plain conv autoencoder: 2 strided convs, 1x1 code (16@7x7 on 28x28), 2 transposed convs, "
                      "sigmoid; MSE or BCE (cnnlab train --model conv_autoencoder --data fashion_mnist).")
def conv_autoencoder(**kwargs) -> ConvAutoencoder:
    if kwargs.pop("num_classes", None):
        raise CnnlabError("conv_autoencoder has no classes (it reconstructs its input); leave num_classes out")
    return ConvAutoencoder(**kwargs)


@register_model(DENOISING, default_input=(1, 28, 28), task="reconstruction",
                notes="conv_autoencoder trained on noisy inputs (noise_std=0.5 in normalised units, training only); "
                      "the loss compares the output with the clean image.")
def denoising_autoencoder(*, noise_std: float = 0.5, **kwargs) -> ConvAutoencoder:
    if kwargs.pop("num_classes", None):
        raise CnnlabError("denoising_autoencoder has no classes (it reconstructs its input); leave num_classes out")
    return ConvAutoencoder(noise_std=noise_std, **kwargs)
