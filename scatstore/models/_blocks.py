"""Residual building blocks shared by the pixel ResNet, ScatResNet and cResNet.

The blocks follow torchvision's ResNet ("v1.5": in a bottleneck the stride sits on the 3×3
convolution). ``stride_in_1x1=True`` gives the original He et al. / Caffe placement (stride on
the first 1×1), which has the same parameters but fewer FLOPs; Torfason et al.'s FLOPs table
(seed 003) matches that placement.
"""
from __future__ import annotations

import torch
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 stride_in_1x1: bool = False):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 stride_in_1x1: bool = False):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(cin, planes, s1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


def make_stage(block: type, cin: int, planes: int, blocks: int, stride: int = 1,
               stride_in_1x1: bool = False) -> tuple[nn.Sequential, int]:
    """A stage of ``blocks`` residual blocks; the first one may change width and stride.

    A projection shortcut (1×1 conv + BN) is used whenever the shape changes. Returns the stage
    and its output width.
    """
    cout = planes * block.expansion
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    layers = [block(cin, planes, stride, down, stride_in_1x1)]
    layers += [block(cout, planes, 1, None, stride_in_1x1) for _ in range(1, blocks)]
    return nn.Sequential(*layers), cout


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """He (fan-out) init for convolutions, unit/zero affine BN, as torchvision does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_bn().weight)


def flatten_scattering(x: torch.Tensor) -> torch.Tensor:
    """(B, C, K, h, w) scattering coefficients -> (B, C·K, h, w); 4-D input passes through."""
    if x.dim() == 5:
        return x.flatten(1, 2)
    return x
