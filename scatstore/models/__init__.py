"""Models that read scatstore tensors: ScatResNet (scattering), cResNet (codec latents), pixel ResNet.

``build_model(arch, in_channels, num_classes)`` is the single entry point the training engine uses::

    model = build_model("scatresnet10", in_channels=651, num_classes=1000)

``list_archs()`` names every architecture with its intended input. See ``docs/models.md`` for the
parameter counts measured against the seeds' tables.

Detectors (torchvision's Faster R-CNN + FPN on stored tensors, :mod:`scatstore.models.detection`)
have their own registry: ``build_detector(arch, in_channels, num_classes, **kw)``,
``list_detectors()``, ``detector_info(arch)``. ``scatstore.models`` does not import torchvision
(≈1.2 s on top of torch's 1.3 s here): the detection module is imported on the first
``build_detector``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .cresnet import CResNet
from .flops import count_macs, count_params
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101
from .scatresnet import ScatResNet10, ScatResNet50, ScatWRN, scattering_channels

# arch -> (constructor(in_channels, num_classes, **kw), input kind, default in_channels, default size)
_ARCHS: dict[str, tuple[Callable[..., nn.Module], str, int, int]] = {
    "scatresnet10": (lambda c, nc, /, **kw: ScatResNet10(c, nc, **kw), "scattering", 651, 28),
    "scatresnet50": (lambda c, nc, /, **kw: ScatResNet50(c, nc, **kw), "scattering", 75, 28),
    "scatwrn": (lambda c, nc, /, **kw: ScatWRN(c, nc, **kw), "scattering", 243, 8),
    "cresnet39": (lambda c, nc, /, **kw: CResNet(39, c, nc, **kw), "latent", 32, 28),
    "cresnet51": (lambda c, nc, /, **kw: CResNet(51, c, nc, **kw), "latent", 32, 28),
    "cresnet72": (lambda c, nc, /, **kw: CResNet(72, c, nc, **kw), "latent", 32, 28),
    "resnet18": (lambda c, nc, /, **kw: ResNet(18, c, nc, **kw), "pixels", 3, 224),
    "resnet34": (lambda c, nc, /, **kw: ResNet(34, c, nc, **kw), "pixels", 3, 224),
    "resnet50": (lambda c, nc, /, **kw: ResNet(50, c, nc, **kw), "pixels", 3, 224),
    "resnet101": (lambda c, nc, /, **kw: ResNet(101, c, nc, **kw), "pixels", 3, 224),
}
_ALIASES = {
    "scatresnet-10": "scatresnet10", "scatresnet-50": "scatresnet50", "scat-wrn": "scatwrn",
    "cresnet-39": "cresnet39", "cresnet-51": "cresnet51", "cresnet-72": "cresnet72",
    "resnet-18": "resnet18", "resnet-34": "resnet34", "resnet-50": "resnet50", "resnet-101": "resnet101",
}


# store method -> the model that reads it by default (`scatstore train`, the study's MACs column)
DEFAULT_ARCH = {"scat1": "scatresnet50", "scat2": "scatresnet10", "cae": "cresnet51", "raw": "resnet18"}


def default_arch(method: str) -> str:
    """The default architecture for a store of ``method`` (pixels: ``raw``); ScatResNet-10 for
    an unknown method."""
    return DEFAULT_ARCH.get(method, "scatresnet10")


def canonical_arch(arch: str) -> str:
    a = arch.lower().replace("_", "-")
    a = _ALIASES.get(a, a)
    if a not in _ARCHS:
        hint = ""
        if _detector_name(arch) in _DETECTORS:
            hint = " (a detector: train it with --task detection)"
        raise ValueError(f"unknown arch {arch!r}{hint}; choose from {list_archs()}")
    return a


def list_archs() -> list[str]:
    return list(_ARCHS)


def arch_info(arch: str) -> dict:
    """``{"arch", "input" ("scattering" | "latent" | "pixels"), "in_channels", "input_size"}``."""
    a = canonical_arch(arch)
    _, kind, c, s = _ARCHS[a]
    return {"arch": a, "input": kind, "in_channels": c, "input_size": s}


def build_model(arch: str, in_channels: int | None = None, num_classes: int = 1000,
                input_size: int | None = None, **kw) -> nn.Module:
    """Build ``arch`` for inputs of ``in_channels`` channels (flattened C·K for scattering).

    ``input_size`` is recorded on the model (``model.input_shape``); every model ends in a global
    average pool, so other sizes work too. Extra keyword arguments go to the model's constructor
    (e.g. ``stride_in_1x1``, ``zero_init_residual``, ``small_input`` for the pixel ResNet).
    """
    a = canonical_arch(arch)
    ctor, _, c_default, _ = _ARCHS[a]
    return ctor(in_channels or c_default, num_classes, input_size=input_size, **kw)


# ---------------------------------------------------------------------------- detectors
# arch -> (constructor name in .detection, input kind, default in_channels, default input stride)
_DETECTORS: dict[str, tuple[str, str, int, int]] = {
    "fasterrcnn_scatresnet50": ("fasterrcnn_scatresnet50", "scattering", 75, 8),
    "fasterrcnn_cresnet": ("fasterrcnn_cresnet", "latent", 32, 8),
    "fasterrcnn_resnet50": ("fasterrcnn_resnet50", "pixels", 3, 1),
    "fasterrcnn_resnet18": ("fasterrcnn_resnet18", "pixels", 3, 1),
}
# store method -> the detector that reads it by default
DEFAULT_DETECTOR = {"scat1": "fasterrcnn_scatresnet50", "cae": "fasterrcnn_cresnet",
                    "raw": "fasterrcnn_resnet50"}


def _detector_name(arch: str) -> str:
    return arch.lower().replace("-", "_")


def canonical_detector(arch: str) -> str:
    a = _detector_name(arch)
    if a not in _DETECTORS:
        raise ValueError(f"unknown detector {arch!r}; choose from {list_detectors()}")
    return a


def list_detectors() -> list[str]:
    return list(_DETECTORS)


def detector_info(arch: str) -> dict:
    """``{"arch", "input" ("scattering" | "latent" | "pixels"), "in_channels", "input_stride"}``
    (the input stride of scattering is ``2^J``: 8 for the default J=3)."""
    a = canonical_detector(arch)
    _, kind, c, s = _DETECTORS[a]
    return {"arch": a, "input": kind, "in_channels": c, "input_stride": s}


def build_detector(arch: str, in_channels: int | None = None, num_classes: int = 80, **kw) -> nn.Module:
    """torchvision ``FasterRCNN`` with FPN for ``arch`` on inputs of ``in_channels`` channels;
    ``num_classes`` object categories (background excluded). Keyword options go to the
    constructors of :mod:`scatstore.models.detection` (``J``, ``width``, ``layers``,
    ``anchor_size``, FasterRCNN's own ``box_batch_size_per_image``...)."""
    from . import detection

    a = canonical_detector(arch)
    ctor, _, c_default, _ = _DETECTORS[a]
    return getattr(detection, ctor)(in_channels or c_default, num_classes, **kw)


__all__ = [
    "build_detector", "list_detectors", "detector_info", "canonical_detector", "DEFAULT_DETECTOR",
    "build_model", "list_archs", "arch_info", "canonical_arch", "count_macs", "count_params",
    "default_arch", "DEFAULT_ARCH",
    "ScatResNet10", "ScatResNet50", "ScatWRN", "CResNet", "ResNet",
    "resnet18", "resnet34", "resnet50", "resnet101", "scattering_channels",
]
