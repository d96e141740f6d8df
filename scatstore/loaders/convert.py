"""Stored dtype -> model input on the CPU: the loader's conversion kernels and their fallback.

``_convert.c`` is compiled by :mod:`scatstore._cbuild` for the ISA level the CPU's features
allow (:func:`scatstore._cbuild.isa_level`: AVX-512F ``vcvtph2ps zmm`` on x86-64-v4, F16C/AVX2 on
x86-64-v3, NEON ``fcvtl`` on aarch64, a branch-free integer routine elsewhere) and loaded with
ctypes, whose calls release the GIL: the loader runs the conversion of one batch in pieces on
its reader threads. The choice depends only on the CPU's features (or ``SCATSTORE_ISA``, which
may name a *lower* level, e.g. ``x86-64-v3`` to time the AVX2 build on an AVX-512 machine),
never on timing; :func:`kernel_info` says which kernel runs and why.

Without a compiler (or with ``SCATSTORE_NATIVE=0`` / ``SCATSTORE_CONVERT=torch``) the same
functions run torch ops in pieces below torch's parallel grain (no OpenMP threads beside the
loader's own), giving the same values: float16 -> float32 is exact either way, and the uint8
kernels compute in float32 in the order :func:`scatstore.transforms.quantize.dequantize_uint8`
states (built without fused multiply-add), so all paths agree bit for bit.

Functions (``src``/``dst`` are contiguous CPU tensors; ``dst`` float32 with ``src.numel()``
elements):

- :func:`f16_to_f32` (src float16; the generic build leaves this one to torch, see
  :func:`f16_kernel`)
- :func:`dequantize_into` (src uint8 ``(n, maps, h, w)``-like, per-map ``qscale``/``qoffset``
  float32 ``(n, maps)``; scheme ``affine`` or ``sqrt``)
- :func:`normalize_pixels_into` (src uint8 ``(n, C, H, W)``; ``(x/255 - mean[c]) / std[c]``)
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from scatstore import _cbuild

_SOURCE = Path(__file__).with_name("_convert.c")
_vp, _i64, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "cv_kernel": ([], ctypes.c_char_p),
    "cv_f16_to_f32": [_vp, _vp, _i64],
    "cv_gather_f16_to_f32": [_vp, _vp, _vp, _i64, _i64],
    "cv_gather_copy": [_vp, _vp, _vp, _i64, _i64],
    "cv_u8_affine": [_vp, _vp, _vp, _vp, _i64, _i64],
    "cv_u8_sqrt": [_vp, _vp, _vp, _vp, _i64, _i64],
    "cv_u8_norm": [_vp, _vp, _f, _vp, _vp, _i64, _i64],
}
# -ffp-contract=off: the uint8 kernels must not fuse q*a + b into one FMA (bit-exact with torch)
_BASE_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-std=gnu99"]
_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller torch ops run on the calling thread only


def _flags(level: str | None = None) -> list[str]:
    return [*_BASE_FLAGS, *_cbuild.march_flags(level)]


def library_for(level: str | None = None) -> _cbuild.NativeLibrary:
    """A (lazily built) conversion library for ISA ``level`` (default: the CPU's, see module doc).
    Benchmarks build lower levels side by side with it."""
    return _cbuild.NativeLibrary(_SOURCE, name=f"scatconv-{level or 'auto'}",
                                 flags=lambda: _flags(level), signatures=_SIGNATURES,
                                 what="loader conversion kernels",
                                 fallback="torch conversion (slower)")


_DEFAULT = library_for(None)
_LIB = _DEFAULT


def _forced() -> str:
    return os.environ.get("SCATSTORE_CONVERT", "").strip().lower()


def load():
    """The conversion library, or ``None`` (no compiler, disabled, ``SCATSTORE_CONVERT=torch``)."""
    if _forced() == "torch" or _LIB is None:
        return None
    return _LIB.load()


def select(level: str | None = None, *, use_torch: bool = False) -> None:
    """For benchmarks: convert with the build for ISA ``level`` (e.g. ``"x86-64-v3"`` on an
    AVX-512 machine), or with torch (``use_torch=True``), from now on; ``select()`` goes back to
    the CPU's own choice. Every choice gives the same values."""
    global _LIB
    _LIB = None if use_torch else (_DEFAULT if level is None else library_for(level))


def kernel_info() -> dict:
    """``{"kernel", "isa", "why", "available", "path", "f16_to_f32", "uint8"}``: which build
    converts batches on this CPU and why, and what runs each conversion."""
    if _forced() == "torch" or _LIB is None:
        return {"kernel": "torch", "isa": None, "available": False, "path": None,
                "why": "SCATSTORE_CONVERT=torch" if _forced() == "torch" else "selected",
                "f16_to_f32": "torch", "uint8": "torch"}
    info = _LIB.info()
    if not info["available"]:
        return {"kernel": "torch", "isa": None, "available": False, "path": None,
                "why": f"C kernels unavailable: {info['reason']}", "f16_to_f32": "torch",
                "uint8": "torch"}
    lib = _LIB.load()
    level = next((f.split("=", 1)[1] for f in info["flags"] if f.startswith("-march=")), "generic")
    why = _cbuild.isa_level_reason() if _LIB is _DEFAULT else "selected for a benchmark"
    name = lib.cv_kernel().decode()
    return {"kernel": name, "isa": level, "available": True, "path": info["path"], "why": why,
            "f16_to_f32": name if f16_kernel(lib) else "torch (the generic build is slower)",
            "uint8": f"C loop auto-vectorised for {level}"}


def kernel_name() -> str:
    return kernel_info()["kernel"]


def _reset_for_tests() -> None:
    select()
    _DEFAULT.reset()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(src: torch.Tensor, dst: torch.Tensor, sdt: torch.dtype) -> None:
    if src.dtype != sdt or dst.dtype != torch.float32:
        raise TypeError(f"expected {sdt} -> float32, got {src.dtype} -> {dst.dtype}")
    if src.device.type != "cpu" or dst.device.type != "cpu":
        raise ValueError("the CPU conversion kernels take CPU tensors")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("src and dst must be contiguous")
    if src.numel() != dst.numel():
        raise ValueError(f"src has {src.numel()} elements, dst {dst.numel()}")


def _torch_pieces(dst: torch.Tensor, src: torch.Tensor, fn) -> None:
    d, s = dst.reshape(-1), src.reshape(-1)
    for a in range(0, d.numel(), _GRAIN):
        fn(d[a:a + _GRAIN], s[a:a + _GRAIN])


def f16_kernel(lib) -> bool:
    """Whether ``lib`` converts float16 with a vector instruction (F16C, AVX-512F, NEON). Its
    generic integer routine is slower than torch's own conversion (measured: ~5k against ~30k
    samples/s per batch of 256 scat1 samples), so without one torch converts: a rule on the
    build, never a timing."""
    return lib is not None and not lib.cv_kernel().startswith(b"generic")


def f16_to_f32(src: torch.Tensor, dst: torch.Tensor, lib=None) -> None:
    """``dst[:] = src`` (float16 -> float32, exact)."""
    _check(src, dst, torch.float16)
    lib = load() if lib is None else lib
    if f16_kernel(lib):
        lib.cv_f16_to_f32(_ptr(src), _ptr(dst), src.numel())
    else:
        _torch_pieces(dst, src, lambda d, s: d.copy_(s))


def _gather(fn, base: int, src_off, dst_addrs, size: int) -> None:
    import numpy as np

    off = np.ascontiguousarray(src_off, dtype=np.int64)
    dst = np.ascontiguousarray(dst_addrs, dtype=np.int64)
    if len(off) != len(dst):
        raise ValueError("src_off and dst_addrs differ in length")
    if len(off):
        fn(base, off.ctypes.data, dst.ctypes.data, len(off), int(size))


def gather_f16_to_f32(base: int, src_off, dst_addrs, elems: int, lib=None) -> bool:
    """Convert ``len(src_off)`` float16 samples of ``elems`` values at ``base + src_off[k]`` into
    the float32 rows at addresses ``dst_addrs[k]`` (int64 arrays); the bulk readers' converting
    read. Returns False (nothing done) without a vector float16 kernel: the caller then reads
    the stored dtype and converts afterwards. The caller keeps every address valid."""
    lib = load() if lib is None else lib
    if not f16_kernel(lib):
        return False
    _gather(lib.cv_gather_f16_to_f32, base, src_off, dst_addrs, elems)
    return True


def gather_f16_copy(base: int, src_off, dst_addrs, elems: int, lib=None) -> bool:
    """Like :func:`gather_f16_to_f32` but the float16 values are copied as they are (``2 *
    elems`` bytes per sample); the mapped read of float16 output. False without the library."""
    lib = load() if lib is None else lib
    if lib is None:
        return False
    _gather(lib.cv_gather_copy, base, src_off, dst_addrs, 2 * int(elems))
    return True


def can_copy() -> bool:
    """Whether :func:`gather_f16_copy` runs here (the library is built)."""
    return load() is not None


def can_gather() -> bool:
    """Whether :func:`gather_f16_to_f32` converts on this machine (a vector kernel is built)."""
    return f16_kernel(load())


def _maps(src: torch.Tensor, a: torch.Tensor) -> tuple[int, int]:
    n_maps = a.numel()
    if n_maps == 0 or src.numel() % n_maps:
        raise ValueError(f"{src.numel()} values do not split into {n_maps} maps")
    return n_maps, src.numel() // n_maps


def dequantize_into(src: torch.Tensor, dst: torch.Tensor, qscale: torch.Tensor,
                    qoffset: torch.Tensor, scheme: str = "affine", lib=None) -> None:
    """``dst`` = dequantized ``src`` (see :func:`scatstore.transforms.quantize.dequantize_uint8`);
    ``qscale``/``qoffset``: float32, one value per map, in the maps' order."""
    _check(src, dst, torch.uint8)
    a = qscale.to(torch.float32).contiguous()
    b = qoffset.to(torch.float32).contiguous()
    n_maps, map_len = _maps(src, a)
    if b.numel() != n_maps:
        raise ValueError("qscale and qoffset differ in size")
    if scheme not in ("affine", "sqrt"):
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    lib = load() if lib is None else lib
    if lib is not None:
        fn = lib.cv_u8_affine if scheme == "affine" else lib.cv_u8_sqrt
        fn(_ptr(src), _ptr(dst), _ptr(a), _ptr(b), n_maps, map_len)
        return
    d = dst.view(n_maps, map_len)
    d.copy_(src.view(n_maps, map_len))
    d.mul_(a.view(n_maps, 1))
    if scheme == "sqrt":
        d.mul_(d)
    d.add_(b.view(n_maps, 1))


def normalize_pixels_into(src: torch.Tensor, dst: torch.Tensor, mean=None, std=None,
                          lib=None) -> None:
    """``dst = (src / 255 - mean[c]) / std[c]`` for uint8 ``src`` ``(n, C, H, W)`` (computed as
    ``src * (1/255)``, then ``- mean``, then ``/ std``, in float32); without ``mean``/``std``
    only the scaling to [0, 1]."""
    _check(src, dst, torch.uint8)
    n, C = int(src.shape[0]), int(src.shape[1])
    m = torch.zeros(C) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    s = torch.ones(C) if std is None else torch.as_tensor(std, dtype=torch.float32)
    b = m.reshape(1, C).expand(n, C).contiguous()
    c = s.reshape(1, C).expand(n, C).contiguous()
    n_maps, map_len = _maps(src, b)
    lib = load() if lib is None else lib
    if lib is not None:
        lib.cv_u8_norm(_ptr(src), _ptr(dst), 1.0 / 255.0, _ptr(b), _ptr(c), n_maps, map_len)
        return
    d = dst.view(n_maps, map_len)
    d.copy_(src.view(n_maps, map_len))
    d.mul_(1.0 / 255.0)
    if mean is not None or std is not None:
        d.sub_(b.view(n_maps, 1)).div_(c.view(n_maps, 1))
