"""End-to-end encode throughput next to the transform alone (issue 3's goal: ≥ 85 %).

Builds an ImageNet-layout sample set from scikit-image's shipped photos and textures (JPEG, varied
sizes around 500×375), then times, in one run:

- the scattering transform alone on already-decoded 224² batches,
- `scatstore encode` (decode + resize/crop + transform + zarr write) in-process, with
  `--workers 2`, and on a dask LocalCluster of 2 workers.

Prints a table of medians over repeats. Usage: python benchmarks/encode.py [--images 480] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def transform_alone(n_images: int, batch: int, J: int, repeats: int) -> float:
    from scatstore import Scattering2D

    S = Scattering2D(J=J, shape=(224, 224), L=8, max_order=1)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((batch, 3, 224, 224), dtype=np.float32))
    S(x)  # warm-up: filters, FFT plans
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = 0
        while done < n_images:
            out = S(x).to(torch.float16)
            done += batch
        rates.append(done / (time.perf_counter() - t0))
        del out
    return statistics.median(rates)


def encode_rate(src: Path, work: Path, repeats: int, **kw) -> tuple[float, dict]:
    from scatstore.pipelines.encode import EncodeConfig, encode

    rates = []
    manifest = {}
    for r in range(repeats):
        out = work / f"out-{r}"
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        manifest = encode(EncodeConfig(src=src, out=out, progress=False, **kw), log=lambda m: None)
        rates.append(manifest["count"] / (time.perf_counter() - t0))
        shutil.rmtree(out)
    return statistics.median(rates), manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--J", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from scatstore.sources.demo_data import make_imagenet_layout

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n_per_class = max(1, args.images // 3)
        src = make_imagenet_layout(work / "src", n_per_class=n_per_class, size_range=(375, 500), seed=0)
        n = sum(1 for _ in src.rglob("*.JPEG"))
        shard = max(8, n // 8)
        common = dict(method="scat1", J=args.J, format="zarr", shard_size=shard, batch_size=args.batch)

        rows = []
        t_alone = transform_alone(n, args.batch, args.J, args.repeats)
        rows.append(("transform alone (2 threads, decoded 224² batches)", t_alone))
        r1, _ = encode_rate(src, work, args.repeats, workers=1, **common)
        rows.append(("encode, in-process (decode threads + 2 torch threads)", r1))
        r2, _ = encode_rate(src, work, args.repeats, workers=2, **common)
        rows.append(("encode --workers 2 (process pool)", r2))
        rd, _ = encode_rate(src, work, args.repeats, workers=2, scheduler="local", **common)
        rows.append(("encode --workers 2 --scheduler local (dask)", rd))

    print(f"\nscat1 J={args.J}, 224², float16, zarr; {n} JPEGs ~500×375; "
          f"{os.cpu_count()} cores; median of {args.repeats}")
    print(f"{'pipeline':<58} {'img/s':>8} {'vs transform':>13}")
    for name, rate in rows:
        print(f"{name:<58} {rate:>8.1f} {rate / t_alone:>12.0%}")
    print(f"{'dask 2 workers / --workers 2':<58} {'':>8} {rd / r2:>12.2f}×")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
