"""Encode *methods*: what turns a batch of preprocessed uint8 images into stored samples.

The contract is :class:`EncodeMethod` (a ``typing.Protocol``); the encode engine uses nothing
else of a method. :func:`make_method` builds one and refuses bad parameters (``ValueError``)
before anything is written; :meth:`EncodeMethod.validate` then checks them against the image
size of the job, also before anything is written.

Scattering input convention: pixels are scaled to ``[0, 1]`` (``x / 255``) before the transform, so
stored coefficients of different datasets are comparable.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from scatstore.transforms.scattering import scattering_channels

METHODS = ("scat1", "scat2", "raw", "cae")
OutputKind = Literal["coefficients", "pixels", "bytes"]


@runtime_checkable
class EncodeMethod(Protocol):
    """What the encode engine needs of a method (docs/architecture.md, "Encode methods").

    - ``name``, ``params``: JSON-able, recorded in the manifest and the job's parameters.
    - ``output_kind``: ``"coefficients"`` (float arrays, stored as float16 / float32 or quantized
      to uint8 by the engine), ``"pixels"`` (uint8 arrays stored as they are) or ``"bytes"``
      (one bitstream per image, variable length).
    - ``validate(size)``: raise ``ValueError`` when the method cannot encode ``size``×``size``
      images (called before OUT is touched).
    - ``sample_shape(size)``: the per-sample array shape, ``None`` for bytes samples.
    - ``encode(images, out_dtype=None)``: ``images`` is uint8 ``(B, 3, S, S)``. For
      coefficients, ``out_dtype`` (``"float16"`` / ``"float32"``) is the stored float type: a method
      may return it directly (rounded once, to nearest even, as a cast of its float32 output
      would) or return float32 and leave the cast to the engine.
    - ``measure(images, encoded)``: quality sums over a batch for the manifest's ``quality``
      block (see ``docs/format.md``), or ``None`` when the method measures nothing.
    - Picklable: tasks carry the method to worker processes and dask workers.
    """

    name: str
    output_kind: str

    @property
    def params(self) -> dict[str, Any]: ...

    def validate(self, size: int) -> None: ...

    def sample_shape(self, size: int) -> tuple[int, ...] | None: ...

    def encode(self, images: np.ndarray, out_dtype: str | None = None) -> Any: ...

    def measure(self, images: np.ndarray, encoded: Any) -> dict[str, float] | None: ...


def check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (B, 3, S, S) images, got {images.dtype} {images.shape}")


# Transforms shared by every method object of a process (a task pickled to a worker brings a
# copy of the method, threads share one): filters and FFT plans are built once per geometry.
_TRANSFORMS: dict[tuple, Any] = {}
_TRANSFORMS_LOCK = threading.Lock()


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

    def validate(self, size: int) -> None:
        # kymatio's rule: each side at least 2**J (an output of one coefficient per side)
        if size < 2 ** self.J:
            raise ValueError(f"image size {size} is too small for J={self.J}: need at least "
                             f"2**J = {2 ** self.J}")

    def sample_shape(self, size: int) -> tuple[int, ...]:
        h = size // 2 ** self.J
        return (3, scattering_channels(self.J, self.L, self.max_order), h, h)

    def _transform(self, size: int, out_dtype: str | None):
        """One transform per image size and output dtype, per process."""
        key = (self.J, self.L, self.max_order, str(self.device), self.backend, size, out_dtype)
        with _TRANSFORMS_LOCK:
            S = _TRANSFORMS.get(key)
            if S is None:
                import torch

                from scatstore.transforms.scattering import Scattering2D

                kwargs = {} if out_dtype is None else {"out_dtype": getattr(torch, out_dtype)}
                S = _TRANSFORMS[key] = Scattering2D(J=self.J, shape=(size, size), L=self.L,
                                                    max_order=self.max_order,
                                                    backend=self.backend, **kwargs)
        return S

    def encode(self, images: np.ndarray, out_dtype: str | None = None) -> np.ndarray:
        """Coefficients of ``images``; in ``out_dtype`` when it is float16 / float32 and the
        backend is torch (the transform casts each chunk as it writes it: one rounding, no
        second pass over every coefficient), else float32."""
        import torch

        check_images(images)
        direct = out_dtype if out_dtype in ("float16", "float32") and self.backend == "torch" \
            else None
        if direct and torch.device(self.device).type == "cpu":
            # numpy's division is bit-identical to torch's and never opens an OpenMP region
            # (whose idle workers spin ~6 ms after each, libgomp's default spin-wait)
            x = torch.from_numpy(np.divide(images, np.float32(255.0), dtype=np.float32,
                                           out=batch_buffer("x", images.shape, np.float32)))
        else:
            x = torch.from_numpy(images).to(self.device, torch.float32).div_(255.0)
        with torch.no_grad():
            out = self._transform(images.shape[-1], direct)(x)
        return out.cpu().numpy() if direct else out.float().cpu().numpy()

    def measure(self, images: np.ndarray, encoded: Any) -> None:
        return None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_transforms"] = {}
        return state


_BUFFERS = threading.local()


def batch_buffer(name: str, shape: tuple, dtype) -> np.ndarray:
    """A per-thread buffer reused batch after batch.

    A fresh 19 MB float batch per call is freed at once, glibc then hands the free top of the
    thread's heap back to the kernel, and the next batch faults every page in again: measured
    130-200 page faults per image in-process (2-14 with reused buffers), ~0.3 ms of CPU each."""
    buf = getattr(_BUFFERS, name, None)
    if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or len(buf) < shape[0]:
        buf = np.empty(shape, dtype=dtype)
        setattr(_BUFFERS, name, buf)
    return buf[:shape[0]]


@dataclass
class RawMethod:
    """The uint8 pixel baseline: stores the preprocessed image itself."""

    output_kind: str = "pixels"
    name: str = "raw"

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def validate(self, size: int) -> None:
        return None

    def sample_shape(self, size: int) -> tuple[int, ...]:
        return (3, size, size)

    def encode(self, images: np.ndarray, out_dtype: str | None = None) -> np.ndarray:
        return np.ascontiguousarray(images)

    def measure(self, images: np.ndarray, encoded: Any) -> None:
        return None


# The parameters each method takes from the command line / EncodeConfig: any other one given a
# value other than its default is refused by the caller (scatstore.pipelines.encode.options).
METHOD_OPTIONS = {"scat1": ("J", "L", "device"), "scat2": ("J", "L", "device"),
                  "raw": (), "cae": ("codec", "device")}


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def make_method(name: str, *, J: int = 3, L: int = 8, device: str = "cpu",
                backend: str = "torch", codec: str | None = None) -> EncodeMethod:
    """Build the encode method called ``name`` (one of :data:`METHODS`). ``ValueError`` for bad
    parameters (the transform's own limits: J in 1..8, L in 1..16) or a device this machine
    cannot use."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if name in ("scat1", "scat2"):
        from scatstore.transforms.scattering import _MAX_J, _MAX_L

        _check_int("J", J, 1, _MAX_J)
        _check_int("L", L, 1, _MAX_L)
    if name in ("scat1", "scat2", "cae"):
        from scatstore.devices import usable_device

        usable_device(device)
    if name in ("scat1", "scat2"):
        return ScatteringMethod(max_order=int(name[-1]), J=int(J), L=int(L), device=device,
                                backend=backend)
    if name == "raw":
        return RawMethod()
    if not codec:
        raise ValueError("method 'cae' needs a codec file (train one with `scatstore fit-codec`)")
    from scatstore.codecs import CaeMethod

    return CaeMethod(codec, device=device)
