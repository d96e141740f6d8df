"""Faster R-CNN with FPN on stored tensors: scattering, codec latents, and the pixel baseline.

Every detector here is torchvision's :class:`~torchvision.models.detection.FasterRCNN` (RPN, RoI
heads, losses, box coding and NMS unchanged) with three parts swapped for inputs that are already
in the stored frame and already subsampled:

* the **body**: ScatResNet-50 on order-1 scattering (input at stride ``2^J`` of the image), cResNet
  on ``cae`` latents (stride 8), or torchvision's ResNet on pixels (stride 1), each followed by
  torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` and a max-pool level;
* :class:`StoredFrameTransform` replaces ``GeneralizedRCNNTransform``: no resize (the encoder framed
  the image once), no normalisation of coefficients (the scattering body starts with its own
  BatchNorm; pixels get the usual ImageNet mean/std), padding to a multiple of the coarsest
  level, and ``ImageList.image_sizes`` in **image** pixels (input cells × input stride);
* :class:`StridedAnchorGenerator` and :class:`FixedScaleRoIAlign`: anchors and RoI pooling work in
  image pixels with the levels' true strides (torchvision would infer strides from the input
  tensor's size, which is the coefficient grid here).

Boxes in and out are ``[x0, y0, x1, y1]`` in pixels of the stored frame; the model's ``input_stride``
and ``level_strides`` attributes say where the FPN levels sit. ``num_classes`` counts object
categories; the background class torchvision adds is internal. Level strides (image pixels):

================================ ======= ============================ =================
detector                          input   FPN levels (+ max-pool ones) anchors (default)
================================ ======= ============================ =================
fasterrcnn_scatresnet50, J=3      8       8, 16, 32 (+ 64, 128)        32, 64, ..., 512
fasterrcnn_scatresnet50, J=4      16      16, 32, 64 (+ 128, 256)      64, 128, ..., 1024
fasterrcnn_cresnet (cae)          8       8, 16, 32 (+ 64, 128)        32, 64, ..., 512
fasterrcnn_resnet50 / resnet18    1       4, 8, 16, 32 (+ 64)          32, 64, ..., 512
================================ ======= ============================ =================

RoI pooling reads the levels before the max-pool ones; a box of side ``√(wh)`` goes to level
``⌊4 + log2(√(wh)/224)⌋`` clamped to them (the FPN paper's rule, torchvision's default).

See ``docs/models.md`` ("Detection").
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.poolers import initLevelMapper

from ._blocks import flatten_scattering
from .cresnet import CResNet
from .scatresnet import ScatResNet50

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class StoredFrameTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` for inputs already in the stored frame.

    ``images``: a list of ``(C, h, w)`` tensors (``(C, K, h, w)`` scattering is flattened), each
    covering the valid part of its canvas; ``input_stride``: image pixels per input cell.
    Nothing is resized; ``image_mean``/``image_std`` ``None`` means no normalisation. The batch is
    zero-padded (bottom/right) to a multiple of ``size_divisible`` image pixels; the returned
    ``ImageList.image_sizes`` are ``(h · stride, w · stride)`` per image (image pixels) and targets
    pass through unchanged: their boxes are already in the stored frame. ``postprocess`` leaves
    predictions in the stored frame too (the evaluation maps them to the source image).
    """

    def __init__(self, input_stride: int = 1, size_divisible: int = 32,
                 image_mean: list[float] | None = None, image_std: list[float] | None = None):
        super().__init__(min_size=1, max_size=1, image_mean=image_mean or [],
                         image_std=image_std or [], size_divisible=size_divisible)
        if size_divisible % input_stride:
            raise ValueError(f"size_divisible {size_divisible} is not a multiple of the input "
                             f"stride {input_stride}")
        self.input_stride = int(input_stride)
        self.normalise = image_mean is not None

    def forward(self, images, targets=None):
        out = []
        for img in images:
            if img.dim() == 4:  # (C, K, h, w) scattering -> (C·K, h, w)
                img = img.reshape(-1, *img.shape[-2:])
            if img.dim() != 3:
                raise ValueError(f"each image must be a (C, h, w) tensor, got shape {tuple(img.shape)}")
            if not img.is_floating_point():
                img = img.float()
            if self.normalise:
                img = self.normalize(img)
            out.append(img)
        sizes = [(int(i.shape[-2]) * self.input_stride, int(i.shape[-1]) * self.input_stride)
                 for i in out]
        tensors = self.batch_images(out, size_divisible=self.size_divisible // self.input_stride)
        if targets is not None:
            targets = [dict(t) for t in targets]
        return ImageList(tensors, sizes), targets

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(input_stride={self.input_stride}, "
                f"size_divisible={self.size_divisible}, normalise={self.normalise}, no resize)")


class StridedAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` for an input grid at ``input_stride`` image pixels per cell:
    the level strides are computed from the padded batch's size in image pixels, so anchors are
    laid out in image pixels."""

    def __init__(self, sizes, aspect_ratios, input_stride: int = 1):
        super().__init__(sizes, aspect_ratios)
        self.input_stride = int(input_stride)

    def forward(self, image_list: ImageList, feature_maps):
        h, w = image_list.tensors.shape[-2:]
        s = self.input_stride
        frame = ImageList(torch.empty((0, 0, h * s, w * s), device="meta"), image_list.image_sizes)
        return super().forward(frame, feature_maps)


class FixedScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with the levels' strides given instead of inferred from the image
    sizes (which, on a padded batch of coefficient grids, can disagree between the two axes)."""

    def __init__(self, featmap_names: list[str], strides: list[int], output_size: int = 7,
                 sampling_ratio: int = 2, canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__(featmap_names, output_size, sampling_ratio,
                         canonical_scale=canonical_scale, canonical_level=canonical_level)
        self.scales = [1.0 / s for s in strides]
        self.map_levels = initLevelMapper(int(round(math.log2(strides[0]))),
                                          int(round(math.log2(strides[-1]))),
                                          canonical_scale=canonical_scale,
                                          canonical_level=canonical_level)


class _Stages(nn.Module):
    """The stages of a classification network as an FPN body: ``forward`` returns an ordered dict
    ``{"0": C_a, "1": C_b, ...}`` of stage outputs. ``net`` keeps the classifier's parameter names
    (``body.net.conv1.weight``...), so an ImageNet checkpoint of the classifier loads into it."""

    def __init__(self, net: nn.Module, stem, stages: list[str]):
        super().__init__()
        for name in ("fc", "avgpool"):
            if hasattr(net, name):
                delattr(net, name)
        self.net = net
        self._stem = stem
        self.stages = list(stages)

    def forward(self, x):
        x = self._stem(self.net, x)
        out = OrderedDict()
        for i, name in enumerate(self.stages):
            x = getattr(self.net, name)(x)
            out[str(i)] = x
        return out


def _scat_stem(net: ScatResNet50, x):
    return net.relu(net.bn1(net.conv1(net.front(x))))


def _cresnet_stem(net: CResNet, x):
    return net.bn0(flatten_scattering(x))


class MaxPoolLevels(ExtraFPNBlock):
    """``n`` extra FPN levels, each a stride-2 max pool (kernel 1) of the previous one: n = 1 is
    torchvision's ``LastLevelMaxPool``."""

    def __init__(self, n: int = 1):
        super().__init__()
        self.n = int(n)

    def forward(self, results, x, names):
        for k in range(self.n):
            names.append("pool" if k == 0 else f"pool{k + 1}")
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results, names


class BodyWithFPN(nn.Module):
    """A body returning stage outputs, then torchvision's FPN and ``extra_levels`` max-pool
    levels: ``out_channels`` features per level, as ``FasterRCNN`` expects of a backbone."""

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int = 256,
                 extra_levels: int = 2):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels,
                                         extra_blocks=MaxPoolLevels(extra_levels))
        self.out_channels = out_channels

    def forward(self, x):
        return self.fpn(self.body(x))


def _anchors(n_levels: int, anchor_size: int):
    """One anchor size per level, ``anchor_size · 2^k``, three aspect ratios (torchvision's
    ResNet-50-FPN: 32..512 on 5 levels)."""
    sizes = tuple((int(anchor_size) * 2 ** k,) for k in range(n_levels))
    return sizes, ((0.5, 1.0, 2.0),) * n_levels


def _faster_rcnn(backbone: nn.Module, num_classes: int, *, input_stride: int,
                 level_strides: list[int], roi_levels: int, anchor_size: int = 32,
                 image_mean=None, image_std=None, input_kind: str, **kw) -> FasterRCNN:
    """Assemble torchvision's FasterRCNN around ``backbone``; ``level_strides``: every FPN level
    (max-pool levels included) in image pixels; RoI pooling reads the first ``roi_levels``.
    ``kw``: FasterRCNN's own options (``box_batch_size_per_image``, ``rpn_pre_nms_top_n_train``,
    ``box_detections_per_img``...)."""
    if num_classes < 1:
        raise ValueError(f"num_classes counts object categories and must be >= 1, got {num_classes}")
    sizes, ratios = _anchors(len(level_strides), anchor_size)
    anchor_gen = StridedAnchorGenerator(sizes, ratios, input_stride=input_stride)
    roi_levels = level_strides[:roi_levels]
    pool = FixedScaleRoIAlign([str(i) for i in range(len(roi_levels))], roi_levels)
    model = FasterRCNN(backbone, num_classes=num_classes + 1, rpn_anchor_generator=anchor_gen,
                       box_roi_pool=pool, **kw)
    model.transform = StoredFrameTransform(input_stride, size_divisible=level_strides[-1],
                                           image_mean=image_mean, image_std=image_std)
    model.input_stride = int(input_stride)
    model.level_strides = list(level_strides)
    model.anchor_sizes = [list(s) for s in sizes]
    model.input_kind = input_kind
    model.num_categories = int(num_classes)
    return model


def _strides_from(input_stride: int, n_levels: int) -> list[int]:
    return [input_stride * 2 ** k for k in range(n_levels)]


def fasterrcnn_scatresnet50(in_channels: int = 75, num_classes: int = 80, *, J: int = 3,
                            width: int = 128, layers: tuple[int, int, int] = (5, 8, 3),
                            input_log: bool = False, fpn_channels: int = 256,
                            anchor_size: int | None = None, input_size=None, **kw) -> FasterRCNN:
    """Faster R-CNN + FPN on order-1 scattering (seed 000's backbone): ScatResNet-50's stages
    (outputs ``4·width``, ``8·width``, ``16·width`` at strides ``2^J``, ``2^(J+1)``, ``2^(J+2)``)
    and two max-pool levels; anchors ``4 · 2^J · 2^k`` (32..512 at J = 3)."""
    net = ScatResNet50(in_channels, 1, width=width, layers=tuple(layers), input_log=input_log)
    body = _Stages(net, _scat_stem, ["layer1", "layer2", "layer3"])
    backbone = BodyWithFPN(body, [4 * width, 8 * width, 16 * width], fpn_channels, extra_levels=2)
    s = 2 ** int(J)
    return _faster_rcnn(backbone, num_classes, input_stride=s, level_strides=_strides_from(s, 5),
                        roi_levels=3, anchor_size=anchor_size or 4 * s, input_kind="scattering",
                        **kw)


def fasterrcnn_cresnet(in_channels: int = 32, num_classes: int = 80, *, depth: int = 51,
                       latent_stride: int = 8, fpn_channels: int = 256,
                       anchor_size: int | None = None, input_size=None, **kw) -> FasterRCNN:
    """Faster R-CNN + FPN on learned-codec latents: cResNet's conv3_x/4_x/5_x (512, 1024, 2048
    channels at strides 8, 16, 32 of the image for the stride-8 CAE)."""
    net = CResNet(depth, in_channels, 1)
    body = _Stages(net, _cresnet_stem, ["layer2", "layer3", "layer4"])
    backbone = BodyWithFPN(body, [512, 1024, 2048], fpn_channels, extra_levels=2)
    s = int(latent_stride)
    return _faster_rcnn(backbone, num_classes, input_stride=s, level_strides=_strides_from(s, 5),
                        roi_levels=3, anchor_size=anchor_size or 4 * s, input_kind="latent", **kw)


def _fasterrcnn_pixels(depth: int, in_channels: int = 3, num_classes: int = 80, *,
                       fpn_channels: int = 256, anchor_size: int | None = None, input_size=None,
                       trainable_layers: int = 5, weights_backbone=None, **kw) -> FasterRCNN:
    """The pixel baseline: torchvision's ResNet-``depth`` + FPN (levels at 4, 8, 16, 32 + 64),
    trainable BatchNorm (from scratch) unless ``weights_backbone`` is given (then frozen BN, as
    torchvision does for pretrained backbones)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    if in_channels != 3:
        raise ValueError(f"the pixel detector reads RGB (3 channels), got {in_channels}")
    backbone = resnet_fpn_backbone(
        backbone_name=f"resnet{depth}", weights=weights_backbone,
        norm_layer=FrozenBatchNorm2d if weights_backbone is not None else nn.BatchNorm2d,
        trainable_layers=trainable_layers if weights_backbone is not None else 5)
    if fpn_channels != 256:
        raise ValueError("torchvision's resnet_fpn_backbone has 256 FPN channels")
    return _faster_rcnn(backbone, num_classes, input_stride=1, level_strides=[4, 8, 16, 32, 64],
                        roi_levels=4, anchor_size=anchor_size or 32, image_mean=IMAGENET_MEAN,
                        image_std=IMAGENET_STD, input_kind="pixels", **kw)


def fasterrcnn_resnet50(in_channels: int = 3, num_classes: int = 80, **kw) -> FasterRCNN:
    return _fasterrcnn_pixels(50, in_channels, num_classes, **kw)


def fasterrcnn_resnet18(in_channels: int = 3, num_classes: int = 80, **kw) -> FasterRCNN:
    return _fasterrcnn_pixels(18, in_channels, num_classes, **kw)


def load_backbone_weights(model: FasterRCNN, state_dict: dict) -> tuple[list[str], list[str]]:
    """Load a classifier's ``state_dict`` (e.g. ``scatstore train``'s ``last.pt["model"]`` of
    ScatResNet-50 or cResNet) into the detector's body; the classifier's ``fc`` is dropped.
    Returns ``(missing, unexpected)`` body keys. Pretrained bodies are usually fine-tuned with
    frozen BatchNorm: see :func:`freeze_batchnorm`."""
    body = model.backbone.body
    target = body.net if hasattr(body, "net") else body
    sd = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "avgpool."))}
    res = target.load_state_dict(sd, strict=False)
    return list(res.missing_keys), list(res.unexpected_keys)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` by torchvision's ``FrozenBatchNorm2d`` with the
    same statistics and affine parameters (``affine=False`` BatchNorms get weight 1, bias 0)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            f = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            if child.affine:
                f.weight.copy_(child.weight.detach())
                f.bias.copy_(child.bias.detach())
            if child.running_mean is not None:
                f.running_mean.copy_(child.running_mean)
                f.running_var.copy_(child.running_var)
            setattr(module, name, f)
        else:
            freeze_batchnorm(child)
    return module


__all__ = ["StoredFrameTransform", "StridedAnchorGenerator", "FixedScaleRoIAlign", "BodyWithFPN",
           "fasterrcnn_scatresnet50", "fasterrcnn_cresnet", "fasterrcnn_resnet50",
           "fasterrcnn_resnet18", "load_backbone_weights", "freeze_batchnorm"]
