"""Hybrid scattering networks: a ResNet that starts at the scattering coefficients' resolution.

Input: scattering coefficients as ``(B, C·K, h, w)`` float (``(B, C, K, h, w)`` is flattened on the
fly), e.g. order 1+2, J=3, RGB 224² → 651 channels at 28×28; order 1, J=3 → 75 at 28×28.

* :class:`ScatResNet10` — seed 001 (Oyallon et al., "Scaling the Scattering Transform"), as its
  public code builds it: BatchNorm(in, affine=False) → conv3×3 in→256 **with bias** (+BN, ReLU) →
  2 BasicBlocks at 256 → 2 BasicBlocks at 512, the first with stride 2 → GAP → FC.
  12,768,744 parameters for order 1+2 (651 channels); 11,441,640 for order 1 (75 channels).
* :class:`ScatResNet50` — seed 000 (Oyallon et al., "Compressing the Input for CNNs with the
  First-Order Scattering Transform"): conv3×3 3K→128 (+BN, ReLU), bottleneck stages [5, 8, 3] at
  widths [128, 256, 512] (outputs 512/1024/2048), strides 1, 2, 2 → GAP → FC.
* :class:`ScatWRN` — seed 001's CIFAR hybrid: BN(affine=False) → conv3×3 → 16k (+BN, ReLU) →
  n BasicBlocks at 32k → n at 64k (no striding: the input is already 8×8) → GAP → FC.
"""
from __future__ import annotations

import torch
from torch import nn

from ._blocks import BasicBlock, Bottleneck, conv3x3, flatten_scattering, init_weights, make_stage


def scattering_channels(J: int, L: int = 8, max_order: int = 2, colours: int = 3) -> int:
    """Channels of a flattened scattering output: ``colours · (1 + L·J [+ L²·J(J−1)/2])``."""
    from scatstore.transforms.scattering import scattering_channels as per_colour

    return colours * per_colour(J, L, max_order)


# log compression of the input: log(LOG_EPS + max(x, 0)) before the input BatchNorm
LOG_EPS = 1e-4


class _ScatBase(nn.Module):
    """The front shared by the scattering models: flatten (B, C, K, h, w) → (B, C·K, h, w),
    optionally log-compress (``input_log``), then the input BatchNorm ``bn0``.

    ``input_log=False`` (default) is the seeds' front exactly: raw coefficients into
    BN(affine=False). ``input_log=True`` feeds ``log(ε + max(x, 0))``, ε = 1e-4, to ``bn0``
    instead: coefficients of different images differ by orders of magnitude in a channel (a
    texture's high-frequency paths against a face's), and the log makes batch and population
    statistics agree better. On the 150-image set of docs/models.md ("Training on small data") it
    lifts eval-mode accuracy without precise BN from 20 % to 84-92 %; with the engine's precise BN
    (the default for short epochs) the raw front already reaches 98 %, so the default stays the
    seeds'.
    """

    in_channels: int
    input_size: int
    input_log: bool = False

    def front(self, x: torch.Tensor) -> torch.Tensor:
        x = flatten_scattering(x)
        if self.input_log:
            x = torch.log(x.clamp_min(0) + LOG_EPS)
        return self.bn0(x)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)


class ScatResNet10(_ScatBase):
    def __init__(self, in_channels: int = 651, num_classes: int = 1000, widths: tuple[int, int] = (256, 512),
                 blocks: tuple[int, int] = (2, 2), first_conv_bias: bool = True,
                 zero_init_residual: bool = False, input_size: int | None = None,
                 input_log: bool = False):
        super().__init__()
        self.in_channels, self.input_size = in_channels, input_size or 28
        self.input_log = bool(input_log)
        self.bn0 = nn.BatchNorm2d(in_channels, affine=False)
        self.conv1 = conv3x3(in_channels, widths[0], bias=first_conv_bias)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c = widths[0]
        self.layer1, c = make_stage(BasicBlock, c, widths[0], blocks[0], 1)
        self.layer2, c = make_stage(BasicBlock, c, widths[1], blocks[1], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.front(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ScatResNet50(_ScatBase):
    def __init__(self, in_channels: int = 75, num_classes: int = 1000, width: int = 128,
                 layers: tuple[int, int, int] = (5, 8, 3), input_bn: bool = True,
                 first_conv_bias: bool = False, zero_init_residual: bool = False,
                 stride_in_1x1: bool = False, input_size: int | None = None,
                 input_log: bool = False):
        super().__init__()
        self.in_channels, self.input_size = in_channels, input_size or 28
        self.input_log = bool(input_log)
        self.bn0 = nn.BatchNorm2d(in_channels, affine=False) if input_bn else nn.Identity()
        self.conv1 = conv3x3(in_channels, width, bias=first_conv_bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c = width
        self.layer1, c = make_stage(Bottleneck, c, width, layers[0], 1, stride_in_1x1)
        self.layer2, c = make_stage(Bottleneck, c, 2 * width, layers[1], 2, stride_in_1x1)
        self.layer3, c = make_stage(Bottleneck, c, 4 * width, layers[2], 2, stride_in_1x1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.front(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ScatWRN(_ScatBase):
    def __init__(self, in_channels: int = 243, num_classes: int = 10, k: int = 8, n: int = 2,
                 zero_init_residual: bool = False, input_size: int | None = None,
                 input_log: bool = False):
        super().__init__()
        self.in_channels, self.input_size = in_channels, input_size or 8
        self.input_log = bool(input_log)
        self.bn0 = nn.BatchNorm2d(in_channels, affine=False)
        self.conv1 = conv3x3(in_channels, 16 * k)
        self.bn1 = nn.BatchNorm2d(16 * k)
        self.relu = nn.ReLU(inplace=True)
        c = 16 * k
        self.layer1, c = make_stage(BasicBlock, c, 32 * k, n, 1)
        self.layer2, c = make_stage(BasicBlock, c, 64 * k, n, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, zero_init_residual)

    # Same head as ScatResNet-10: input BN, one conv, two stages, pooling, FC.
    forward = ScatResNet10.forward

