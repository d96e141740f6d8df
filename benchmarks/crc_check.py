"""Cost of checking every zarr chunk's crc32c on the bulk read path (issue 12, class 4).

Writes scat1-like float16 samples (3×25×28×28, 117.6 kB, coefficients of the skimage photographs
tiled) as zarr stores with compression ``none`` and the default zstd, then times
``ZarrBulkReader.read`` over whole chunks from the page cache with the check on (the default)
and off (the check replaced by a no-op), interleaved round by round; prints medians and ratios.

Usage: python benchmarks/crc_check.py [--samples 2048] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(root: Path, n: int, compression: str) -> Path:
    from scatstore.sample_data import PHOTOS, load_image
    from scatstore.stores import ShardBatch, StoreSpec, writer_for

    shape = (3, 25, 28, 28)
    tiles = []
    for name in PHOTOS[:8]:
        img = load_image(name).astype(np.float32) / 255
        maps = img[:224, :224].reshape(28, 8, 28, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
        tiles.append(np.repeat(maps[:, None], 25, axis=1) * np.linspace(0.2, 1, 25)[None, :, None, None])
    x = np.stack([tiles[i % len(tiles)] for i in range(n)]).astype(np.float16)
    spec = StoreSpec(format="zarr", n_slots=n, shard_size=256, sample_shape=shape,
                     compression=compression)
    w = writer_for(root, spec)
    w.prepare()
    recs = []
    for s in range(spec.n_shards):
        lo, hi = spec.shard_range(s)
        recs.append(w.write_shard(s, ShardBatch(
            slots=np.arange(lo, hi), keys=[f"s{i:06d}" for i in range(lo, hi)], x=x[lo:hi],
            y=np.zeros(hi - lo, np.int64), meta=[{} for _ in range(lo, hi)])))
    w.finalize({"method": {"name": "scat1", "params": {}}, "class_names": ["a"]}, recs)
    return root


def time_read(reader, n: int, out: np.ndarray) -> float:
    cs = reader.chunk_samples
    t = time.perf_counter()
    for a in range(0, n - cs + 1, cs):
        reader.read(np.arange(a, a + cs), out[: cs], None)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    from scatstore.loaders.readers import make_reader
    from scatstore.stores import open_dataset

    print(subprocess.run(["bash", "/work/shared/tools/machine.sh"], capture_output=True,
                         text=True).stdout.strip() or "(machine.sh not found)")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for comp in ("none", "default"):
            root = make_store(Path(d) / comp, args.samples, comp)
            on = make_reader(open_dataset(root))
            off = make_reader(open_dataset(root))
            off._check_crc = lambda *a, **k: None
            n = args.samples
            out = np.empty((on.chunk_samples, 3, 25, 28, 28), np.float16)
            mb = n * out[0].nbytes / 1e6
            time_read(on, n, out)
            time_read(off, n, out)  # page cache warm
            t_first, t_on, t_off = [], [], []
            for _ in range(args.rounds):
                fresh = make_reader(open_dataset(root))  # first epoch: every chunk checked
                t_first.append(time_read(fresh, n, out))
                t_on.append(time_read(on, n, out))    # later epochs of the same reader
                t_off.append(time_read(off, n, out))
            b = statistics.median(t_off)
            for what, ts in (("first read", t_first), ("later reads", t_on)):
                a = statistics.median(ts)
                rows.append((f"zarr {comp} ({on.mode}), {what}", n / b, n / a, mb / a, a / b))
    print(f"{'store, read':<40} {'no check s/s':>13} {'crc32c s/s':>11} {'MB/s':>7} {'time ratio':>10}")
    for r in rows:
        print(f"{r[0]:<40} {r[1]:>13,.0f} {r[2]:>11,.0f} {r[3]:>7,.0f} {r[4]:>10.3f}")


if __name__ == "__main__":
    main()
