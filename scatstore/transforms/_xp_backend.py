"""Array-API style backend of the scattering transform: the primitives of :mod:`.core` for
NumPy and CuPy arrays (the cascade itself is :func:`.core.scatter`, shared with the torch and
native backends; what each primitive computes is described in :mod:`._torch_backend`). Only namespace functions common to NumPy and CuPy are used (``xp.fft``, ``xp.matmul``,
``xp.take``, ``xp.abs``, ``xp.sqrt``, ``xp.isfinite``, ``xp.asarray``), through the tiny shim
:func:`get_namespace` (no ``array-api-compat`` dependency).

With CuPy, two fused kernels replace chains of elementwise operations:

* ``product + alias sum``: one thread per output frequency multiplies the spectrum by the real
  filter over the ``s x s`` aliased blocks and accumulates (one read of each input, no
  full-resolution temporary);
* the modulus ``sqrt(re^2 + im^2)`` in one pass.

CuPy is optional (``pip install scatstore[gpu]``); this module imports without it.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from . import filters as fb
from .core import scatter
from .geometry import Geometry

try:  # optional dependency
    import cupy as _cupy  # type: ignore
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None


def cupy_available() -> bool:
    return _cupy is not None


def get_namespace(x: Any):
    """NumPy or CuPy module of an array (tiny local version of ``array_api_compat``)."""
    if isinstance(x, np.ndarray):
        return np
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    raise TypeError(f"expected a numpy.ndarray or cupy.ndarray, got {type(x).__name__}")


# ---- CuPy fused kernels (built lazily) ---------------------------------------------------------
_KERNELS: dict[str, Any] = {}


def _cupy_kernels():
    if not _KERNELS:
        cp = _cupy
        # Y[b, l, i, j] = sum_{a, c} U[b, a*m + i, c*k + j] * F[l, a*m + i, c*k + j]
        # U: complex (nb, M, N); F: real (L, M, N); Y: complex (nb, L, m, k)
        _KERNELS["filter_periodize"] = cp.ElementwiseKernel(
            "raw T U, raw R F, int32 L, int32 M, int32 N, int32 s",
            "T Y",
            """
            const int m = M / s, k = N / s;
            const int j = i % k;
            const int ii = (i / k) % m;
            const int l = (i / (k * m)) % L;
            const long long b = i / ((long long)k * m * L);
            const T* u = &U[b * (long long)M * N];
            const R* f = &F[(long long)l * M * N];
            T acc = T(0, 0);
            for (int a = 0; a < s; ++a) {
                for (int c = 0; c < s; ++c) {
                    const long long p = (long long)(a * m + ii) * N + (c * k + j);
                    acc += u[p] * f[p];
                }
            }
            Y = acc;
            """,
            "scatstore_filter_periodize",
        )
        _KERNELS["modulus"] = cp.ElementwiseKernel(
            "T z", "R r", "r = sqrt(z.real() * z.real() + z.imag() * z.imag())",
            "scatstore_modulus",
        )
    return _KERNELS


class XpPlan:
    """Filters and matrices of one geometry in one namespace / dtype (and CuPy device)."""

    def __init__(self, geo: Geometry, xp, dtype):
        self.geo, self.xp, self.dtype = geo, xp, np.dtype(dtype)
        self.cdtype = np.dtype(np.complex128 if self.dtype == np.float64 else np.complex64)
        self.fused = xp is _cupy and _cupy is not None
        g = geo
        J, L = g.J, g.L

        def arr(a):
            return xp.asarray(np.ascontiguousarray(a, dtype=self.dtype))

        psi = fb.wavelet_bank(g.Mp, g.Np, J, L)
        self.psi1 = [arr(psi[j1] / 4.0**j1) for j1 in range(J)]
        self.blocks1 = [fb.significant_blocks(psi[j1], 2**j1) for j1 in range(J)]
        self.blocks2 = {}
        self.psi2 = {}
        if g.max_order == 2:
            for j1 in range(J - 1):
                for j2 in range(j1 + 1, J):
                    f = fb.periodize_filter_fft(psi[j2], j1) / 4.0 ** (j2 - j1)
                    self.psi2[(j1, j2)] = arr(f)
                    self.blocks2[(j1, j2)] = fb.significant_blocks(f, 2 ** (j2 - j1))
        self.lp = []
        for res in range(J):
            A, B = fb.lowpass_matrices(g.Mp, g.Np, J, res)
            self.lp.append((arr(A), arr(B.T)))
        A0, B0 = fb.order0_lowpass_matrices(g.M, g.N, J)
        self.lp0 = (arr(A0), arr(B0.T))
        top, bottom, left, right = g.pads
        self.rows = xp.asarray(fb.reflect_index(g.M, top, bottom))
        self.cols = xp.asarray(fb.reflect_index(g.N, left, right))

    def forward_chunk(self, x, out, theta_block: int) -> None:
        """x: (n, M, N) real in self.dtype; out: (n, K, Mo, No) to fill."""
        scatter(XpOps(self), x, out, theta_block)


class XpOps:
    """The primitives of :mod:`.core` for NumPy / CuPy arrays (see there for the contracts);
    every result is a new array."""

    def __init__(self, plan: XpPlan):
        self.plan, self.geo, self.xp = plan, plan.geo, plan.xp
        self.group = plan.geo.L

    def pad(self, x):
        xp, p = self.xp, self.plan
        return xp.take(xp.take(x, p.rows, axis=1), p.cols, axis=2)

    def fft2(self, r, role: str):
        return self.xp.fft.fft2(r.astype(self.plan.cdtype))

    def ifft2(self, Z):
        return self.xp.fft.ifft2(Z), 1.0

    def prod_periodize(self, U, filt, l0: int, nl: int, role: str):
        """sum over the s x s aliased blocks of U[..., None, :, :] * F (the 1/s^2 is in F)."""
        xp, p = self.xp, self.plan
        if len(filt) == 1:
            F, blocks, s = p.psi1[filt[0]], p.blocks1[filt[0]], 2 ** filt[0]
        else:
            F, blocks, s = p.psi2[filt], p.blocks2[filt], 2 ** (filt[1] - filt[0])
        F = F[l0:l0 + nl]
        lead = U.shape[:-2]
        M, N = U.shape[-2:]
        m, k = M // s, N // s
        if p.fused:
            Uc = xp.ascontiguousarray(U).reshape(-1, M, N)
            Y = xp.empty((Uc.shape[0], nl, m, k), dtype=U.dtype)
            _cupy_kernels()["filter_periodize"](Uc, xp.ascontiguousarray(F), np.int32(nl),
                                                np.int32(M), np.int32(N), np.int32(s), Y)
            return Y.reshape(*lead, nl, m, k)
        Ue = U[..., None, :, :]
        if s == 1:
            return Ue * F
        Ub = Ue.reshape(*lead, 1, s, m, s, k)
        Fb = F.reshape(nl, s, m, s, k)
        (a, b), rest = blocks[0], blocks[1:]
        out = Ub[..., a, :, b, :] * Fb[..., a, :, b, :]
        for a, b in rest:
            out += Ub[..., a, :, b, :] * Fb[..., a, :, b, :]
        return out

    def modulus(self, W, scale: float, dest, at: int, role: str):
        xp = self.xp
        if self.plan.fused:
            r = xp.empty(W.shape, dtype=self.plan.dtype)
            _cupy_kernels()["modulus"](W, r)
        else:
            r = xp.sqrt(W.real * W.real + W.imag * W.imag)
        if scale != 1.0:
            r *= scale
        nl, L = W.shape[-3], self.geo.L
        if dest is None and nl == L:
            return r
        if dest is None:
            dest = xp.empty((*W.shape[:-3], L, *W.shape[-2:]), dtype=r.dtype)
        dest[..., at:at + nl, :, :] = r
        return dest

    def lowpass(self, U, res: int, out, channels):
        xp, p = self.xp, self.plan
        A, Bt = p.lp[res] if res >= 0 else p.lp0
        S = xp.matmul(xp.matmul(A, U), Bt)
        if channels.ndim == 0:
            out[:, int(channels)] = S
        else:
            out[:, xp.asarray(channels)] = S


_PLANS: dict[tuple, XpPlan] = {}
_LOCK = threading.Lock()


def get_plan(geo: Geometry, xp, dtype) -> XpPlan:
    dev = ""
    if xp is _cupy and _cupy is not None:
        dev = str(_cupy.cuda.Device().id)
    key = (geo.M, geo.N, geo.J, geo.L, geo.max_order, xp.__name__, dev, np.dtype(dtype).str)
    with _LOCK:
        plan = _PLANS.pop(key, None)
        if plan is None:
            plan = XpPlan(geo, xp, dtype)
        _PLANS[key] = plan
        while len(_PLANS) > 16:
            _PLANS.pop(next(iter(_PLANS)))
    return plan
