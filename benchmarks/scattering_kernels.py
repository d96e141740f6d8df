"""Where the CPU transform's time goes: the C kernels one by one, and their FFT next to torch's.

    python benchmarks/scattering_kernels.py              # order 1 and 2, J=3, 224²
    python benchmarks/scattering_kernels.py --reps 20

Single thread (one pipeline of the CPU transform), one RGB image (3 maps) per call. Prints:

1. the 2D complex FFT per map, the kernels' own (``sc_fft2``) vs ``torch.fft.ifft2`` (MKL on x86),
   at the grid sizes of 224², J=3;
2. per RGB image, the milliseconds spent in each kernel call (timed by wrapping the calls) and
   in total, for order 1 and order 2.

CPU time of the calling thread (``time.thread_time``), best of ``--reps`` rounds: on a shared
machine other jobs only ever slow a round down.
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch


def best_ms(fn, reps: int, inner: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(inner):
            fn()
        best = min(best, (time.thread_time() - t0) / inner)
    return best * 1e3


def fft_table(lib, reps: int) -> None:
    from scatstore.transforms._torch_backend import fft_plan

    print("| grid | maps per call | own FFT ms/map | torch FFT ms/map | torch / own |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in (240, 120, 60):
        b = 6
        z = torch.from_numpy((rng.standard_normal((b, n, n))
                              + 1j * rng.standard_normal((b, n, n))).astype(np.complex64))
        out = torch.empty_like(z)
        work = torch.empty(2 * 16 * n)
        rad, tw = fft_plan(n, True)
        own = best_ms(lambda: lib.sc_fft2(z.data_ptr(), b, n, n, rad.ctypes.data, len(rad),
                                          tw.ctypes.data, rad.ctypes.data, len(rad),
                                          tw.ctypes.data, 1, work.data_ptr()), reps, 20) / b
        ref = best_ms(lambda: torch.fft.ifft2(z, out=out), reps, 20) / b
        print(f"| {n}² | {b} | {own:.3f} | {ref:.3f} | {ref / own:.2f}× |")


class _Timed:
    """Wraps the kernel library: accumulates the time of every call per function."""

    def __init__(self, lib, acc):
        self._lib, self._acc = lib, acc

    def __getattr__(self, name):
        fn = getattr(self._lib, name)

        def call(*args):
            t0 = time.thread_time()
            fn(*args)
            self._acc[name] += time.thread_time() - t0

        return call


def profile_table(order: int, reps: int) -> None:
    from scatstore.transforms._torch_backend import get_plan
    from scatstore.transforms.core import scatter
    from scatstore.transforms.geometry import Geometry

    geo = Geometry(224, 224, 3, 8, order)
    plan = get_plan(geo, torch.device("cpu"), torch.float32)
    acc: dict[str, float] = collections.defaultdict(float)
    lib = plan.native
    plan.native = _Timed(lib, acc)
    try:
        x = torch.rand(3, 224, 224)
        out = torch.empty(3, geo.K, geo.Mo, geo.No)
        ops = plan.ops({})
        scatter(ops, x, out, geo.L)  # buffers, plans
        inner = 10 if order == 1 else 3
        best, best_acc = float("inf"), {}
        for _ in range(reps):
            acc.clear()
            t0 = time.thread_time()
            for _ in range(inner):
                scatter(ops, x, out, geo.L)
            total = (time.thread_time() - t0) / inner
            if total < best:
                best, best_acc = total, {k: v / inner for k, v in acc.items()}
    finally:
        plan.native = lib
    parts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(best_acc.items()))
    rest = best - sum(best_acc.values())
    print(f"| order {order}, J=3, 224² | {best * 1e3:.2f} | {parts} | other (Python, padding, "
          f"copies) {rest * 1e3:.2f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from scatstore.transforms._native import load, native_info

    lib = load()
    if lib is None:
        raise SystemExit(f"C kernels unavailable: {native_info()['reason']}")
    print(f"# scattering kernels, single thread, torch {torch.__version__}; CPU ms, best of "
          f"{args.reps} rounds")
    fft_table(lib, args.reps)
    print()
    print("| case | ms per RGB image | per kernel (ms) | rest (ms) |")
    print("|---|---|---|---|")
    for order in (1, 2):
        profile_table(order, args.reps)


if __name__ == "__main__":
    main()
