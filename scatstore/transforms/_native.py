"""Build and load the fused CPU kernels (``_cpu_kernels.c``) with the machine's C compiler.

Built by :mod:`scatstore._cbuild` (compiler search, cache keyed by source/compiler/flags/CPU,
ctypes with typed signatures). When no compiler is found or the build fails, :func:`load`
returns ``None`` and the transform keeps its pure-torch path (same results, slower);
:func:`native_info` says which path is in use and why.

Environment: ``SCATSTORE_NATIVE=0`` disables the kernels; ``SCATSTORE_CACHE`` and ``CC`` as in
:mod:`scatstore._cbuild`.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from scatstore import _cbuild
from scatstore._cbuild import cache_dir  # noqa: F401  (kept for callers)

_SOURCE = Path(__file__).with_name("_cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp-simd",
          "-std=gnu99"]

_vp, _i64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "sc_prod_periodize": [_vp, _vp, _i64, _vp, _i64, _i64, _i64, _i64, _vp, _i64, _vp],
    "sc_modulus": [_vp, _i64, _i64, _vp, _vp, ctypes.c_float],
    "sc_fft2": [_vp, _i64, _i64, _i64, _vp, _i64, _vp, _vp, _i64, _vp, _i64, _vp],
    "sc_lowpass": [_vp, _i64, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _vp,
                   _vp],
}

_LIB = _cbuild.NativeLibrary(_SOURCE, name="scatkern", flags=_FLAGS, signatures=_SIGNATURES,
                             what="fused CPU kernels",
                             fallback="the slower pure-torch path")


def load():
    """The kernel library (a ``ctypes.CDLL`` with typed functions), or ``None`` if unavailable."""
    return _LIB.load()


def native_info() -> dict:
    """``{"available": bool, "reason": str, "path": str | None, ...}`` for the fused kernels."""
    info = _LIB.info()
    info["isa"] = _cbuild.isa_level()
    return info


def _reset_for_tests() -> None:
    _LIB.reset()
