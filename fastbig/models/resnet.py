"""ResNet with basic blocks (resnet18 / resnet34 layouts) built from fused conv-bn(-relu) blocks.
Width, in_channels and num_classes are configurable so tests can build tiny ones; small_input=True
uses a 3x3 stride-1 stem without max-pool (CIFAR / 8x8 digits)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._layers import conv_bn_act


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int, fused: bool):
        super().__init__()
        self.conv1 = conv_bn_act(fused, "relu", in_ch, out_ch, 3, stride, 1)
        self.conv2 = conv_bn_act(fused, "none", out_ch, out_ch, 3, 1, 1)
        self.downsample = (conv_bn_act(fused, "none", in_ch, out_ch, 1, stride, 0)
                           if stride != 1 or in_ch != out_ch else None)
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class ResNet(nn.Module):
    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), width: int = 64, in_channels: int = 3,
                 num_classes: int = 1000, small_input: bool = False, fused: bool = True):
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"ResNet: layers must be 4 positive block counts, got {tuple(layers)}")
        if small_input:
            self.stem = nn.Sequential(conv_bn_act(fused, "relu", in_channels, width, 3, 1, 1))
        else:
            self.stem = nn.Sequential(conv_bn_act(fused, "relu", in_channels, width, 7, 2, 3),
                                      nn.MaxPool2d(3, 2, 1))
        chans = [width, width * 2, width * 4, width * 8]
        in_ch = width
        stages = []
        for i, (n, ch) in enumerate(zip(layers, chans)):
            blocks = []
            for j in range(int(n)):
                blocks.append(BasicBlock(in_ch, ch, 2 if (j == 0 and i > 0) else 1, fused))
                in_ch = ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kw) -> ResNet:
    return ResNet((2, 2, 2, 2), **kw)


def resnet34(**kw) -> ResNet:
    return ResNet((3, 4, 6, 3), **kw)
