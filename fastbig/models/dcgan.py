"""DCGAN: a generator of ConvTranspose2d+BN+ReLU blocks (fastbig.nn.ConvTransposeBnReLU2d) ending
in ConvTranspose2d+Tanh, and a discriminator of Conv2d+LeakyReLU then Conv2d+BN+LeakyReLU blocks
(fastbig.nn.ConvBnLeakyReLU2d) ending in Conv2d+Sigmoid. fused=False: the nn.Sequential twins."""
from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn_act, conv_transpose_bn_relu


def _log2_size(name, image_size):
    if not isinstance(image_size, int) or image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"{name}: image_size must be a power of two >= 8, got {image_size!r}")
    return image_size.bit_length() - 1


class Generator(nn.Module):
    """z [B, nz] or [B, nz, 1, 1] -> images [B, nc, image_size, image_size] in (-1, 1)."""

    def __init__(self, nz: int = 16, ngf: int = 32, nc: int = 1, image_size: int = 8,
                 fused: bool = True):
        super().__init__()
        n = _log2_size("Generator", image_size)
        self.nz = nz
        ch = ngf * 2 ** (n - 3)
        layers = [conv_transpose_bn_relu(fused, nz, ch, 4, 1, 0)]           # 1 -> 4
        for _ in range(n - 3):                                               # 4 -> image_size/2
            layers.append(conv_transpose_bn_relu(fused, ch, ch // 2, 4, 2, 1))
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.net(z)


class Discriminator(nn.Module):
    """images [B, nc, s, s] -> probability of "real" [B]."""

    def __init__(self, ndf: int = 32, nc: int = 1, image_size: int = 8, negative_slope: float = 0.2,
                 fused: bool = True):
        super().__init__()
        n = _log2_size("Discriminator", image_size)
        layers = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(negative_slope)]
        ch, size = ndf, image_size // 2
        for _ in range(n - 2):                                               # s/2 -> 2
            layers.append(conv_bn_act(fused, "leaky_relu", ch, ch * 2, 4, 2, 1,
                                      negative_slope=negative_slope))
            ch, size = ch * 2, size // 2
        layers += [nn.Conv2d(ch, 1, size, 1, 0, bias=False), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()


class DCGAN(nn.Module):
    """Holds ``generator`` and ``discriminator``; forward(z) generates images."""

    def __init__(self, nz: int = 16, ngf: int = 32, ndf: int = 32, nc: int = 1, image_size: int = 8,
                 fused: bool = True):
        super().__init__()
        self.nz = nz
        self.generator = Generator(nz, ngf, nc, image_size, fused=fused)
        self.discriminator = Discriminator(ndf, nc, image_size, fused=fused)

    def forward(self, z):
        return self.generator(z)

    @torch.no_grad()
    def sample(self, n: int, generator=None, device=None):
        z = torch.randn(n, self.nz, generator=generator).to(device or next(self.parameters()).device)
        return self.generator(z)
