"""The fixed costs of an encode job at many files: what a run spends besides decoding,
transforming and writing samples, and what a re-run of a finished job costs.

Builds an ImageNet layout of ``--classes`` × ``--per-class`` files that are hard links to one tiny
JPEG per class (a photo of scikit-image's, 64×48): a file count of ImageNet's order without its
gigabytes. Then times, medians of ``--repeats``:

- listing the sources (``discover``: walk, sort, keys, sizes; the fingerprint),
- a whole ``encode`` of them (``--method raw --size 32``, zarr, ``--shard-size`` samples per shard),
  from which the commit (shard records → global arrays → manifest) is reported separately,
- a re-run of the finished job (nothing to do: listing, verifying every shard's checksum,
  committing again).

Usage: python benchmarks/job_overhead.py [--classes 100] [--per-class 200] [--shard-size 1000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def build_source(root: Path, classes: int, per_class: int) -> int:
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        base = d / f"n{c:08d}_0.JPEG"
        Image.fromarray(np.asarray(photos[c % len(photos)])).resize((64, 48)).save(base, quality=90)
        for i in range(1, per_class):
            os.link(base, d / f"n{c:08d}_{i}.JPEG")
    return classes * per_class


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import scatstore.pipelines.encode.manifest as engine
    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.sources import discover

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        n = build_source(src, args.classes, args.per_class)
        cfg = dict(src=src, out=out, method="raw", size=32, shard_size=args.shard_size,
                   progress=False)
        commit_times: list[float] = []
        real_commit = engine.commit

        def timed_commit(*a, **kw):
            t0 = time.perf_counter()
            try:
                return real_commit(*a, **kw)
            finally:
                commit_times.append(time.perf_counter() - t0)

        engine.commit = timed_commit
        rows: dict[str, list[float]] = {"list the sources (discover + fingerprint)": [],
                                        "encode, whole job": [], "  of which: commit": [],
                                        "re-run of the finished job": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            discover(src).fingerprint()
            rows["list the sources (discover + fingerprint)"].append(time.perf_counter() - t0)
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            encode(EncodeConfig(**cfg), log=lambda m: None)
            rows["encode, whole job"].append(time.perf_counter() - t0)
            rows["  of which: commit"].append(commit_times[-1])
            t0 = time.perf_counter()
            encode(EncodeConfig(**cfg), log=lambda m: None)
            rows["re-run of the finished job"].append(time.perf_counter() - t0)
        engine.commit = real_commit

    print(f"{n:,} files in {args.classes} class folders (hard links to 64x48 JPEGs), raw 32², "
          f"zarr, {args.shard_size} samples per shard; {os.cpu_count()} cores; medians of "
          f"{args.repeats}")
    print(f"{'stage':44s} {'s':>7s} {'µs per file':>12s}")
    for name, vals in rows.items():
        med = statistics.median(vals)
        print(f"{name:44s} {med:7.2f} {1e6 * med / n:12.1f}")


if __name__ == "__main__":
    main()
