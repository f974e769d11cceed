"""Small convolutional classifiers: SimpleCNN, BigModel and MNISTNet (the classic Keras MNIST
network, adapted to the 8x8 digits by default). Conv layers are fused conv-bn-relu blocks
(fastbig.nn.ConvBnReLU2d); with fused=False, nn.Sequential(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)
with the same state_dict keys.
"""
from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn_act


def _check_image_size(name, image_size, divisor):
    if not isinstance(image_size, int) or image_size < divisor or image_size % divisor:
        raise ValueError(f"{name}: image_size must be a positive multiple of {divisor}, "
                         f"got {image_size!r}")


class SimpleCNN(nn.Module):
    """conv in->32 -> conv 32->64 (each conv-bn-relu) -> max-pool 2 -> fc."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 fused: bool = True):
        super().__init__()
        _check_image_size("SimpleCNN", image_size, 2)
        self.features = nn.Sequential(
            conv_bn_act(fused, "relu", in_channels, 32, 3, padding=1),
            conv_bn_act(fused, "relu", 32, 64, 3, padding=1),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * (image_size // 2) ** 2, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class BigModel(nn.Module):
    """conv in->64 -> conv 64->128 (each conv-bn-relu) -> max-pool 2 -> fc 1000 -> relu -> fc 10."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 hidden: int = 1000, fused: bool = True):
        super().__init__()
        _check_image_size("BigModel", image_size, 2)
        self.features = nn.Sequential(
            conv_bn_act(fused, "relu", in_channels, 64, 3, padding=1),
            conv_bn_act(fused, "relu", 64, 128, 3, padding=1),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(128 * (image_size // 2) ** 2, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(torch.flatten(self.features(x), 1))))


class MNISTNet(nn.Module):
    """The Keras MNIST network: conv32-relu, conv64-relu, max-pool 2, dropout .25, dense 128-relu,
    dropout .5, dense num_classes with a softmax classifier (forward returns logits; use
    ``predict_proba`` for the softmax). Convs are conv-bn-relu blocks; for the 8x8 digits
    (the default) the 3x3 convs are padded so the feature map stays 8x8 before the pool
    (28x28 MNIST: image_size=28, padding=0 gives the original 24x24 -> 12x12)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
                 padding: int | None = None, hidden: int = 128, fused: bool = True):
        super().__init__()
        if padding is None:
            padding = 1 if image_size < 16 else 0
        side = image_size + 2 * (2 * padding - 2)  # two 3x3 convs
        if side < 2 or side % 2:
            raise ValueError(f"MNISTNet: image_size {image_size} with padding {padding} gives a "
                             f"{side}x{side} feature map; expected an even size >= 2")
        self.features = nn.Sequential(
            conv_bn_act(fused, "relu", in_channels, 32, 3, padding=padding),
            conv_bn_act(fused, "relu", 32, 64, 3, padding=padding),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(64 * (side // 2) ** 2, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))

    @torch.no_grad()
    def predict_proba(self, x):
        return torch.softmax(self.forward(x), dim=-1)
