"""Pixel ResNet baseline (He et al. 2016), structured as torchvision's ``resnet18/34/50/101``.

Module names (``conv1, bn1, relu, maxpool, layer1..4, avgpool, fc``) and the parameter layout are
those of torchvision, so a torchvision state dict loads unchanged; parameter counts for 1000 classes:
ResNet-18 11,689,512, ResNet-34 21,797,672, ResNet-50 25,557,032, ResNet-101 44,549,160.
"""
from __future__ import annotations

import torch
from torch import nn

from ._blocks import BasicBlock, Bottleneck, init_weights, make_stage

_CONFIGS: dict[int, tuple[type, list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}


class ResNet(nn.Module):
    """ResNet on pixels: 7×7/2 root + 3×3/2 max-pool, four stages (strides 1, 2, 2, 2), GAP, FC.

    ``small_input=True`` swaps the root for a 3×3/1 conv without max-pool (CIFAR-size images).
    """

    def __init__(self, depth: int = 50, in_channels: int = 3, num_classes: int = 1000,
                 small_input: bool = False, zero_init_residual: bool = False,
                 stride_in_1x1: bool = False, input_size: int | None = None):
        super().__init__()
        if depth not in _CONFIGS:
            raise ValueError(f"ResNet depth must be one of {sorted(_CONFIGS)}, got {depth}")
        block, layers = _CONFIGS[depth]
        self.depth = depth
        self.input_size = input_size or (32 if small_input else 224)
        self.in_channels = in_channels
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        c = 64
        self.layer1, c = make_stage(block, c, 64, layers[0], 1, stride_in_1x1)
        self.layer2, c = make_stage(block, c, 128, layers[1], 2, stride_in_1x1)
        self.layer3, c = make_stage(block, c, 256, layers[2], 2, stride_in_1x1)
        self.layer4, c = make_stage(block, c, 512, layers[3], 2, stride_in_1x1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, zero_init_residual)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(in_channels: int = 3, num_classes: int = 1000, **kw) -> ResNet:
    return ResNet(18, in_channels, num_classes, **kw)


def resnet34(in_channels: int = 3, num_classes: int = 1000, **kw) -> ResNet:
    return ResNet(34, in_channels, num_classes, **kw)


def resnet50(in_channels: int = 3, num_classes: int = 1000, **kw) -> ResNet:
    return ResNet(50, in_channels, num_classes, **kw)


def resnet101(in_channels: int = 3, num_classes: int = 1000, **kw) -> ResNet:
    return ResNet(101, in_channels, num_classes, **kw)
