"""Encode *methods*: what turns a batch of preprocessed uint8 images into stored samples.

Every method has the same small interface, used by the encode engine:

- ``name`` and ``params`` (JSON-able, recorded in the manifest),
- ``sample_shape(size)``: the per-sample array shape for a ``size``×``size`` image, ``None`` for
  variable-length bytes samples,
- ``output_kind``: ``"coefficients"`` (float32 arrays, stored as float16/float32 or quantized to
  uint8 by the engine), ``"pixels"`` (uint8 arrays stored as they are) or ``"bytes"`` (bitstreams),
- ``encode(images)``: ``images`` is uint8 ``(B, 3, S, S)``.

Scattering input convention: pixels are scaled to ``[0, 1]`` (``x / 255``) before the transform, so
stored coefficients of different datasets are comparable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scatstore.transforms.scattering import scattering_channels

METHODS = ("scat1", "scat2", "raw", "cae")


@dataclass
class ScatteringMethod:
    """Order-1 (``scat1``) or order-1+2 (``scat2``) Morlet scattering at scale ``J``."""

    max_order: int
    J: int
    L: int = 8
    device: str = "cpu"
    backend: str = "torch"
    output_kind: str = "coefficients"
    _transforms: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return f"scat{self.max_order}"

    @property
    def params(self) -> dict[str, Any]:
        return {"J": self.J, "L": self.L, "max_order": self.max_order,
                "input_scale": "pixels/255", "backend": self.backend}

    def sample_shape(self, size: int) -> tuple[int, ...]:
        h = size // 2 ** self.J
        return (3, scattering_channels(self.J, self.L, self.max_order), h, h)

    def _transform(self, size: int):
        # One transform per image size: filters are built once and cached inside it.
        if size not in self._transforms:
            from scatstore.transforms.scattering import Scattering2D

            self._transforms[size] = Scattering2D(J=self.J, shape=(size, size), L=self.L,
                                                  max_order=self.max_order, backend=self.backend)
        return self._transforms[size]

    def encode(self, images: np.ndarray) -> np.ndarray:
        import torch

        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (B, 3, S, S) images, got {images.dtype} {images.shape}")
        x = torch.from_numpy(images).to(self.device, torch.float32).div_(255.0)
        with torch.no_grad():
            out = self._transform(images.shape[-1])(x)
        return out.float().cpu().numpy()

    def __getstate__(self):
        # Transforms hold device tensors: rebuild them in the worker process instead of pickling.
        state = self.__dict__.copy()
        state["_transforms"] = {}
        return state


@dataclass
class RawMethod:
    """The uint8 pixel baseline: stores the preprocessed image itself."""

    output_kind: str = "pixels"
    name: str = "raw"

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def sample_shape(self, size: int) -> tuple[int, ...]:
        return (3, size, size)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images)


def make_method(name: str, *, J: int = 3, L: int = 8, device: str = "cpu",
                backend: str = "torch", codec: str | None = None):
    """Build the encode method called ``name`` (one of :data:`METHODS`). ``ValueError`` for bad
    parameters or a device this machine cannot use."""
    if name in ("scat1", "scat2", "cae"):
        from scatstore.devices import usable_device

        usable_device(device)
    if name in ("scat1", "scat2"):
        if not 1 <= J <= 8:
            raise ValueError(f"J must be in 1..8, got {J}")
        if not 1 <= L <= 32:
            raise ValueError(f"L must be in 1..32, got {L}")
        return ScatteringMethod(max_order=int(name[-1]), J=J, L=L, device=device, backend=backend)
    if name == "raw":
        return RawMethod()
    if name == "cae":
        if not codec:
            raise ValueError("method 'cae' needs --codec PATH (train one with `scatstore fit-codec`)")
        from scatstore.codecs import CaeMethod

        return CaeMethod(codec, device=device)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
