"""Models that read scatstore tensors: ScatResNet (scattering), cResNet (codec latents), pixel ResNet.

``build_model(arch, in_channels, num_classes)`` is the single entry point the training engine uses::

    model = build_model("scatresnet10", in_channels=651, num_classes=1000)

``list_archs()`` names every architecture with its intended input. See ``docs/models.md`` for the
parameter counts measured against the seeds' tables.
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
        raise ValueError(f"unknown arch {arch!r}; choose from {list_archs()}")
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


__all__ = [
    "build_model", "list_archs", "arch_info", "canonical_arch", "count_macs", "count_params",
    "default_arch", "DEFAULT_ARCH",
    "ScatResNet10", "ScatResNet50", "ScatWRN", "CResNet", "ResNet",
    "resnet18", "resnet34", "resnet50", "resnet101", "scattering_channels",
]
