"""Array-API style implementation of the scattering transform: NumPy and CuPy share this code.

The algorithm is the one of :mod:`scatstore.transforms._torch_backend` (read its docstring):
one FFT of the padded input, per scale the L wavelet products fused with kymatio's Fourier
subsampling, a batched inverse FFT, the modulus, and the separable low-pass as two dense matrix
products. Only namespace functions common to NumPy and CuPy are used (``xp.fft``, ``xp.matmul``,
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
from ._torch_backend import Geometry

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

    # ---- building blocks -------------------------------------------------------------------
    def _filter_periodize(self, U, F, s: int, blocks):
        """mean over s x s aliased blocks of U[..., None, :, :] * F; U (n, [e,] M, N)."""
        xp = self.xp
        lead = U.shape[:-2]
        M, N = U.shape[-2:]
        Lf = F.shape[0]
        m, k = M // s, N // s
        if self.fused:
            Uc = xp.ascontiguousarray(U).reshape(-1, M, N)
            Y = xp.empty((Uc.shape[0], Lf, m, k), dtype=U.dtype)
            _cupy_kernels()["filter_periodize"](Uc, F, np.int32(Lf), np.int32(M), np.int32(N),
                                                np.int32(s), Y)
            return Y.reshape(*lead, Lf, m, k)
        Ue = U[..., None, :, :]
        if s == 1:
            return Ue * F
        Ub = Ue.reshape(*lead, 1, s, m, s, k)
        Fb = F.reshape(Lf, s, m, s, k)
        (a, b), rest = blocks[0], blocks[1:]
        out = Ub[..., a, :, b, :] * Fb[..., a, :, b, :]
        for a, b in rest:
            out += Ub[..., a, :, b, :] * Fb[..., a, :, b, :]
        return out

    def _modulus(self, W):
        if self.fused:
            r = self.xp.empty(W.shape, dtype=self.dtype)
            _cupy_kernels()["modulus"](W, r)
            return r
        xp = self.xp
        return xp.sqrt(W.real * W.real + W.imag * W.imag)

    def _lowpass(self, U, res: int):
        A, Bt = self.lp[res]
        xp = self.xp
        return xp.matmul(xp.matmul(A, U), Bt)

    def forward_chunk(self, x, out, theta_block: int) -> None:
        """x: (n, M, N) real in self.dtype; out: (n, K, Mo, No) to fill."""
        xp = self.xp
        g = self.geo
        J, L = g.J, g.L
        A0, B0t = self.lp0
        out[:, 0] = xp.matmul(xp.matmul(A0, x), B0t)
        xpad = xp.take(xp.take(x, self.rows, axis=1), self.cols, axis=2)
        U0 = xp.fft.fft2(xpad.astype(self.cdtype))
        del xpad
        for j1 in range(J):
            Z = self._filter_periodize(U0, self.psi1[j1], 2**j1, self.blocks1[j1])
            U1 = self._modulus(xp.fft.ifft2(Z))
            del Z
            out[:, 1 + j1 * L:1 + (j1 + 1) * L] = self._lowpass(U1, j1)
            if g.max_order < 2 or j1 == J - 1:
                continue
            V = xp.fft.fft2(U1.astype(self.cdtype))
            del U1
            nj2 = J - 1 - j1
            n = x.shape[0]
            o2 = out[:, g.off2[j1]:g.off2[j1] + L * L * nj2].reshape(
                n, L, nj2, L, g.Mo, g.No)
            for t0 in range(0, L, theta_block):
                Vb = V[:, t0:t0 + theta_block]
                for j2 in range(j1 + 1, J):
                    Z2 = self._filter_periodize(Vb, self.psi2[(j1, j2)], 2 ** (j2 - j1),
                                                self.blocks2[(j1, j2)])
                    U2 = self._modulus(xp.fft.ifft2(Z2))
                    del Z2
                    o2[:, t0:t0 + theta_block, j2 - j1 - 1] = self._lowpass(U2, j2)


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


class XpFront:
    """Validation, chunking and output allocation for ``backend="numpy"`` / ``"cupy"``."""

    def __init__(self, S, out_dtype: Any):
        self.S = S
        if S.backend == "cupy" and _cupy is None:
            raise ImportError("backend='cupy' needs CuPy: pip install 'scatstore[gpu]'")
        self.xp = np if S.backend == "numpy" else _cupy
        if out_dtype is not None:
            try:
                out_dtype = np.dtype(out_dtype)
            except TypeError:
                raise ValueError(f"out_dtype {out_dtype!r} is not a NumPy dtype (bfloat16 is "
                                 f"only available with backend='torch')") from None
            if out_dtype.kind != "f":
                raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
        self.out_dtype = out_dtype

    def __call__(self, x):
        from .scattering import _validate_shape

        S = self.S
        xp = self.xp
        if not isinstance(x, (np.ndarray if xp is np else _cupy.ndarray)):
            raise TypeError(f"backend={S.backend!r} takes a {xp.__name__}.ndarray, "
                            f"got {type(x).__name__}")
        if x.dtype.kind != "f":
            raise TypeError(f"input must be a floating-point array, got {x.dtype}")
        _validate_shape(S, x.shape)
        if not bool(xp.isfinite(x).all()):
            raise ValueError("input contains NaN or Inf")
        cdt = np.dtype(np.float64 if x.dtype == np.float64 else np.float32)
        odt = self.out_dtype or cdt
        B, C, H, W = x.shape
        out = xp.empty((B * C, S.K, *S.output_size), dtype=odt)
        if B * C == 0:
            return out.reshape(B, C, S.K, *S.output_size)
        plan = get_plan(S._geo, xp, cdt)
        xs = x.reshape(B * C, H, W)
        dev = "cpu" if xp is np else "cuda"
        n = S.chunk_size(cdt.itemsize, dev)
        tb = S.theta_block(cdt.itemsize, dev)
        for i in range(0, B * C, n):
            xc = xp.ascontiguousarray(xs[i:i + n], dtype=cdt)
            plan.forward_chunk(xc, out[i:i + n], tb)
        return out.reshape(B, C, S.K, *S.output_size)
