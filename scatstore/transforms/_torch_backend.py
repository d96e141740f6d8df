"""PyTorch backend of the scattering transform (CPU and CUDA): the primitives of :mod:`.core`.

What the primitives compute is kymatio 0.3's transform (see :mod:`scatstore.transforms.filters`
and ``docs/scattering.md``), organised for speed:

* the input is padded once by reflection and Fourier-transformed once (full complex spectrum);
* the wavelet products: kymatio's Fourier subsampling (the *mean* of the ``2**j x 2**j`` aliased
  blocks) is fused with the product as a multiply-accumulate over the blocks that matter, the
  ``1 / 4**j`` folded into the cached filter, so the full-resolution product is never stored;
* the modulus as ``sqrt(re**2 + im**2)`` on the real view (torch's complex ``abs`` is several
  times slower on CPU), with kymatio's stable subgradient at 0 under autograd;
* the low-pass ``phi_J`` is separable, so "FFT, multiply by phi, subsample by 2**(J-j), inverse
  FFT, unpad" is two small dense matrix products in space, ``A @ U @ B.T``, exact up to rounding
  (the zeroth order is ``A0 @ x @ B0.T`` with the reflection padding folded into ``A0``, ``B0``).

:class:`TorchOps` is bound to a :class:`TorchPlan` (filters of one geometry on one device in one
dtype) and either allocates every result (GPU, autograd) or writes into a per-thread workspace
(the CPU pipelines of :func:`run_cpu`). On CPU in float32 the plan also selects, per primitive,
the C kernels of :mod:`._native` (:func:`._native.select_kernels`: from the CPU's ISA level,
never from timing); :class:`._native.NativeOps` runs those and falls back to these for the rest.

On CPU (:func:`run_cpu`) the maps are shared out to ``torch.get_num_threads()`` single-threaded
pipelines in a private thread pool (torch and ctypes release the GIL), each with a workspace
kept with the plan (per thread). Independent pipelines need no barrier after each small
operation, which on a shared 2-core machine is what stalls multi-threaded torch operations.
"""
from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import _native
from . import filters as fb
from .core import scatter
from .geometry import Geometry
from ._native import fft_plan  # noqa: F401  (re-exported: tests, benchmarks)


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def native_working_bytes(geo: Geometry, theta_block: int, group: int = 2) -> int:
    """Bytes of one pipeline's workspace per input map with the C kernels (float32; the buffers
    of ``_native.NativeOps`` in the pipeline's workspace): the padded input and its spectrum,
    the flat product / inverse-FFT buffer (``group`` orientations at full resolution, or at order 2 the
    ``theta_block·L`` paths of the largest second-order step) and, with torch's FFT, the inverse
    FFT's result buffer of the same size, the L moduli of every scale, at
    order 2 their spectra and the flat buffer of second-order moduli, a float32 output staging
    block, and where the table picks torch's low-pass its two intermediates."""
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
    kernels = _native.select_kernels(geo)[0]
    own_fft = kernels["fft"] == "native"
    if kernels["lowpass"] == "torch":  # A @ U and its product with B.T, the largest step
        lead = max(L, (min(theta_block, L) * L) if geo.max_order == 2 and J > 1 else 0)
        total += lead * geo.Mo * (geo.Np + geo.No) * 4
    fft_work = 2 * 16 * max(geo.Mp, geo.Np) * 4
    return total + (zbuf + fft_work if own_fft else 2 * zbuf) + geo.K * geo.Mo * geo.No * 4


def cpu_working_bytes(geo: Geometry, real_bytes: int, theta_block: int,
                      group: int = 2, native: bool = False) -> int:
    """Bytes of one CPU pipeline's workspace per input map (an upper estimate of its buffers;
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


def _modulus_real_view(z: torch.Tensor) -> torch.Tensor:
    r = torch.view_as_real(z)
    return (r[..., 0] * r[..., 0] + r[..., 1] * r[..., 1]).sqrt()


class _StableModulus(torch.autograd.Function):
    """|z| of a complex tensor with the subgradient 0 at z == 0 (kymatio's ModulusStable): the
    gradient ``z / |z|`` of ``sqrt(re^2 + im^2)`` is NaN there."""

    @staticmethod
    def forward(ctx, z):
        out = _modulus_real_view(z)
        ctx.save_for_backward(z, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, out = ctx.saved_tensors
        g = z * (grad / out)
        return g.masked_fill_((out == 0), 0)


class TorchPlan:
    """Filters and matrices of one geometry on one device in one dtype, and the kernel chosen
    for each primitive (``kernels``, ``kernel_reasons``)."""

    GROUP = 2  # orientations per product / inverse FFT step at order 1 on CPU
    MAPS = 3  # input maps per step of one CPU pipeline (filters read once for them)

    def __init__(self, geo: Geometry, device: torch.device, dtype: torch.dtype,
                 use_native: bool = True, kernels: dict[str, str] | None = None):
        """``kernels`` overrides the per-primitive choice of :func:`._native.select_kernels`
        (benchmarks and tests compare kernels that way; CPU float32 only)."""
        self.geo, self.device, self.dtype = geo, device, dtype
        self.cdtype = _complex_dtype(dtype)
        g = geo
        J, L = g.J, g.L
        # per-thread CPU workspaces, kept with the plan so that repeated calls (one per batch in
        # the encode job) reuse their buffers instead of faulting in fresh pages every time
        self._local = threading.local()
        self.native = None  # the C library where any primitive runs a C kernel
        self.native_tables = None
        self.kernels = {p: "torch" for p in _native.PRIMITIVES}
        self.kernel_reasons = {p: ("pure-torch plan" if not use_native else
                                   "C kernels are float32 on CPU only")
                               for p in _native.PRIMITIVES}
        if use_native and device.type == "cpu" and dtype == torch.float32:
            self.kernels, self.kernel_reasons = _native.select_kernels(geo, forced=kernels)
            if any(k == "native" for k in self.kernels.values()):
                self.native = _native.load()

        def tt(a, complex_=False):
            a = np.asarray(a)
            if complex_:  # real filter duplicated on a trailing axis: interleaved (re, im) layout
                a = np.repeat(a[..., None], 2, axis=-1)
            return torch.tensor(a, dtype=dtype, device=device)

        psi = fb.wavelet_bank(g.Mp, g.Np, J, L)  # (J, L, Mp, Np) float64
        # first order: level-0 filters with the 1/4**j1 of the Fourier-domain mean folded in;
        # second order: psi_{j2} cropped at resolution j1 (kymatio: psi['levels'][j1]), divided
        # by 4**(j2 - j1)
        psi1 = [psi[j1] / 4.0**j1 for j1 in range(J)]
        psi2 = {}
        if g.max_order == 2:
            for j1 in range(J - 1):
                for j2 in range(j1 + 1, J):
                    psi2[(j1, j2)] = fb.periodize_filter_fft(psi[j2], j1) / 4.0 ** (j2 - j1)
        if self.native is not None:
            self.native_tables = _native.NativeTables(g, psi1, psi2, self.kernels)
        # the torch product multiplies the interleaved complex view by a duplicated real filter,
        # summing only the aliased blocks that matter (filters.significant_blocks)
        if self.kernels["prod_periodize"] == "torch":
            self.psi1 = [tt(f, complex_=True) for f in psi1]
            self.blocks1 = [fb.significant_blocks(psi[j1], 2**j1) for j1 in range(J)]
            self.psi2 = {k: tt(f, complex_=True) for k, f in psi2.items()}
            self.blocks2 = {k: fb.significant_blocks(f, 2 ** (k[1] - k[0]))
                            for k, f in psi2.items()}
        # low-pass matrices per resolution; order 0 gets the reflection padding folded in
        self.lp: list[tuple[torch.Tensor, torch.Tensor]] = []
        for res in range(J):
            A, B = fb.lowpass_matrices(g.Mp, g.Np, J, res)
            self.lp.append((tt(A), tt(B.T)))
        A0, B0 = fb.order0_lowpass_matrices(g.M, g.N, J)
        self.lp0 = (tt(A0), tt(B0.T))
        self._index: dict = {}  # output channel index tensors (torch low-pass at order 2)

    @property
    def writes_float32_only(self) -> bool:
        """Whether the output must be float32 and contiguous (the C low-pass writes it)."""
        return self.kernels["lowpass"] == "native"

    def ops(self, ws: dict | None = None):
        """The primitives bound to this plan: allocating (``ws`` None: GPU, autograd) or
        writing into the CPU workspace ``ws``."""
        ops = TorchOps(self, ws)
        return _native.NativeOps(self, ops) if self.native is not None else ops

    def forward_chunk(self, x: torch.Tensor, out: torch.Tensor, theta_block: int) -> None:
        """x: (n, M, N) real in self.dtype; out: (n, K, Mo, No) to fill (any float dtype).
        Allocating primitives (GPU; differentiable when x requires grad and the plan is
        pure torch: the C kernels have no backward)."""
        scatter(self.ops(None), x, out, theta_block)

    def workspace(self) -> dict:
        """This thread's CPU workspace for this plan (flat buffers keyed by their role)."""
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = {}
        return ws

    def channel_index(self, channels: np.ndarray) -> torch.Tensor:
        key = (channels.shape, channels.tobytes())
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = torch.tensor(channels, device=self.device)
        return idx


class TorchOps:
    """The primitives of :mod:`.core` in torch (see there for their contracts)."""

    def __init__(self, plan: TorchPlan, ws: dict | None):
        self.plan, self.geo, self.ws = plan, plan.geo, ws
        # views of the workspace's flat buffers by (role, dtype, shape), kept in the workspace
        self._views = ws.setdefault("views", {}) if ws is not None else None
        self.group = TorchPlan.GROUP if ws is not None else plan.geo.L
        self.cdtype = plan.cdtype

    def _buf(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` for ``role``: fresh without a workspace, else a view of the
        role's flat workspace buffer (grown to the largest use; a role is used by one step at
        a time)."""
        if self.ws is None:
            return torch.empty(shape, dtype=dtype, device=self.plan.device)
        views = self._views
        key = (role, dtype, tuple(shape))
        v = views.get(key)
        if v is not None:
            return v
        n = math.prod(shape)
        flat = self.ws.get((role, dtype))
        if flat is None or flat.numel() < n:
            flat = self.ws[(role, dtype)] = torch.empty(n, dtype=dtype, device=self.plan.device)
            for k in [k for k in views if k[:2] == (role, dtype)]:  # views of the old buffer
                del views[k]
        v = views[key] = flat[:n].view(shape)
        return v

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.geo.pads
        M, N = x.shape[-2:]
        if max(top, bottom) < M and max(left, right) < N:
            return torch.nn.functional.pad(x[:, None], (left, right, top, bottom),
                                           mode="reflect")[:, 0]
        # torch refuses a pad equal to the size, which a side of exactly 2**J needs: that case
        # reflects twice, as kymatio does
        rows = torch.from_numpy(fb.reflect_index(M, top, bottom)).to(x.device)
        cols = torch.from_numpy(fb.reflect_index(N, left, right)).to(x.device)
        return x.index_select(-2, rows).index_select(-1, cols)

    def fft2(self, r: torch.Tensor, role: str) -> torch.Tensor:
        if self.ws is None:
            return torch.fft.fft2(r.to(self.cdtype))
        return torch.fft.fft2(r, out=self._buf(role, r.shape, self.cdtype))

    def ifft2(self, Z: torch.Tensor):
        if Z.requires_grad:
            return torch.fft.ifft2(Z), 1.0
        if self.ws is None:  # in place: the least memory on a GPU
            return torch.fft.ifft2(Z, out=Z), 1.0
        # into a second buffer: torch's MKL path computes out of place and copies into `out=`
        # when it is the input (~15 % of the transform)
        return torch.fft.ifft2(Z, out=self._buf("W", Z.shape, self.cdtype)), 1.0

    def prod_periodize(self, U: torch.Tensor, filt: tuple[int, ...], l0: int, nl: int,
                       role: str) -> torch.Tensor:
        p = self.plan
        if len(filt) == 1:
            F, blocks, s = p.psi1[filt[0]], p.blocks1[filt[0]], 2 ** filt[0]
        else:
            F, blocks, s = p.psi2[filt], p.blocks2[filt], 2 ** (filt[1] - filt[0])
        F = F[l0:l0 + nl]
        M, N = U.shape[-2:]
        m, k = M // s, N // s
        Ue = torch.view_as_real(U).unsqueeze(-4)  # (..., 1, M, N, 2)
        Zr = None
        if self.ws is not None:
            Zr = torch.view_as_real(self._buf(role, (*U.shape[:-2], nl, m, k), self.cdtype))
        if s == 1:
            return torch.view_as_complex(Ue * F if Zr is None else torch.mul(Ue, F, out=Zr))
        Ub = Ue.unflatten(-3, (s, m)).unflatten(-2, (s, k))  # (..., 1, s, m, s, k, 2)
        Fb = F.unflatten(-3, (s, m)).unflatten(-2, (s, k))  # (nl, s, m, s, k, 2)
        (a, b), rest = blocks[0], blocks[1:]
        if Zr is None:
            Zr = Ub[..., a, :, b, :, :] * Fb[..., a, :, b, :, :]
        else:
            torch.mul(Ub[..., a, :, b, :, :], Fb[..., a, :, b, :, :], out=Zr)
        for a, b in rest:
            Zr = Zr.addcmul_(Ub[..., a, :, b, :, :], Fb[..., a, :, b, :, :])
        return torch.view_as_complex(Zr)

    def modulus(self, W: torch.Tensor, scale: float, dest, at: int, role: str):
        lead, nl, (m, k) = W.shape[:-3], W.shape[-3], W.shape[-2:]
        if W.requires_grad:
            r = _StableModulus.apply(W)
        elif self.ws is None:
            r = W.abs() if W.device.type != "cpu" else _modulus_real_view(W)
        else:  # in the workspace: squares in place in W, the sum into dest, then sqrt
            if dest is None:
                dest = self._buf(role, (*lead, self.geo.L, m, k), self.plan.dtype)
            target = dest.narrow(-3, at, nl)
            sq = torch.view_as_real(W)
            torch.mul(sq, sq, out=sq)
            torch.add(sq[..., 0], sq[..., 1], out=target)
            target.sqrt_()
            if scale != 1.0:
                target.mul_(scale)
            return dest
        if scale != 1.0:
            r = r * scale
        if dest is None and nl == self.geo.L:
            return r
        if dest is None:
            dest = torch.empty((*lead, self.geo.L, m, k), dtype=r.dtype, device=r.device)
        dest[..., at:at + nl, :, :] = r
        return dest

    def lowpass(self, U: torch.Tensor, res: int, out: torch.Tensor, channels: np.ndarray):
        A, Bt = self.plan.lp[res] if res >= 0 else self.plan.lp0
        if self.ws is None:
            S = torch.matmul(torch.matmul(A, U), Bt)
        else:
            lead, k = U.shape[:-2], U.shape[-1]
            T = self._buf("lpT", (*lead, self.geo.Mo, k), self.plan.dtype)
            torch.matmul(A, U, out=T)  # rows first: (Mo, m) @ (..., m, k)
            S = self._buf("lpS", (*lead, self.geo.Mo, self.geo.No), self.plan.dtype)
            torch.matmul(T, Bt, out=S)  # one GEMM: (... * Mo, k) @ (k, No)
        if channels.ndim == 0:
            out[:, int(channels)] = S
        elif channels.ndim == 1 and np.all(np.diff(channels) == 1):
            out[:, int(channels[0]):int(channels[-1]) + 1] = S
        else:
            out[:, self.plan.channel_index(channels)] = S.to(out.dtype)


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
    """Transform the maps xs (n, M, N) into out (n, K, Mo, No) on CPU (no autograd).

    ``workers`` pipelines, each single-threaded with its own workspace, take ``group`` maps at a
    time from a shared counter (dynamic schedule); with ``workers == 1`` it runs in the caller's
    thread with the caller's intra-op threads.
    """
    n = xs.shape[0]
    counter = itertools.count()
    lock = threading.Lock()

    def work() -> None:
        ws = plan.workspace()
        ops = plan.ops(ws)
        with torch.no_grad():
            while True:
                with lock:
                    i = next(counter) * group
                if i >= n:
                    return
                xg = xs[i:i + group].to(plan.dtype).contiguous()
                og = out[i:i + group]
                if not plan.writes_float32_only or (og.dtype == torch.float32
                                                    and og.is_contiguous()):
                    scatter(ops, xg, og, theta_block)
                else:  # the C low-pass writes float32: stage, then convert (e.g. to float16)
                    key = ("stage", tuple(og.shape))
                    if key not in ws:
                        ws[key] = torch.empty(og.shape, dtype=torch.float32)
                    scatter(ops, xg, ws[key], theta_block)
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
