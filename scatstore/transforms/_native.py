"""The native C backend of the scattering transform: the kernels of ``_cpu_kernels.c``, built
for the CPU's ISA level, the fixed table of which primitive runs in C on which level
(:data:`KERNEL_TABLE`, :func:`select_kernels`), and :class:`NativeOps`, the primitives of
:mod:`.core` on those kernels.

Built by :mod:`scatstore._cbuild` (compiler search, cache keyed by source/compiler/flags/CPU,
ctypes with typed signatures). When no compiler is found or the build fails, :func:`load`
returns ``None`` and the transform keeps its pure-torch path (same results, slower);
:func:`native_info` says which kernel runs for each primitive and why.

Environment: ``SCATSTORE_NATIVE=0`` disables the kernels; ``SCATSTORE_CACHE`` and ``CC`` as in
:mod:`scatstore._cbuild`.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

from scatstore import _cbuild
from scatstore._cbuild import cache_dir  # noqa: F401  (kept for callers)

from . import filters as fb

_SOURCE = Path(__file__).with_name("_cpu_kernels.c")
_BASE_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp-simd", "-std=gnu99"]


def build_flags(level: str | None = None) -> list[str]:
    """Compiler flags for the ISA level (default: :func:`scatstore._cbuild.isa_level`, the
    CPU's best or the lower one ``SCATSTORE_ISA`` names). Explicit levels, not -march=native:
    every CPU of a level runs the same code, and a machine always the same bytes."""
    return [*_BASE_FLAGS, *_cbuild.march_flags(level)]


_vp, _i64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "sc_prod_periodize": [_vp, _vp, _i64, _vp, _i64, _i64, _i64, _i64, _vp, _i64, _vp],
    "sc_modulus": [_vp, _i64, _i64, _vp, _vp, ctypes.c_float],
    "sc_fft2": [_vp, _i64, _i64, _i64, _vp, _i64, _vp, _vp, _i64, _vp, _i64, _vp],
    "sc_lowpass": [_vp, _i64, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _vp,
                   _vp],
    "sc_vector_floats": ([], _i64),
}

_LIB = _cbuild.NativeLibrary(_SOURCE, name="scatkern", flags=build_flags, signatures=_SIGNATURES,
                             what="fused CPU kernels",
                             fallback="the slower pure-torch path")


def load():
    """The kernel library (a ``ctypes.CDLL`` with typed functions), or ``None`` if unavailable."""
    return _LIB.load()


def native_info(geo=None) -> dict:
    """What runs on this CPU: ``available``, ``reason``, ``path`` and ``flags`` of the C kernel
    library, the ``isa`` level built for and why (``isa_reason``), its ``vector_bits``, and per
    primitive the kernel chosen (``kernels``: ``"native"`` or ``"torch"``) and why (``why``),
    for ``geo`` (a Geometry; default 224², J=3, whose grids the own FFT handles)."""
    info = _LIB.info()
    info["isa"] = _cbuild.isa_level()
    info["isa_reason"] = _cbuild.isa_level_reason()
    lib = _LIB.load()
    info["vector_bits"] = int(lib.sc_vector_floats()) * 32 if lib is not None else None
    if geo is None:
        from .geometry import Geometry

        geo = Geometry(224, 224, 3, 8, 1)
    info["kernels"], info["why"] = select_kernels(geo)
    return info


def _reset_for_tests() -> None:
    _LIB.reset()


# ---- the native C backend: tables of one geometry, and the primitives ------------------------
PRIMITIVES = ("fft", "prod_periodize", "modulus", "lowpass")


@functools.lru_cache(maxsize=64)
def fft_plan(n: int, inverse: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Radices and twiddle table of the C kernels' n-point Stockham FFT, or None when n has a
    prime factor other than 2, 3, 5 (torch's FFT is used then).

    Radix 4 first, then 2, 3, 5. For every pass after the first (span ``Ns`` = product of the
    radices before it), twiddles ``w = exp(∓2πi·jm·r / (Ns·R))`` for ``jm < Ns``, ``1 <= r < R``,
    stored as 4 floats ``(cos, cos, -sin, sin)`` (the kernel multiplies interleaved complex
    vectors by them without shuffling the twiddle); computed in float64.
    """
    radix, rest = [], n
    for r in (4, 2, 3, 5):
        while rest % r == 0:
            radix.append(r)
            rest //= r
    if rest != 1:
        return None
    sign = 1.0 if inverse else -1.0
    tw = []
    span = 1
    for R in radix:
        if span > 1:
            jm, r = np.meshgrid(np.arange(span), np.arange(1, R), indexing="ij")
            ang = sign * 2 * np.pi * jm * r / (span * R)
            c, si = np.cos(ang).ravel(), np.sin(ang).ravel()
            tw.append(np.stack([c, c, -si, si], axis=1).ravel())
        span *= R
    table = np.concatenate(tw) if tw else np.zeros(4)
    return np.asarray(radix, dtype=np.int32), np.ascontiguousarray(table, dtype=np.float32)


def _pair_bands(start: np.ndarray, coef: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Give rows 2i and 2i+1 of a band form one common window start (the kernel then loads each
    input vector once for both rows), by widening every window by the largest offset between
    the two starts of a pair and padding the coefficients with zeros. Kept only while the wider
    window costs less than the loads it saves (offset at most half the width)."""
    R, W = coef.shape
    if W >= n or R < 2:
        return start, coef
    pairs = np.arange(R // 2) * 2
    delta = (start[pairs + 1].astype(np.int64) - start[pairs]) % n
    d = int(delta.max())
    if d == 0:
        return start, coef
    if 2 * d > W or W + d > n:
        return start, coef
    new_start = start.astype(np.int64).copy()
    new_coef = np.zeros((R, W + d))
    new_coef[:, :W] = coef
    for p, dp in zip(pairs, delta):
        new_start[p + 1] = start[p]
        new_coef[p + 1] = 0.0
        new_coef[p + 1, dp:dp + W] = coef[p + 1]
    return new_start.astype(np.int32), new_coef


def _band(A: np.ndarray) -> tuple:
    start, coef = _pair_bands(*fb.band_rows(A), A.shape[1])
    return start, np.ascontiguousarray(coef, dtype=np.float32), coef.shape[1]


class NativeTables:
    """What the C primitives of one geometry read: float32 filters and their significant boxes,
    FFT plans, low-pass matrices in band form (built only for the primitives selected)."""

    def __init__(self, geo, psi1: list[np.ndarray], psi2: dict, kernels: dict[str, str]):
        g = geo
        self.kernels = kernels
        self.out_offsets: dict = {}  # output offsets of the low-pass, per (maps, channels)
        if kernels["prod_periodize"] == "native":
            self.psi1 = [np.ascontiguousarray(f, dtype=np.float32) for f in psi1]
            self.psi2 = {k: np.ascontiguousarray(f, dtype=np.float32) for k, f in psi2.items()}
            self.boxes1 = [fb.significant_boxes(f, 2**j1) for j1, f in enumerate(psi1)]
            self.boxes2 = {k: fb.significant_boxes(f, 2 ** (k[1] - k[0]))
                           for k, f in psi2.items()}
        self.fft = {}
        if kernels["fft"] == "native":
            sizes = {n for res in range(g.J) for n in g.grid(res)}
            self.fft = {(n, inv): fft_plan(n, inv) for n in sizes for inv in (False, True)}
        if kernels["lowpass"] == "native":
            self.lp = []
            for res in range(g.J):
                A, B = fb.lowpass_matrices(g.Mp, g.Np, g.J, res)
                self.lp.append((*_band(A), *_band(B)))
            # order 0 on the unpadded input: the reflection padding is folded into the bands
            A0, B0 = fb.order0_lowpass_matrices(g.M, g.N, g.J)
            self.lp0 = (*_band(A0), *_band(B0))


def own_fft_fits(geo) -> bool:
    """Whether every grid size of the geometry is 2^a 3^b 5^c (the kernels' own FFT)."""
    return all(fft_plan(n, False) is not None for r in range(geo.J) for n in geo.grid(r))


def select_kernels(geo, level: str | None = None, forced: dict[str, str] | None = None
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """Per primitive: which kernel runs (``"native"`` or ``"torch"``) and why, for this CPU and
    geometry (float32 on CPU); ``forced`` overrides the table per primitive. Decided from the CPU's ISA level by :data:`KERNEL_TABLE` (never
    by timing), and the kernels' own limits (own FFT: 2^a 3^b 5^c sizes)."""
    lib = load()
    kernels, why = {}, {}
    if lib is None:
        reason = _LIB.info()["reason"]
        return ({p: "torch" for p in PRIMITIVES}, {p: f"C kernels unavailable: {reason}"
                                                   for p in PRIMITIVES})
    level = level or _cbuild.isa_level()
    row = KERNEL_TABLE.get(level, KERNEL_TABLE["generic"])
    for p in PRIMITIVES:
        kernels[p], why[p] = row[p]
        why[p] = f"{level}: {why[p]}"
    for p, k in (forced or {}).items():  # benchmarks and tests compare kernels this way
        kernels[p], why[p] = k, "forced"
    if kernels["fft"] == "native" and not own_fft_fits(geo):
        kernels["fft"], why["fft"] = "torch", "grid sizes not 2^a 3^b 5^c (own FFT)"
    return kernels, why


# primitive -> (kernel, why) per ISA level: a fixed table, filled from
# benchmarks/scattering_kernels.py (224², J=3, one pipeline; docs/scattering.md has the figures).
# A C kernel is listed for a level only where it beat the torch primitive there, by a margin.
_C, _T = "native", "torch"
KERNEL_TABLE: dict[str, dict[str, tuple[str, str]]] = {
    # 512-bit vectors: every kernel 1.2-3x faster than torch (measured on a 2-core AMD EPYC VM)
    "x86-64-v4": {"fft": (_C, "own FFT 1.9-2.2x torch's (measured)"),
                  "prod_periodize": (_C, "2.0-2.4x torch (measured)"),
                  "modulus": (_C, "2.7-3.1x torch (measured)"),
                  "lowpass": (_C, "1.1-2.0x torch (measured)")},
    # 256-bit vectors, 12 live registers of 16 (the -march=x86-64-v3 build, measured on the same
    # CPU: the AVX2 code path; real AVX2-only CPUs were not at hand)
    "x86-64-v3": {"fft": (_C, "own FFT 1.6-2.0x torch's (measured, v3 build)"),
                  "prod_periodize": (_C, "1.8-2.4x torch (measured, v3 build)"),
                  "modulus": (_C, "2.8-3.1x torch (measured, v3 build)"),
                  "lowpass": (_C, "1.1-2.0x torch (measured, v3 build)")},
    # 128-bit vectors (SSE4): the own FFT and the banded low-pass lose to torch (MKL, BLAS)
    "x86-64-v2": {"fft": (_T, "own FFT 0.86-0.92x torch's at 128 bits (measured): torch"),
                  "prod_periodize": (_C, "1.35-1.9x torch (measured, v2 build)"),
                  "modulus": (_C, "1.8-2.3x torch (measured, v2 build)"),
                  "lowpass": (_T, "0.67-1.1x torch at 128 bits (measured): torch")},
}
# baseline x86-64 (SSE2) has the same 128-bit vectors as v2; aarch64 NEON and SVE (the kernels
# use fixed 128-bit NEON vectors there) are taken like the 128-bit x86 build: not timed on
# aarch64 hardware (only tested for correctness under qemu), so the conservative choice.
_NARROW = {p: (k, why.replace("(measured", "(as the 128-bit x86-64-v2 build, measured")
               .replace("v2 build", "")) for p, (k, why) in KERNEL_TABLE["x86-64-v2"].items()}
for _lvl in ("generic", "aarch64-neon", "aarch64-sve"):
    KERNEL_TABLE[_lvl] = dict(_NARROW)


def _offsets(t, floats_per_elem: int) -> np.ndarray:
    """Offsets (in floats, from t.data_ptr()) of every (m, k) map of t (..., m, k), each map
    contiguous; cached by shape and strides."""
    key = (tuple(t.shape[:-2]), tuple(t.stride()[:-2]), floats_per_elem)
    off = _OFFSETS.get(key)
    if off is None:
        off = np.zeros((), dtype=np.int64)
        for size, stride in zip(t.shape[:-2], t.stride()[:-2]):
            off = off[..., None] + np.arange(size, dtype=np.int64) * stride
        off = _OFFSETS[key] = np.ascontiguousarray(off.reshape(-1) * floats_per_elem)
    return off


_OFFSETS: dict = {}


class NativeOps:
    """The primitives of :mod:`.core` with the C kernels, for those :func:`select_kernels`
    chose; the others are the torch ones (``fallback``, a ``_torch_backend.TorchOps`` on the
    same plan and workspace). float32 on CPU; ``out`` float32 and contiguous."""

    def __init__(self, plan, fallback):
        self.plan, self.geo, self.fb = plan, plan.geo, fallback
        self.group = fallback.group
        self.lib = plan.native
        t = self.tables = plan.native_tables
        self.pad = fallback.pad
        self._buf = fallback._buf
        for name in PRIMITIVES:
            native = t.kernels[name] == "native"
            if name == "fft":
                self.fft2 = self._fft2 if native else fallback.fft2
                self.ifft2 = self._ifft2 if native else fallback.ifft2
            else:
                setattr(self, name, getattr(self, "_" + name) if native
                        else getattr(fallback, name))

    def _c_fft(self, Z, inverse: bool) -> None:
        m, k = Z.shape[-2:]
        rm, tm = self.tables.fft[(m, inverse)]
        rk, tk = self.tables.fft[(k, inverse)]
        work = self._buf("fftwork", (2 * 16 * max(self.geo.Mp, self.geo.Np),), torch.float32)
        self.lib.sc_fft2(Z.data_ptr(), Z.numel() // (m * k), m, k, rm.ctypes.data, len(rm),
                         tm.ctypes.data, rk.ctypes.data, len(rk), tk.ctypes.data, int(inverse),
                         work.data_ptr())

    def _fft2(self, r, role: str):
        Z = self._buf(role, r.shape, torch.complex64)
        Zr = torch.view_as_real(Z)
        Zr[..., 0].copy_(r)
        Zr[..., 1].zero_()
        self._c_fft(Z, False)
        return Z

    def _ifft2(self, Z):
        """In place, unnormalised: the modulus applies the 1/(m k)."""
        self._c_fft(Z, True)
        m, k = Z.shape[-2:]
        return Z, 1.0 / (m * k)

    def _prod_periodize(self, U, filt, l0: int, nl: int, role: str):
        t = self.tables
        if len(filt) == 1:
            F, boxes, s = t.psi1[filt[0]], t.boxes1[filt[0]], 2 ** filt[0]
        else:
            F, boxes, s = t.psi2[filt], t.boxes2[filt], 2 ** (filt[1] - filt[0])
        M, N = U.shape[-2:]
        Z = self._buf(role, (*U.shape[:-2], nl, M // s, N // s), torch.complex64)
        u_off = _offsets(U, 2)
        self.lib.sc_prod_periodize(U.data_ptr(), u_off.ctypes.data, len(u_off),
                                   F.ctypes.data + l0 * M * N * 4, nl, M, N, s,
                                   boxes[l0:].ctypes.data, boxes.shape[1], Z.data_ptr())
        return Z

    def _modulus(self, W, scale: float, dest, at: int, role: str):
        lead, (m, k) = W.shape[:-3], W.shape[-2:]
        nl, L = W.shape[-3], self.geo.L
        if dest is None:
            dest = self._buf(role, (*lead, L, m, k), torch.float32)
        target = dest.narrow(-3, at, nl)
        off = _offsets(target, 1)
        self.lib.sc_modulus(W.data_ptr(), len(off), m * k, target.data_ptr(), off.ctypes.data,
                            float(scale))
        return dest

    def _lowpass(self, U, res: int, out, channels):
        g, t = self.geo, self.tables
        m, k = U.shape[-2:]
        ra, ca, wa, rb, cb, wb = t.lp[res] if res >= 0 else t.lp0
        n = out.shape[0]
        # channels: the geometry's cached arrays (alive as long as the plan): keyed by identity
        key = (n, id(channels))
        off = t.out_offsets.get(key)
        if off is None:
            off = (np.arange(n, dtype=np.int64).reshape(n, *([1] * channels.ndim)) * g.K
                   + channels) * (g.Mo * g.No)
            off = t.out_offsets[key] = np.ascontiguousarray(off.reshape(-1))
        T = self._buf("lpwork", (g.Mo * g.Np + (g.Np + g.No) * (-(-g.Mo // 16) * 16),),
                      torch.float32)
        self.lib.sc_lowpass(U.data_ptr(), len(off), m, k, ra.ctypes.data, ca.ctypes.data, g.Mo,
                            wa, rb.ctypes.data, cb.ctypes.data, g.No, wb, T.data_ptr(),
                            out.data_ptr(), off.ctypes.data)
