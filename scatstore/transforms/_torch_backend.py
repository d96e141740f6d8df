"""PyTorch implementation of the 2D scattering transform (CPU and CUDA, device-agnostic).

Computes exactly what kymatio 0.3 computes (see :mod:`scatstore.transforms.filters`), organised
for speed:

* the input is padded once by reflection and Fourier-transformed once (full complex spectrum);
* for each scale ``j1`` the L wavelet products are one broadcast multiply; kymatio's Fourier
  subsampling (the *mean* of the ``2**j1 x 2**j1`` aliased blocks) is fused with the product as a
  multiply-accumulate over the blocks, the ``1 / 4**j1`` folded into the cached filter, so the
  full-resolution product is never stored for ``j1 > 0``;
* one batched inverse FFT on the coarse grid, then the modulus as ``sqrt(re**2 + im**2)`` on the
  real view (torch's complex ``abs`` is several times slower on CPU);
* the low-pass ``phi_J`` is separable, so "FFT, multiply by phi, subsample by 2**(J-j), inverse
  FFT, unpad" is two small dense matrix products in space, ``A @ U @ B.T``, exact up to rounding
  (no FFT of the modulus is needed at order 1, and the zeroth order is ``A0 @ x @ B0.T`` with the
  reflection padding folded into ``A0`` and ``B0``);
* order 2 takes one FFT of each ``U1`` (``j1 < J - 1``) and reuses it for every ``j2 > j1``;
* the batch is cut into chunks whose working set stays under a memory bound.

On CPU (:func:`run_cpu`) the maps are shared out to ``torch.get_num_threads()`` single-threaded
pipelines in a private thread pool (torch releases the GIL inside its operations), each with a
workspace allocated on first use and kept with the plan (per thread): every step writes into it,
the product / inverse FFT / squares run on 2 orientations of up to 3 maps at a time in one small
buffer.
Independent pipelines need no barrier after each small operation, which on a shared 2-core
machine is what stalls multi-threaded torch operations.

Filters are converted to tensors once per (device, dtype) and cached in :class:`TorchPlan`.
"""
from __future__ import annotations

import functools
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import filters as fb


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


class Geometry:
    """Sizes, padding and output layout shared by the backends."""

    def __init__(self, M: int, N: int, J: int, L: int, max_order: int):
        self.M, self.N, self.J, self.L, self.max_order = M, N, J, L, max_order
        self.Mp, self.Np = fb.compute_padding(M, N, J)
        self.pads = fb.pad_widths(M, N, J)
        self.Mo, self.No = self.Mp // 2**J - 2, self.Np // 2**J - 2  # == M // 2**J, N // 2**J
        self.K1 = 1 + L * J
        self.K = self.K1 + (L * L * J * (J - 1) // 2 if max_order == 2 else 0)
        # channel offset of the order-2 block that starts at scale j1
        self.off2 = []
        off = self.K1
        for j1 in range(J):
            self.off2.append(off)
            off += L * L * (J - 1 - j1)

    def grid(self, j: int) -> tuple[int, int]:
        return self.Mp // 2**j, self.Np // 2**j

    def working_bytes(self, real_bytes: int) -> tuple[int, int]:
        """Upper estimate of the working set: (bytes per input map, fixed bytes per theta1 block).

        Per input map (one channel of one image) at order 1: the padded input and its spectrum,
        the L products / inverse FFTs / moduli at full resolution (j1 = 0 dominates), and the
        low-pass intermediates. Order 2 adds the spectra of the L moduli at j1 = 0 and, per
        theta1, the L products and inverse FFTs at j2 = 1.
        """
        c, r = 2 * real_bytes, real_bytes
        P = self.Mp * self.Np
        L = self.L
        per_map = P * (r + c) + L * P * (2 * c + 2 * r) + L * self.Mp * self.No * r
        if self.max_order == 2 and self.J > 1:
            per_map += L * P * c
            per_theta = L * (P // 4) * (2 * c + 2 * r)
        else:
            per_theta = 0
        return per_map, per_theta


def native_working_bytes(geo: Geometry, theta_block: int, group: int = 2) -> int:
    """Bytes of one pipeline's workspace per input map with the C kernels (float32; the buffers of
    ``TorchPlan._native_workspace``): the padded input and its spectrum, the flat product /
    inverse-FFT buffer (``group`` orientations at full resolution, or at order 2 the
    ``theta_block·L`` paths of the largest second-order step) and, with torch's FFT, the inverse
    FFT's result buffer of the same size, the L moduli of every scale, at
    order 2 their spectra and the flat buffer of second-order moduli, and a float32 output
    staging block."""
    J, L = geo.J, geo.L
    P = geo.Mp * geo.Np
    zbuf = min(group, L) * P * 8
    total = P * (4 + 8) + sum(L * (P >> (2 * j)) * 4 for j in range(J))
    if geo.max_order == 2 and J > 1:
        tb = min(theta_block, L)
        zbuf = max(zbuf, tb * L * (P >> 2) * 8)
        total += sum(L * (P >> (2 * j)) * 8 for j in range(J - 1)) + tb * L * (P >> 2) * 4
    # the flat product buffer, and the inverse FFT's result buffer of the same size when torch's
    # FFT is used (the kernels' own FFT works in place)
    own_fft = all(fft_plan(n, True) is not None for r in range(J) for n in geo.grid(r))
    fft_work = 2 * 16 * max(geo.Mp, geo.Np) * 4
    return total + (zbuf + fft_work if own_fft else 2 * zbuf) + geo.K * geo.Mo * geo.No * 4


def cpu_working_bytes(geo: Geometry, real_bytes: int, theta_block: int,
                      group: int = 2, native: bool = False) -> int:
    """Bytes of one CPU pipeline's workspace per input map (all its buffers, see forward_maps;
    with ``native`` those of the C kernels, :func:`native_working_bytes`):
    the padded input and its spectrum; per scale j1 the ``group``-orientation product buffer,
    the L moduli and the low-pass intermediates; at order 2 the spectra of the moduli and, per
    (j1, j2), the product buffer, moduli and low-pass buffers of ``theta_block`` x L paths."""
    if native and real_bytes == 4:
        return native_working_bytes(geo, theta_block, group)
    r, c = real_bytes, 2 * real_bytes
    J, L = geo.J, geo.L
    P = geo.Mp * geo.Np

    def stage(slices: int, inner: int, res: int) -> int:  # result (slices, inner, m, k)
        m, k = geo.grid(res)
        lead = slices * inner
        return ((min(slices, group) if inner == 1 else slices) * inner * m * k * c + lead * m * k * r
                + lead * geo.Mo * k * r + lead * geo.Mo * geo.No * r)

    total = P * (r + c)
    for j1 in range(J):
        total += stage(L, 1, j1)
        if geo.max_order == 2 and j1 < J - 1:
            total += L * (P >> (2 * j1)) * c
            for j2 in range(j1 + 1, J):
                total += stage(theta_block, L, j2)
    return total


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


class _StableModulus(torch.autograd.Function):
    """|z| of a complex tensor with the subgradient 0 at z == 0 (kymatio's ModulusStable): the
    gradient ``z / |z|`` of ``sqrt(re^2 + im^2)`` is NaN there."""

    @staticmethod
    def forward(ctx, z):
        r = torch.view_as_real(z)
        out = (r[..., 0] * r[..., 0] + r[..., 1] * r[..., 1]).sqrt()
        ctx.save_for_backward(z, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, out = ctx.saved_tensors
        g = z * (grad / out)
        return g.masked_fill_((out == 0), 0)


class TorchPlan:
    """Filters and matrices of one geometry on one device in one dtype."""

    GROUP = 2  # orientations per product / inverse FFT step at order 1 on CPU
    MAPS = 3  # input maps per step of one CPU pipeline (filters read once for them)

    def __init__(self, geo: Geometry, device: torch.device, dtype: torch.dtype,
                 use_native: bool = True):
        self.geo, self.device, self.dtype = geo, device, dtype
        self.cdtype = _complex_dtype(dtype)
        g = geo
        J, L = g.J, g.L
        # per-thread CPU workspaces, kept with the plan so that repeated calls (one per batch in
        # the encode job) reuse their buffers instead of faulting in fresh pages every time
        self._local = threading.local()
        # fused C kernels (float32 on CPU only); None: the pure-torch path
        self.native = None
        if use_native and device.type == "cpu" and dtype == torch.float32:
            from . import _native

            self.native = _native.load()

        def tt(a, complex_=False):
            a = np.asarray(a)
            if complex_:  # real filter duplicated on a trailing axis: interleaved (re, im) layout
                a = np.repeat(a[..., None], 2, axis=-1)
            return torch.tensor(a, dtype=dtype, device=device)

        # the torch path multiplies the interleaved complex view by a duplicated real filter;
        # the C kernels read the real filter once per complex pair (half the filter bytes)
        filt = ((lambda a: np.ascontiguousarray(a, dtype=np.float32)) if self.native
                else (lambda a: tt(a, complex_=True)))
        psi = fb.wavelet_bank(g.Mp, g.Np, J, L)  # (J, L, Mp, Np) float64
        # first order: level-0 filters, 1/4**j1 of the Fourier-domain mean folded in, laid out as
        # (s, M1, s, N1) blocks so the alias sum is a multiply-accumulate over blocks.
        self.psi1 = [filt(psi[j1] / 4.0**j1) for j1 in range(J)]
        # aliased blocks to sum on the torch path (the C kernels use finer boxes, _init_native)
        self.blocks1 = ([] if self.native else
                        [fb.significant_blocks(psi[j1], 2**j1) for j1 in range(J)])
        self.blocks2: dict[tuple[int, int], list[tuple[int, int]]] = {}
        # second order: psi_{j2} cropped at resolution j1 (kymatio: psi['levels'][j1]),
        # divided by 4**(j2 - j1).
        self.psi2: dict[tuple[int, int], torch.Tensor] = {}
        if g.max_order == 2:
            for j1 in range(J - 1):
                for j2 in range(j1 + 1, J):
                    f = fb.periodize_filter_fft(psi[j2], j1) / 4.0 ** (j2 - j1)
                    self.psi2[(j1, j2)] = filt(f)
                    if not self.native:
                        self.blocks2[(j1, j2)] = fb.significant_blocks(f, 2 ** (j2 - j1))
        if self.native:
            self._init_native()
        # low-pass matrices per resolution; order 0 gets the reflection padding folded in
        self.lp: list[tuple[torch.Tensor, torch.Tensor]] = []
        for res in range(J):
            A, B = fb.lowpass_matrices(g.Mp, g.Np, J, res)
            self.lp.append((tt(A), tt(B.T)))
        A0, B0 = fb.order0_lowpass_matrices(g.M, g.N, J)
        self.lp0 = (tt(A0), tt(B0.T))

    # ---- building blocks -------------------------------------------------------------------
    @staticmethod
    def _modulus(W: torch.Tensor) -> torch.Tensor:
        """|W| for complex W, as sqrt(re^2 + im^2) on the real view (fast on CPU)."""
        if W.requires_grad:
            return _StableModulus.apply(W)
        if W.device.type != "cpu":
            return W.abs()
        sq = torch.view_as_real(W)
        sq = sq * sq
        out = sq[..., 0] + sq[..., 1]
        return out.sqrt_()

    @staticmethod
    def _filter_periodize(U: torch.Tensor, F: torch.Tensor, s: int,
                          blocks: list[tuple[int, int]]) -> torch.Tensor:
        """mean over the s x s aliased blocks of ``U[..., None, :, :] * F`` (1/s^2 is in F).

        U: (n, [extra,] M, N) complex, F: (L, M, N, 2) real with F[..., 0] == F[..., 1] (the
        real filter duplicated so that complex x real is a plain real multiply on the
        interleaved view) -> (n, [extra,] L, M/s, N/s) complex. Only the aliased ``blocks``
        listed are summed (see ``filters.significant_blocks``).
        """
        Ue = torch.view_as_real(U).unsqueeze(-4)  # (..., 1, M, N, 2)
        if s == 1:
            return torch.view_as_complex(Ue * F)
        M, N = U.shape[-2:]
        m, k = M // s, N // s
        Ub = Ue.unflatten(-3, (s, m)).unflatten(-2, (s, k))  # (..., 1, s, m, s, k, 2)
        Fb = F.unflatten(-3, (s, m)).unflatten(-2, (s, k))  # (L, s, m, s, k, 2)
        (a, b), rest = blocks[0], blocks[1:]
        out = Ub[..., a, :, b, :, :] * Fb[..., a, :, b, :, :]
        for a, b in rest:
            out.addcmul_(Ub[..., a, :, b, :, :], Fb[..., a, :, b, :, :])
        return torch.view_as_complex(out)

    def _lowpass(self, U: torch.Tensor, res: int) -> torch.Tensor:
        A, Bt = self.lp[res]
        return torch.matmul(torch.matmul(A, U), Bt)

    # ---- the transform on one chunk (any device; used on GPUs) --------------------------------
    def forward_chunk(self, x: torch.Tensor, out: torch.Tensor, theta_block: int) -> None:
        """x: (n, M, N) real in self.dtype; out: (n, K, Mo, No) to fill (any float dtype)."""
        g = self.geo
        J, L = g.J, g.L
        A0, B0t = self.lp0
        out[:, 0] = torch.matmul(torch.matmul(A0, x), B0t)
        top, bottom, left, right = g.pads
        xp = torch.nn.functional.pad(x.unsqueeze(1), (left, right, top, bottom), mode="reflect")
        U0 = torch.fft.fft2(xp.squeeze(1).to(self.cdtype))
        del xp
        for j1 in range(J):
            Z = self._filter_periodize(U0, self.psi1[j1], 2**j1, self.blocks1[j1])
            W = torch.fft.ifft2(Z) if Z.requires_grad else torch.fft.ifft2(Z, out=Z)
            U1 = self._modulus(W)
            del Z, W
            out[:, 1 + j1 * L:1 + (j1 + 1) * L] = self._lowpass(U1, j1)
            if g.max_order < 2 or j1 == J - 1:
                continue
            V = torch.fft.fft2(U1.to(self.cdtype))  # (n, L, M1, N1)
            del U1
            nj2 = J - 1 - j1
            o2 = out[:, g.off2[j1]:g.off2[j1] + L * L * nj2].unflatten(1, (L, nj2, L))
            for t0 in range(0, L, theta_block):
                Vb = V[:, t0:t0 + theta_block]
                for j2 in range(j1 + 1, J):
                    Z2 = self._filter_periodize(Vb, self.psi2[(j1, j2)], 2 ** (j2 - j1),
                                                self.blocks2[(j1, j2)])
                    W2 = (torch.fft.ifft2(Z2) if Z2.requires_grad
                          else torch.fft.ifft2(Z2, out=Z2))
                    U2 = self._modulus(W2)
                    del Z2, W2
                    o2[:, t0:t0 + theta_block, j2 - j1 - 1] = self._lowpass(U2, j2)

    # ---- CPU: one map at a time, preallocated workspace, one thread per pipeline ---------------
    def _prod_into(self, Zr: torch.Tensor, U: torch.Tensor, F: torch.Tensor, s: int,
                   blocks: list[tuple[int, int]]) -> None:
        """Zr (..., L, m, k, 2) <- mean over the s x s aliased blocks of U[..., None] * F.

        U: (..., M, N) complex, F: (L, M, N, 2) real (1/s^2 folded in). In place, no allocation.
        """
        Ue = torch.view_as_real(U).unsqueeze(-4)
        if s == 1:
            torch.mul(Ue, F, out=Zr)
            return
        M, N = U.shape[-2:]
        m, k = M // s, N // s
        Ub = Ue.unflatten(-3, (s, m)).unflatten(-2, (s, k))
        Fb = F.unflatten(-3, (s, m)).unflatten(-2, (s, k))
        (a, b), rest = blocks[0], blocks[1:]
        torch.mul(Ub[..., a, :, b, :, :], Fb[..., a, :, b, :, :], out=Zr)
        for a, b in rest:
            Zr.addcmul_(Ub[..., a, :, b, :, :], Fb[..., a, :, b, :, :])

    def _wave_mod_lowpass(self, ws: dict, key: str, U: torch.Tensor, F: torch.Tensor, s: int,
                          blocks, res: int, shape: tuple[int, ...]) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
        """|ifft2(periodize(U * F))| and its low-pass, in workspace buffers ``key``.

        U: (g, M, N) or (g, t, M, N) complex; F: (L, M, N, 2). shape: shape of the result up to
        the grid, (g, L) or (g, t, L). The product / inverse FFT / squares run on slices of
        ``GROUP`` orientations at order 1 (all t theta1 at once at order 2, measured faster) in
        one small buffer shared by the g maps (each filter slice is read once for the g maps while
        it is in cache); the modulus and the low-pass fill full-size buffers. Returns (modulus,
        low-passed).
        """
        geo = self.geo
        m, k = geo.grid(res)
        order1 = len(shape) == 2
        gs = min(shape[1], self.GROUP) if order1 else shape[1]
        Z = ws.get(key + "Z")
        if Z is None:
            Z = ws[key + "Z"] = torch.empty((shape[0], gs, *shape[2:], m, k), dtype=self.cdtype)
            ws[key + "U"] = torch.empty((*shape, m, k), dtype=self.dtype)
            ws[key + "T"] = torch.empty((*shape, geo.Mo, k), dtype=self.dtype)
            ws[key + "S"] = torch.empty((*shape, geo.Mo, geo.No), dtype=self.dtype)
        Um, T, S = ws[key + "U"], ws[key + "T"], ws[key + "S"]
        Zr = torch.view_as_real(Z)
        for i0 in range(0, shape[1], gs):
            i1 = min(i0 + gs, shape[1])
            Zi, Zri = Z[:, :i1 - i0], Zr[:, :i1 - i0]
            if order1:
                self._prod_into(Zri, U, F[i0:i1], s, blocks)
            else:
                self._prod_into(Zri, U[:, i0:i1], F, s, blocks)
            torch.fft.ifft2(Zi, out=Zi)  # in place: one buffer for product, transform, squares
            torch.mul(Zri, Zri, out=Zri)
            torch.add(Zri[..., 0], Zri[..., 1], out=Um[:, i0:i1])
        Um.sqrt_()
        A, Bt = self.lp[res]
        torch.matmul(A, Um, out=T)  # rows first: (Mo, m) @ (..., m, k), faster than cols first
        torch.matmul(T, Bt, out=S)  # one GEMM: (... * Mo, k) @ (k, No)
        return Um, S

    def forward_maps(self, x: torch.Tensor, out: torch.Tensor, theta_block: int,
                     ws: dict) -> None:
        """g input maps on CPU. x: (g, M, N) real in self.dtype; out: (g, K, Mo, No) to fill.

        ws: this pipeline's workspace (dict of buffers, filled on first use, reused per group of
        maps; a group of another size gets its own buffers)."""
        geo = self.geo
        J, L = geo.J, geo.L
        n = x.shape[0]
        A0, B0t = self.lp0
        out[:, 0] = torch.matmul(torch.matmul(A0, x), B0t)
        top, bottom, left, right = geo.pads
        xp = torch.nn.functional.pad(x[:, None], (left, right, top, bottom), mode="reflect")
        pre = f"{n}."
        U0 = ws.get(pre + "U0")
        if U0 is None:
            U0 = ws[pre + "U0"] = torch.empty((n, geo.Mp, geo.Np), dtype=self.cdtype)
        torch.fft.fft2(xp[:, 0], out=U0)
        del xp
        for j1 in range(J):
            U1, S1 = self._wave_mod_lowpass(ws, f"{pre}1.{j1}.", U0, self.psi1[j1], 2**j1,
                                            self.blocks1[j1], j1, (n, L))
            out[:, 1 + j1 * L:1 + (j1 + 1) * L] = S1
            if geo.max_order < 2 or j1 == J - 1:
                continue
            V = ws.get(f"{pre}V{j1}")
            if V is None:
                V = ws[f"{pre}V{j1}"] = torch.empty(U1.shape, dtype=self.cdtype)
            torch.fft.fft2(U1, out=V)  # (n, L, M1, N1)
            nj2 = J - 1 - j1
            o2 = out[:, geo.off2[j1]:geo.off2[j1] + L * L * nj2].unflatten(1, (L, nj2, L))
            for t0 in range(0, L, theta_block):
                Vb = V[:, t0:t0 + theta_block]
                tb = Vb.shape[1]
                for j2 in range(j1 + 1, J):
                    _, S2 = self._wave_mod_lowpass(ws, f"{pre}2.{j1}.{j2}.{tb}.", Vb,
                                                   self.psi2[(j1, j2)], 2 ** (j2 - j1),
                                                   self.blocks2[(j1, j2)], j2, (n, tb, L))
                    o2[:, t0:t0 + tb, j2 - j1 - 1] = S2

    def workspace(self) -> dict:
        """This thread's CPU workspace for this plan (buffers keyed by the step they serve)."""
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = {}
        return ws

    # ---- CPU, float32: the fused C kernels of _cpu_kernels.c ------------------------------------
    def _init_native(self) -> None:
        """Kernel-side tables: block lists as int32 pairs, the low-pass matrices in band form."""
        g = self.geo
        # own FFT when every grid size is 2^a 3^b 5^c (kymatio's padded sizes usually are)
        sizes = {n for res in range(g.J) for n in g.grid(res)}
        plans = {(n, inv): fft_plan(n, inv) for n in sizes for inv in (False, True)}
        self.nat_fft = plans if all(p is not None for p in plans.values()) else None
        self.nat_boxes1 = [fb.significant_boxes(self.psi1[j1], 2**j1) for j1 in range(g.J)]
        self.nat_boxes2 = {key: fb.significant_boxes(f, 2 ** (key[1] - key[0]))
                           for key, f in self.psi2.items()}
        self.nat_lp = []
        for res in range(g.J):
            A, B = fb.lowpass_matrices(g.Mp, g.Np, g.J, res)
            ra, ca = _pair_bands(*fb.band_rows(A), A.shape[1])
            rb, cb = _pair_bands(*fb.band_rows(B), B.shape[1])
            self.nat_lp.append((ra, np.ascontiguousarray(ca, dtype=np.float32), ca.shape[1],
                                rb, np.ascontiguousarray(cb, dtype=np.float32), cb.shape[1]))
        # order 0 on the unpadded input: the reflection padding is folded into the band form
        A0, B0 = fb.order0_lowpass_matrices(g.M, g.N, g.J)
        ra, ca = _pair_bands(*fb.band_rows(A0), g.M)
        rb, cb = _pair_bands(*fb.band_rows(B0), g.N)
        self.nat_lp0 = (ra, np.ascontiguousarray(ca, dtype=np.float32), ca.shape[1],
                        rb, np.ascontiguousarray(cb, dtype=np.float32), cb.shape[1])

    def _nat_prod(self, Z: torch.Tensor, U: torch.Tensor, u_off: np.ndarray, F: np.ndarray,
                  f0: int, nf: int, s: int, boxes: np.ndarray) -> None:
        M, N = F.shape[-2:]
        self.native.sc_prod_periodize(U.data_ptr(), u_off.ctypes.data, len(u_off),
                                      F.ctypes.data + f0 * M * N * 4, nf, M, N, s,
                                      boxes[f0:].ctypes.data, boxes.shape[1], Z.data_ptr())

    def _nat_fft2(self, Z: torch.Tensor, n_maps: int, m: int, k: int, inverse: bool,
                  work: torch.Tensor) -> None:
        """In place, unnormalised (the inverse's 1/(m k) is applied by the modulus)."""
        rm, tm = self.nat_fft[(m, inverse)]
        rk, tk = self.nat_fft[(k, inverse)]
        self.native.sc_fft2(Z.data_ptr(), n_maps, m, k, rm.ctypes.data, len(rm), tm.ctypes.data,
                            rk.ctypes.data, len(rk), tk.ctypes.data, int(inverse),
                            work.data_ptr())

    def _nat_lowpass(self, U: torch.Tensor, n_maps: int, res: int, T: torch.Tensor,
                     out: torch.Tensor, out_off: np.ndarray) -> None:
        """res -1: order 0 on the unpadded (M, N) input."""
        g = self.geo
        m, k = g.grid(res) if res >= 0 else (g.M, g.N)
        ra, ca, wa, rb, cb, wb = self.nat_lp[res] if res >= 0 else self.nat_lp0
        self.native.sc_lowpass(U.data_ptr(), n_maps, m, k, ra.ctypes.data, ca.ctypes.data,
                               g.Mo, wa, rb.ctypes.data, cb.ctypes.data, g.No, wb,
                               T.data_ptr(), out.data_ptr(), out_off.ctypes.data)

    def forward_maps_native(self, x: torch.Tensor, out: torch.Tensor, theta_block: int,
                            ws: dict) -> None:
        """As :meth:`forward_maps` with the C kernels. out: float32, contiguous (g, K, Mo, No).

        Same schedule: per scale, ``GROUP`` orientations of the g maps at a time go through
        product-and-subsampling (C), in-place inverse FFT (torch), modulus (C) into the full
        moduli buffer, then one banded low-pass call writes every map's coefficients straight
        into ``out``. Offsets (in floats) of every map of every call are computed once per
        pipeline and kept in ``ws``."""
        geo, lib = self.geo, self.native
        J, L = geo.J, geo.L
        n = x.shape[0]
        pre = f"n{n}.t{theta_block}."
        if pre + "T" not in ws:
            ws.update(self._native_workspace(n, theta_block, pre))
        self._nat_lowpass(x, n, -1, ws[pre + "T"], out, ws[pre + "out0"])
        top, bottom, left, right = geo.pads
        xp = torch.nn.functional.pad(x[:, None], (left, right, top, bottom), mode="reflect")
        U0 = ws[pre + "U0"]
        own_fft = self.nat_fft is not None
        fwork = ws[pre + "fftwork"]
        if own_fft:
            U0r = torch.view_as_real(U0)
            U0r[..., 0].copy_(xp[:, 0])
            U0r[..., 1].zero_()
            self._nat_fft2(U0, n, geo.Mp, geo.Np, False, fwork)
        else:
            torch.fft.fft2(xp[:, 0], out=U0)
        del xp
        T, zbuf, wbuf, ubuf = ws[pre + "T"], ws[pre + "Z"], ws[pre + "W"], ws[pre + "U"]

        def view(buf: torch.Tensor, *shape: int) -> torch.Tensor:  # contiguous, in a flat buffer
            return buf[:math.prod(shape)].view(shape)

        for j1 in range(J):
            m, k = geo.grid(j1)
            Um = ws[f"{pre}mod{j1}"]
            for l0 in range(0, L, self.GROUP):
                nl = min(self.GROUP, L - l0)
                Zi = view(zbuf, n, nl, m, k)
                self._nat_prod(Zi, U0, ws[pre + "u0off"], self.psi1[j1], l0, nl, 2**j1,
                               self.nat_boxes1[j1])
                if own_fft:
                    self._nat_fft2(Zi, n * nl, m, k, True, fwork)
                    Wi, scale = Zi, 1.0 / (m * k)
                else:
                    # into a second buffer: torch's MKL path computes out of place and copies
                    # into `out=` when it is the input (~15 % of the transform), and a fresh
                    # result tensor per step costs page faults
                    Wi, scale = torch.fft.ifft2(Zi, out=view(wbuf, n, nl, m, k)), 1.0
                lib.sc_modulus(Wi.data_ptr(), n * nl, m * k, Um.data_ptr(),
                               ws[f"{pre}modoff{j1}.{l0}"].ctypes.data, scale)
            self._nat_lowpass(Um, n * L, j1, T, out, ws[f"{pre}out1.{j1}"])
            if geo.max_order < 2 or j1 == J - 1:
                continue
            V = ws[f"{pre}V{j1}"]  # (n, L, m, k)
            if own_fft:
                Vr = torch.view_as_real(V)
                Vr[..., 0].copy_(Um)
                Vr[..., 1].zero_()
                self._nat_fft2(V, n * L, m, k, False, fwork)
            else:
                torch.fft.fft2(Um, out=V)
            for t0 in range(0, L, theta_block):
                tb = min(theta_block, L - t0)
                for j2 in range(j1 + 1, J):
                    m2, k2 = geo.grid(j2)
                    Z2 = view(zbuf, n, tb, L, m2, k2)
                    U2 = view(ubuf, n, tb, L, m2, k2)
                    self._nat_prod(Z2, V, ws[f"{pre}voff{j1}.{t0}"], self.psi2[(j1, j2)], 0, L,
                                   2 ** (j2 - j1), self.nat_boxes2[(j1, j2)])
                    nm = n * tb * L
                    if own_fft:
                        self._nat_fft2(Z2, nm, m2, k2, True, fwork)
                        W2, scale = Z2, 1.0 / (m2 * k2)
                    else:
                        W2, scale = torch.fft.ifft2(Z2, out=view(wbuf, n, tb, L, m2, k2)), 1.0
                    lib.sc_modulus(W2.data_ptr(), nm, m2 * k2, U2.data_ptr(),
                                   ws[f"{pre}lin{nm}.{m2 * k2}"].ctypes.data, scale)
                    self._nat_lowpass(U2, nm, j2, T, out, ws[f"{pre}out2.{j1}.{j2}.{t0}"])

    def _native_workspace(self, n: int, theta_block: int, pre: str) -> dict:
        """Buffers and offset tables of one pipeline for groups of n maps."""
        geo = self.geo
        J, L, K = geo.J, geo.L, geo.K
        MoNo = geo.Mo * geo.No
        G = min(self.GROUP, L)
        ws: dict = {}
        ws[pre + "u0off"] = np.arange(n, dtype=np.int64) * (2 * geo.Mp * geo.Np)
        k0 = geo.Np  # the largest grid; see sc_lowpass for the scratch size
        ws[pre + "T"] = torch.empty(geo.Mo * k0 + (k0 + geo.No) * (-(-geo.Mo // 16) * 16),
                                    dtype=torch.float32)
        ws[pre + "out0"] = np.arange(n, dtype=np.int64) * (K * MoNo)
        gi = np.arange(n, dtype=np.int64)[:, None]
        ll = np.arange(L, dtype=np.int64)[None, :]
        # one flat complex buffer for every product / inverse FFT step, one flat real buffer for
        # the order-2 moduli, sized for their largest use
        zsize = n * G * geo.Mp * geo.Np
        usize = 0
        if geo.max_order == 2 and J > 1:
            m2, k2 = geo.grid(1)  # j2 = j1 + 1 at j1 = 0: the largest order-2 step
            zsize = max(zsize, n * min(theta_block, L) * L * m2 * k2)
            usize = n * min(theta_block, L) * L * m2 * k2
        ws[pre + "Z"] = torch.empty(zsize, dtype=self.cdtype)
        # the inverse FFT's output buffer (torch FFT only: the own FFT works in place)
        ws[pre + "W"] = torch.empty(0 if self.nat_fft else zsize, dtype=self.cdtype)
        ws[pre + "fftwork"] = torch.empty(2 * 16 * max(geo.Mp, geo.Np), dtype=torch.float32)
        ws[pre + "U0"] = torch.empty((n, geo.Mp, geo.Np), dtype=self.cdtype)
        ws[pre + "U"] = torch.empty(usize, dtype=torch.float32)
        for j1 in range(J):
            m, k = geo.grid(j1)
            ws[f"{pre}mod{j1}"] = torch.empty((n, L, m, k), dtype=torch.float32)
            for l0 in range(0, L, G):
                nl = min(G, L - l0)
                ws[f"{pre}modoff{j1}.{l0}"] = ((gi * L + l0 + np.arange(nl)[None, :]) * (m * k)
                                               ).reshape(-1)
            ws[f"{pre}out1.{j1}"] = ((gi * K + 1 + j1 * L + ll) * MoNo).reshape(-1)
            if geo.max_order < 2 or j1 == J - 1:
                continue
            ws[f"{pre}V{j1}"] = torch.empty((n, L, m, k), dtype=self.cdtype)
            nj2 = J - 1 - j1
            for t0 in range(0, L, theta_block):
                tb = min(theta_block, L - t0)
                ti = np.arange(tb, dtype=np.int64)[None, :]
                ws[f"{pre}voff{j1}.{t0}"] = ((gi * L + t0 + ti) * (2 * m * k)).reshape(-1)
                for j2 in range(j1 + 1, J):
                    ch = geo.off2[j1] + ((t0 + ti[..., None]) * nj2 + (j2 - j1 - 1)) * L \
                        + ll[:, None, :]  # (1, tb, L) channel of (theta1, j2, theta2)
                    ws[f"{pre}out2.{j1}.{j2}.{t0}"] = ((gi[..., None] * K + ch) * MoNo
                                                       ).reshape(-1)
        if geo.max_order == 2:
            for j1 in range(J - 1):
                for j2 in range(j1 + 1, J):
                    m2, k2 = geo.grid(j2)
                    for t0 in range(0, L, theta_block):
                        nm = n * min(theta_block, L - t0) * L
                        ws[f"{pre}lin{nm}.{m2 * k2}"] = np.arange(nm, dtype=np.int64) * (m2 * k2)
        return ws


_POOLS: dict[int, "ThreadPoolExecutor"] = {}
_POOLS_LOCK = threading.Lock()


def set_thread_openmp_threads(n: int) -> None:
    """This thread's OpenMP thread count, leaving every other thread's setting alone.

    ``torch.set_num_threads`` also sets the process-wide default that a thread touching torch
    for the first time adopts later (torch applies it lazily, per thread): called in a pool
    thread, it silently turned threads created afterwards into one-core threads. So: torch's lazy
    per-thread set-up first, then the OpenMP runtime's own per-thread setter; torch's setter only
    where that runtime is not reachable."""
    import ctypes

    torch.get_num_threads()  # torch's per-thread lazy set-up, which would undo what follows
    try:
        ctypes.CDLL(None).omp_set_num_threads(int(n))
    except (AttributeError, OSError):
        pass
    if torch.get_num_threads() != n:  # not the runtime torch uses (another build)
        torch.set_num_threads(n)


def _single_thread_init() -> None:
    set_thread_openmp_threads(1)  # one intra-op thread per pipeline, this thread only


def _pool(workers: int) -> "ThreadPoolExecutor":
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(
                workers, thread_name_prefix="scatstore", initializer=_single_thread_init)
        return pool


def run_cpu(plan: TorchPlan, xs: torch.Tensor, out: torch.Tensor, workers: int,
            theta_block: int, group: int = 1) -> None:
    """Transform the maps xs (n, M, N) into out (n, K, Mo, No) on CPU.

    ``workers`` pipelines, each single-threaded with its own workspace, take ``group`` maps at a
    time from a shared counter (dynamic schedule); with ``workers == 1`` it runs in the caller's
    thread with the caller's intra-op threads.
    """
    n = xs.shape[0]
    counter = itertools.count()
    lock = threading.Lock()

    def work() -> None:
        ws = plan.workspace()
        with torch.no_grad():
            while True:
                with lock:
                    i = next(counter) * group
                if i >= n:
                    return
                xg = xs[i:i + group].to(plan.dtype).contiguous()
                og = out[i:i + group]
                if plan.native is None:
                    plan.forward_maps(xg, og, theta_block, ws)
                elif og.dtype == torch.float32 and og.is_contiguous():
                    plan.forward_maps_native(xg, og, theta_block, ws)
                else:  # the kernels write float32: stage, then convert (e.g. to float16)
                    key = f"stage{len(og)}"
                    if key not in ws:
                        ws[key] = torch.empty(og.shape, dtype=torch.float32)
                    plan.forward_maps_native(xg, ws[key], theta_block, ws)
                    og.copy_(ws[key])

    workers = max(1, min(workers, -(-n // group)))
    if workers == 1:
        work()
        return
    futures = [_pool(workers).submit(work) for _ in range(workers)]
    for f in futures:
        f.result()


_PLANS: dict[tuple, TorchPlan] = {}
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 16


def get_plan(geo: Geometry, device: torch.device, dtype: torch.dtype,
             use_native: bool = True) -> TorchPlan:
    """Plan for (geometry, device, dtype), built once and cached (process-wide, small LRU).

    ``use_native=False`` keeps the pure-torch CPU path even where the C kernels are available
    (tests compare the two)."""
    key = (geo.M, geo.N, geo.J, geo.L, geo.max_order, str(device), dtype, use_native)
    with _PLANS_LOCK:
        plan = _PLANS.pop(key, None)
        if plan is None:
            plan = TorchPlan(geo, device, dtype, use_native)
        _PLANS[key] = plan  # most recent last
        while len(_PLANS) > _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
    return plan


def plan_cache_info() -> list[tuple]:
    with _PLANS_LOCK:
        return list(_PLANS)


def clear_plan_cache() -> None:
    with _PLANS_LOCK:
        _PLANS.clear()
