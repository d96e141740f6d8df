"""cResNet-39/51/72 (Torfason et al., ICLR 2018, seed 003): classification from learned-codec latents.

"ResNet-50 without the root block and conv2_x", fed the 28×28×C latent of a stride-8 compressive
autoencoder. Our reading of the seed's table:

    network     root  conv2_x  conv3_x 28²  conv4_x 14²  conv5_x 7²  GFLOPs
    cResNet-39  no    none     4            6            3           2.95
    cResNet-51  no    none     4            10           3           3.83
    cResNet-72  no    none     4            17           3           5.36

* The name counts the convolutions in the bottlenecks: 3·(4+6+3) = 39, 3·(4+10+3) = 51,
  3·(4+17+3) = 72; there is no stem convolution, so the first conv3_x block maps C → 512 directly
  (1×1 C→128, 3×3, 1×1 →512, with a 1×1 projection shortcut C→512), at stride 1 since the latent is
  already 28×28. conv4_x and conv5_x start with stride 2 as in ResNet-50.
* With this reading the multiply-accumulate count at C=32 is 2.96 / 3.83 / 5.36 G with the stride on
  the first 1×1 of a block (He et al.'s original placement, which also gives ResNet-50 its 3.86 G),
  matching the table; torchvision's placement (stride on the 3×3, the default here, usually more
  accurate) costs 0.15 G more. Pass ``stride_in_1x1=True`` to get the paper's FLOPs.
"""
from __future__ import annotations

import torch
from torch import nn

from ._blocks import Bottleneck, flatten_scattering, init_weights, make_stage

CRESNET_CONV4_BLOCKS = {39: 6, 51: 10, 72: 17}


class CResNet(nn.Module):
    def __init__(self, depth: int = 51, in_channels: int = 32, num_classes: int = 1000,
                 zero_init_residual: bool = False, stride_in_1x1: bool = False,
                 input_bn: bool = False, input_size: int | None = None):
        super().__init__()
        if depth not in CRESNET_CONV4_BLOCKS:
            raise ValueError(f"cResNet depth must be one of {sorted(CRESNET_CONV4_BLOCKS)}, got {depth}")
        self.depth = depth
        self.in_channels, self.input_size = in_channels, input_size or 28
        # Optional BatchNorm(affine=False) on the latent channels (not in the paper; off by default).
        self.bn0 = nn.BatchNorm2d(in_channels, affine=False) if input_bn else nn.Identity()
        c = in_channels
        self.layer2, c = make_stage(Bottleneck, c, 128, 4, 1, stride_in_1x1)    # conv3_x, 28×28
        self.layer3, c = make_stage(Bottleneck, c, 256, CRESNET_CONV4_BLOCKS[depth], 2, stride_in_1x1)
        self.layer4, c = make_stage(Bottleneck, c, 512, 3, 2, stride_in_1x1)    # conv5_x, 7×7
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, zero_init_residual)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(flatten_scattering(x))
        x = self.layer4(self.layer3(self.layer2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
