"""Scattering transform benchmark: scatstore vs kymatio 0.3, side by side, one table.

    python benchmarks/scattering.py                 # CPU, 2 threads, the four standard cases
    python benchmarks/scattering.py --reps 7        # more repetitions
    python benchmarks/scattering.py --pure-torch    # also the pure-torch CPU path (no C kernels)
    python benchmarks/scattering.py --device cuda   # GPU: scatstore torch vs cupy (and kymatio)

Method
------
Every (implementation, case) runs in its own fresh Python process, so that the two libraries
never share a heap. In that process: build the transform, run it once on the full batch (warm-up:
filters, FFT plans) on a single image, reset the peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), run the full batch once (its peak is the memory figure) and
then ``--reps`` more times for the median images/s. "peak MiB" is the growth of the process's
peak resident memory (VmHWM) over its resident memory just before the full-batch calls, i.e. the
transient working set of one call including its output. On CUDA it is
``torch.cuda.max_memory_allocated`` (torch) or the CuPy pool's high-water mark above the input.
The implementations of one case run alternately, ``--rounds`` fresh processes each, so the ratio
is taken under the same machine load. The table gives the median over all timed calls and, in
parentheses, the best call: on a shared machine other jobs only ever slow a call down, so the
best-of figures and their ratio are the steadier ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# (label, max_order, J, size, batch)
CASES = [
    ("order 1, J=3, 224²", 1, 3, 224, 16),
    ("order 2, J=3, 224²", 2, 3, 224, 8),
    ("order 1, J=4, 224²", 1, 4, 224, 16),
    ("order 2, J=2, 32², batch 128", 2, 2, 32, 128),
]
GPU_CASES = [
    ("order 1, J=3, 224²", 1, 3, 224, 256),
    ("order 2, J=3, 224²", 2, 3, 224, 64),
    ("order 1, J=4, 224²", 1, 4, 224, 256),
    ("order 2, J=2, 32², batch 1024", 2, 2, 32, 1024),
]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(impl: str, order: int, J: int, size: int, batch: int, reps: int, threads: int,
           device: str) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x_np = rng.random((batch, 3, size, size), dtype=np.float32)
    if impl == "kymatio":
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        S = ScatteringTorch2D(J, (size, size), L=8, max_order=order)
        if device == "cuda":
            S = S.cuda()
        x = torch.from_numpy(x_np).to(device)
        run = lambda: S(x)  # noqa: E731
    elif impl in ("scatstore", "scatstore-torch", "scatstore-puretorch"):
        from scatstore import Scattering2D

        S = Scattering2D(J, (size, size), L=8, max_order=order)
        x = torch.from_numpy(x_np).to(device)
        run = lambda: S(x)  # noqa: E731
    elif impl == "scatstore-cupy":
        import cupy as cp

        from scatstore import Scattering2D

        S = Scattering2D(J, (size, size), L=8, max_order=order, backend="cupy")
        x = cp.asarray(x_np)
        run = lambda: S(x)  # noqa: E731
    elif impl == "scatstore-numpy":
        from scatstore import Scattering2D

        S = Scattering2D(J, (size, size), L=8, max_order=order, backend="numpy")
        x = x_np
        run = lambda: S(x)  # noqa: E731
    else:
        raise ValueError(impl)

    def sync():
        if device == "cuda":
            if impl == "scatstore-cupy":
                import cupy as cp

                cp.cuda.Device().synchronize()
            else:
                torch.cuda.synchronize()

    with torch.no_grad():
        full = x
        x = x[:1]
        run()  # warm-up on one image: filters, plans
        x = full
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            if impl == "scatstore-cupy":
                import cupy as cp

                pool = cp.get_default_memory_pool()
                pool.free_all_blocks()
                base = pool.used_bytes()
        else:
            resettable = _reset_peak()
            base = _rss_kib("VmRSS") * 1024
        times = []
        peak_cupy = 0
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            y = run()
            sync()
            times.append(time.perf_counter() - t0)
            if impl == "scatstore-cupy":
                import cupy as cp

                peak_cupy = max(peak_cupy, cp.get_default_memory_pool().total_bytes())
            del y
    if device == "cuda":
        peak = (peak_cupy if impl == "scatstore-cupy" else torch.cuda.max_memory_allocated()) - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base if resettable else float("nan")
    times = times[1:]  # the first full-batch call counts for memory, not for speed
    med = statistics.median(times)
    return {"img_s": batch / med, "best_img_s": batch / min(times), "peak_bytes": peak,
            "times": times}


def run_case(impl, case, reps, threads, device):
    label, order, J, size, batch = case
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(order), str(J),
           str(size), str(batch), "--reps", str(reps), "--threads", str(threads),
           "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if impl == "scatstore-puretorch":  # the fallback path, without the fused C kernels
        env["SCATSTORE_NATIVE"] = "0"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2,
                    help="fresh processes per implementation and case, run alternately")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-kymatio", action="store_true")
    ap.add_argument("--pure-torch", action="store_true",
                    help="also time scatstore's pure-torch CPU path (SCATSTORE_NATIVE=0)")
    ap.add_argument("--cases", default="", help="comma-separated case numbers (1-based)")
    ap.add_argument("--worker", nargs=5, metavar=("IMPL", "ORDER", "J", "SIZE", "BATCH"))
    args = ap.parse_args(argv)
    if args.worker:
        impl, order, J, size, batch = args.worker
        res = worker(impl, int(order), int(J), int(size), int(batch), args.reps,
                     args.threads, args.device)
        print(json.dumps(res))
        return
    cases = CASES if args.device == "cpu" else GPU_CASES
    if args.cases:
        cases = [cases[int(i) - 1] for i in args.cases.split(",")]
    impls = ["scatstore"] if args.device == "cpu" else ["scatstore-torch", "scatstore-cupy"]
    if args.device == "cpu" and args.pure_torch:
        impls.append("scatstore-puretorch")
    if not args.no_kymatio:
        impls.append("kymatio")

    import torch

    dev = (torch.cuda.get_device_name() if args.device == "cuda"
           else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    from scatstore.transforms._native import native_info

    kern = native_info()
    print(f"# scattering benchmark: device={args.device} ({dev}), threads={args.threads}, "
          f"reps={args.reps}x{args.rounds} rounds, torch {torch.__version__}; img/s as median "
          f"(best), L=8, RGB float32 input; CPU kernels: "
          f"{'fused C' if kern['available'] else 'pure torch (' + kern['reason'] + ')'}")
    head = ["case", "batch"]
    for i in impls:
        head += [f"{i} img/s", f"{i} peak MiB"]
    if "kymatio" in impls:
        head += [f"{i} / kymatio" for i in impls if i != "kymatio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for case in cases:
        res: dict[str, dict] = {i: {"times": [], "peak_bytes": 0.0} for i in impls}
        for _ in range(args.rounds):  # alternate the implementations: same load for both
            for i in impls:
                r = run_case(i, case, args.reps, args.threads, args.device)
                if "error" in r:
                    res[i]["error"] = r["error"]
                    continue
                res[i]["times"] += r["times"]
                res[i]["peak_bytes"] = max(res[i]["peak_bytes"], r["peak_bytes"])
        batch = case[4]
        for r in res.values():
            if r["times"] and "error" not in r:
                r["img_s"] = batch / statistics.median(r["times"])
                r["best_img_s"] = batch / min(r["times"])
        row = [case[0], str(batch)]
        for i in impls:
            r = res[i]
            if "error" in r:
                row += ["error", r["error"][:60]]
            else:
                row += [f"{r['img_s']:.1f} ({r['best_img_s']:.1f})",
                        f"{r['peak_bytes'] / 2**20:.0f}"]
        if "kymatio" in impls:
            k = res["kymatio"]
            for i in impls:
                if i == "kymatio":
                    continue
                ok = "error" not in k and "error" not in res[i]
                row.append(f"{res[i]['img_s'] / k['img_s']:.2f}x "
                           f"({res[i]['best_img_s'] / k['best_img_s']:.2f}x)" if ok else "-")
        print("| " + " | ".join(row) + " |", flush=True)

if __name__ == "__main__":
    main()
