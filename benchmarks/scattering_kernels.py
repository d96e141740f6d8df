"""Where the CPU transform's time goes, per primitive: the C kernels next to the torch ones.

    python benchmarks/scattering_kernels.py                    # this CPU's ISA level
    python benchmarks/scattering_kernels.py --isa x86-64-v3    # also the AVX2 build (forced)
    python benchmarks/scattering_kernels.py --isa all          # every level this CPU can run

For each ISA level (each in a fresh process with ``SCATSTORE_ISA`` set, so the kernels are
built for that level: vector width and tiles of that target), one pipeline of the CPU transform
(single thread, one RGB image = 3 maps per call, 224², J=3, orders 1 and 2) runs twice: with
every primitive on the C kernels, and with every primitive in torch (``use_native=False``). The
time spent in each primitive (``fft2`` + ``ifft2`` as "fft", ``prod_periodize``, ``modulus``,
``lowpass``) is measured by wrapping the primitive, CPU time of the thread, best of ``--reps``
rounds (on a shared machine other jobs only ever slow a round down). The "torch / C" column
is what ``_native.KERNEL_TABLE`` is filled from: a C kernel is listed for a level only where it
beat torch there.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

PRIMS = ("fft", "prod_periodize", "modulus", "lowpass")


def _profile(order: int, native: bool, reps: int) -> tuple[float, dict]:
    import torch

    from scatstore.transforms._torch_backend import TorchPlan
    from scatstore.transforms.core import scatter
    from scatstore.transforms.geometry import Geometry

    geo = Geometry(224, 224, 3, 8, order)
    plan = TorchPlan(geo, torch.device("cpu"), torch.float32, use_native=native,
                     kernels={p: "native" for p in PRIMS} if native else None)
    ops = plan.ops({})
    acc: dict[str, float] = collections.defaultdict(float)
    for name, prim in (("fft2", "fft"), ("ifft2", "fft"), ("prod_periodize", "prod_periodize"),
                       ("modulus", "modulus"), ("lowpass", "lowpass")):
        fn = getattr(ops, name)

        def timed(*a, _fn=fn, _p=prim):
            t0 = time.thread_time()
            r = _fn(*a)
            acc[_p] += time.thread_time() - t0
            return r

        setattr(ops, name, timed)
    x = torch.rand(3, 224, 224)
    out = torch.empty(3, geo.K, geo.Mo, geo.No)
    with torch.no_grad():
        scatter(ops, x, out, geo.L)  # buffers, plans
        inner = 6 if order == 1 else 2
        best, best_acc = float("inf"), {}
        for _ in range(reps):
            acc.clear()
            t0 = time.thread_time()
            for _ in range(inner):
                scatter(ops, x, out, geo.L)
            total = (time.thread_time() - t0) / inner
            if total < best:
                best, best_acc = total, {k: v / inner for k, v in acc.items()}
    return best, best_acc


def worker(reps: int) -> None:
    import torch

    torch.set_num_threads(1)
    from scatstore import _cbuild
    from scatstore.transforms import _native

    if _native.load() is None:
        raise SystemExit(f"C kernels unavailable: {_native.native_info()['reason']}")
    res = {"isa": _cbuild.isa_level(), "vf": int(_native.load().sc_vector_floats()),
           "flags": " ".join(_native.build_flags()), "cases": {}}
    for order in (1, 2):
        res["cases"][order] = {"C": _profile(order, True, reps),
                               "torch": _profile(order, False, reps)}
    print(json.dumps(res))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--isa", default="", help="ISA levels to build for, comma-separated, or "
                                              "'all' (default: this CPU's best)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.reps)
        return
    from scatstore import _cbuild

    levels = (_cbuild.isa_levels() if args.isa == "all"
              else [v for v in args.isa.split(",") if v] or [_cbuild.isa_level()])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from scattering import _machine_header  # benchmarks/scattering.py

    _machine_header()
    import torch

    print(f"# scattering primitives, 224², J=3, one RGB image per call, single thread, "
          f"torch {torch.__version__}; CPU ms, best of {args.reps} rounds")
    print("| ISA build | order | primitive | C ms | torch ms | torch / C |")
    print("|---|---|---|---|---|---|")
    for level in levels:
        env = {**os.environ, "SCATSTORE_ISA": level}
        proc = subprocess.run([sys.executable, __file__, "--worker", "--reps", str(args.reps)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {level} | failed: {proc.stderr.strip()[-300:]} |")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        name = f"{res['isa']} ({res['vf'] * 32}-bit vectors)"
        for order, c in res["cases"].items():
            (tc, ac), (tt, at) = c["C"], c["torch"]
            for p in PRIMS:
                a, b = ac.get(p, 0.0) * 1e3, at.get(p, 0.0) * 1e3
                print(f"| {name} | {order} | {p} | {a:.2f} | {b:.2f} | "
                      f"{b / a if a else float('nan'):.2f}× |")
            print(f"| {name} | {order} | **whole transform** | {tc * 1e3:.2f} | {tt * 1e3:.2f} "
                  f"| {tt / tc:.2f}× |")


if __name__ == "__main__":
    main()
