"""Scattering transform benchmark: scatstore vs kymatio 0.3, side by side, one table.

    python benchmarks/scattering.py                 # CPU, 2 threads, the four standard cases
    python benchmarks/scattering.py --reps 7        # more repetitions
    python benchmarks/scattering.py --isa x86-64-v3 # also the kernels built for a lower level
    python benchmarks/scattering.py --device cuda   # GPU: scatstore torch vs cupy (and kymatio)

On CPU it prints the machine (CPU model, ISA level: ``tools/machine.sh``), which kernel runs
for each primitive and why (``native_info()``), then one table: the default path, the default
path built for each lower ISA level given with ``--isa`` (``SCATSTORE_ISA``, e.g. x86-64-v3 on an
AVX-512 machine as a proxy for AVX2 CPUs; on an AVX-512 machine ``x86-64-v3`` is the default
when the CPU supports it), the pure-torch fallback (``SCATSTORE_NATIVE=0``) and kymatio, with
peak memory; then the "never slower than the fallback" guard: each scatstore variant over the
pure-torch path, which must be >= 1.

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
    elif impl.startswith("scatstore@") or impl in ("scatstore", "scatstore-torch",
                                                   "scatstore-puretorch"):
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
        times, cpu = [], []
        peak_cupy = 0
        for _ in range(reps + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            y = run()
            sync()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
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
    res = {"img_s": batch / med, "best_img_s": batch / min(times), "peak_bytes": peak,
           "times": times, "cpu": cpu[1:]}
    if impl.startswith("scatstore") and device == "cpu":
        from scatstore.transforms._native import native_info
        from scatstore.transforms.geometry import Geometry

        info = native_info(Geometry(size, size, J, 8, order))
        res["kernels"] = {"isa": info["isa"], "vector_bits": info["vector_bits"],
                          "kernels": info["kernels"]}
    return res


def run_case(impl, case, reps, threads, device):
    label, order, J, size, batch = case
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(order), str(J),
           str(size), str(batch), "--reps", str(reps), "--threads", str(threads),
           "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if impl == "scatstore-puretorch":  # the fallback path, without the fused C kernels
        env["SCATSTORE_NATIVE"] = "0"
    if impl.startswith("scatstore@"):  # the kernels built for a lower ISA level
        env["SCATSTORE_ISA"] = impl.split("@", 1)[1]
    else:
        env.pop("SCATSTORE_ISA", None)
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
    ap.add_argument("--no-pure-torch", action="store_true",
                    help="leave out scatstore's pure-torch CPU path (SCATSTORE_NATIVE=0)")
    ap.add_argument("--isa", default=None,
                    help="comma-separated lower ISA levels to build the kernels for as well "
                         "(default: x86-64-v3 on an AVX-512 CPU; '' for none)")
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
    from scatstore import _cbuild

    impls = ["scatstore"] if args.device == "cpu" else ["scatstore-torch", "scatstore-cupy"]
    if args.device == "cpu":
        levels = _cbuild.isa_levels()
        isa = args.isa if args.isa is not None else (
            "x86-64-v3" if levels[0] == "x86-64-v4" else "")
        for lvl in [v for v in isa.split(",") if v]:
            if lvl not in levels:
                raise SystemExit(f"--isa {lvl}: this CPU supports {', '.join(levels)}")
            impls.append(f"scatstore@{lvl}")
        if not args.no_pure_torch:
            impls.append("scatstore-puretorch")
    if not args.no_kymatio:
        impls.append("kymatio")

    import torch

    if args.device == "cuda":
        print(f"# device: {torch.cuda.get_device_name()}")
    else:
        _machine_header()
        from scatstore.transforms._native import native_info

        kern = native_info()
        print(f"# CPU kernels: {'C, built for ' + kern['isa'] if kern['available'] else 'none'}"
              f" ({kern['reason']}; {kern['isa_reason']}; {kern['vector_bits']}-bit vectors)")
        for p, k in kern["kernels"].items():
            print(f"#   {p}: {k} ({kern['why'][p]})")
    print(f"# scattering benchmark: device={args.device}, threads={args.threads}, "
          f"reps={args.reps}x{args.rounds} rounds, torch {torch.__version__}; img/s as median "
          f"(best), L=8, RGB float32 input")
    head = ["case", "batch"]
    for i in impls:
        head += [f"{i} img/s", f"{i} peak MiB"]
    if "kymatio" in impls:
        head += [f"{i} / kymatio" for i in impls if i != "kymatio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    guard = []
    for case in cases:
        res: dict[str, dict] = {i: {"times": [], "cpu": [], "peak_bytes": 0.0} for i in impls}
        for _ in range(args.rounds):  # alternate the implementations: same load for all
            for i in impls:
                r = run_case(i, case, args.reps, args.threads, args.device)
                if "error" in r:
                    res[i]["error"] = r["error"]
                    continue
                res[i]["times"] += r["times"]
                res[i]["cpu"] += r.get("cpu", [])
                res[i]["peak_bytes"] = max(res[i]["peak_bytes"], r["peak_bytes"])
                res[i]["kernels"] = r.get("kernels")
        batch = case[4]
        for r in res.values():
            if r["times"] and "error" not in r:
                r["img_s"] = batch / statistics.median(r["times"])
                r["best_img_s"] = batch / min(r["times"])
                r["cpu_ms"] = 1e3 * statistics.median(r["cpu"]) / batch if r["cpu"] else 0.0
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
        guard.append((case, res))
    if "scatstore-puretorch" in impls:
        _print_guard(guard, [i for i in impls if i.startswith("scatstore@") or i == "scatstore"])


def _print_guard(guard, variants) -> None:
    """Each scatstore variant over the pure-torch fallback: img/s ratio, median and best call,
    and the CPU time per image (all threads; steadier than wall time on a loaded machine):
    fallback's over the variant's. Holds when the best-call ratio or the CPU ratio is >= 1."""
    print()
    print("Never slower than the fallback (pure torch, SCATSTORE_NATIVE=0): variant / fallback "
          "in img/s (median, best call), and fallback / variant in CPU ms per image")
    print("| case | variant | kernels (fft, prod_periodize, modulus, lowpass) | img/s median "
          "| img/s best | CPU ms/img (variant, fallback) | CPU ratio | holds |")
    print("|---|---|---|---|---|---|---|---|")
    for case, res in guard:
        fb_ = res["scatstore-puretorch"]
        for v in variants:
            r = res[v]
            if "error" in r or "error" in fb_:
                print(f"| {case[0]} | {v} | - | error | error | - |")
                continue
            kk = r.get("kernels") or {}
            kern = ", ".join("C" if kk.get("kernels", {}).get(p) == "native" else "torch"
                             for p in ("fft", "prod_periodize", "modulus", "lowpass"))
            med, best = r["img_s"] / fb_["img_s"], r["best_img_s"] / fb_["best_img_s"]
            cr = fb_["cpu_ms"] / r["cpu_ms"] if r["cpu_ms"] else float("nan")
            ok = best >= 1 or cr >= 1
            print(f"| {case[0]} | {v} ({kk.get('isa', '?')}, {kk.get('vector_bits')}-bit) | "
                  f"{kern} | {med:.2f}x | {best:.2f}x | {r['cpu_ms']:.1f}, {fb_['cpu_ms']:.1f} "
                  f"| {cr:.2f}x | {'yes' if ok else 'NO'} |")


def _machine_header() -> None:
    """CPU model, ISA level and bandwidths (tools/machine.sh where present), else what
    scatstore reads from the CPU."""
    from scatstore import _cbuild

    tool = "/work/shared/tools/machine.sh"
    if os.path.exists(tool):
        subprocess.run(["bash", tool], check=False)
    else:
        print(f"cpu: {_cbuild.cpu_model()}; {os.cpu_count()} cores; "
              f"isa: {_cbuild.isa_levels()[0]}")


if __name__ == "__main__":
    main()
