"""Loader throughput (issue 4's goals): scatstore loader per store format vs a JPEG DataLoader and a
plain webdataset pipeline, from the page cache, on this machine's cores.

Builds, under ``--workdir`` (kept between runs, so the second run skips the build):

- ``jpeg/``: an ImageNet-layout folder of ``--images`` JPEGs (q90, 375–500 px sides, from the
  photos and textures shipped in scikit-image);
- scat1 J=3 float16 coefficients of those images at 224² (3×25×28×28, 117.6 kB/sample), tiled to
  ``--samples`` samples, written through the store writers as zarr (compression none and zstd),
  webdataset, and HDF5 (none and the default gzip), plus a uint8-quantized zarr store.

Then prints one table (medians of ``--repeats`` runs of ``--seconds`` each):
samples/s, MB/s, ratio to the JPEG pipeline and to plain webdataset.

Usage: python benchmarks/loading.py [--workdir /tmp/scatstore-bench-load] [--samples 4096]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def build_jpegs(dst: Path, n_images: int) -> Path:
    from scatstore.sources.demo_data import DEMO_CLASSES, make_imagenet_layout

    if not (dst / "LOC_synset_mapping.txt").exists():
        per = max(1, -(-n_images // len(DEMO_CLASSES)))
        make_imagenet_layout(dst, n_per_class=per, size_range=(375, 500), seed=0)
    return dst


def coefficients(src: Path, cache: Path):
    """scat1 J=3 float16 coefficients (n, 3, 25, 28, 28) and labels of the JPEGs under ``src``."""
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["x"], z["y"]
    from scatstore.sources import decode_image, discover, resize_center_crop
    from scatstore.transforms.methods import make_method

    index = discover(src)
    imgs = np.stack([resize_center_crop(decode_image(str(Path(index.root) / it.path)), 224)[0]
                     for it in index.items])
    method = make_method("scat1", J=3)
    xs = [method.encode(np.ascontiguousarray(imgs[i:i + 32])) for i in range(0, len(imgs), 32)]
    x = np.concatenate(xs).astype(np.float16)
    y = np.asarray([it.label for it in index.items], dtype=np.int64)
    np.savez(cache, x=x, y=y)
    return x, y


def build_store(out: Path, fmt: str, x: np.ndarray, y: np.ndarray, n: int, *, compression: str,
                dtype: str = "float16", shard_size: int = 512, class_names=()) -> Path:
    from scatstore.stores import ShardBatch, StoreSpec, writer_for
    from scatstore.transforms.quantize import quantize_uint8

    if (out / "manifest.json").exists():
        return out
    quant = dtype == "uint8"
    spec = StoreSpec(format=fmt, n_slots=n, shard_size=shard_size, sample_shape=tuple(x.shape[1:]),
                     dtype=dtype, quantized=quant, compression=compression)
    w = writer_for(out, spec)
    w.prepare()
    recs = []
    m = len(x)
    for s in range(spec.n_shards):
        lo, hi = spec.shard_range(s)
        slots = np.arange(lo, hi)
        src = slots % m  # consecutive samples are distinct images (no intra-chunk repeats)
        kw = {}
        xs = x[src]
        if quant:
            q, qs, qo = quantize_uint8(xs.astype(np.float32))
            xs, kw = q, {"qscale": qs, "qoffset": qo}
        recs.append(w.write_shard(s, ShardBatch(slots=slots, keys=[f"s{i:07d}" for i in slots],
                                                x=np.ascontiguousarray(xs), y=y[src],
                                                meta=[{} for _ in slots], **kw)))
    w.finalize({"method": {"name": "scat1", "params": {"J": 3, "L": 8, "max_order": 1}},
                "class_names": list(class_names),
                "preprocess": {"size": 224, "augment": 0}}, recs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/scatstore-bench-load")
    ap.add_argument("--images", type=int, default=250)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma list of rows to run (store names, jpeg, wds-plain)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    from scatstore.loaders import bench
    from scatstore.sources.demo_data import DEMO_CLASSES

    torch.set_num_threads(2)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jpeg = build_jpegs(work / "jpeg", a.images)
    x, y = coefficients(jpeg, work / "coefficients.npz")
    names = [c[2] for c in DEMO_CLASSES]
    stores = {
        "zarr-none": ("zarr", "none", "float16"),
        "zarr-zstd": ("zarr", "default", "float16"),
        "wds": ("wds", "default", "float16"),
        "h5-none": ("h5", "none", "float16"),
        "h5-gzip": ("h5", "default", "float16"),
        "zarr-uint8-none": ("zarr", "none", "uint8"),
    }
    only = set(filter(None, a.only.split(",")))
    paths = {}
    for name, (fmt, comp, dt) in stores.items():
        if only and name not in only and not (name == "wds" and "wds-plain" in only):
            continue
        paths[name] = build_store(work / name, fmt, x, y, a.samples, compression=comp, dtype=dt,
                                  class_names=names)
    print(f"data ready in {time.perf_counter() - t0:.0f} s under {work} "
          f"({a.samples} samples, {len(x)} distinct images)", file=sys.stderr)

    rows, results = [], {}
    for name, p in paths.items():
        if only and name not in only:
            continue
        bench.warm_files([p])
        for dt in ((torch.float32, None) if name in ("zarr-none", "wds", "h5-none") else (torch.float32,)):
            r = bench.measure_loader(p, a.batch_size, a.num_workers, a.seconds, a.repeats, dtype=dt)
            r["what"] = f"scatstore {name}" + (" (float16 out)" if dt is None else "")
            rows.append(r)
            results[r["what"]] = r
            print(f"  {r['what']}: {r['samples_per_s']:,.0f} samples/s", file=sys.stderr)
    plain = jpg = None
    if (not only or "wds-plain" in only) and "wds" in paths:
        plain = bench.measure_plain_wds(paths["wds"], a.batch_size, a.num_workers, a.seconds, a.repeats)
        results["plain webdataset"] = plain
        print(f"  plain wds: {plain['samples_per_s']:,.0f} samples/s", file=sys.stderr)
    if not only or "jpeg" in only:
        bench.warm_files([jpeg])
        jpg = bench.measure_jpeg(jpeg, a.batch_size, a.num_workers, a.seconds, a.repeats)
        results["jpeg"] = jpg
        print(f"  jpeg: {jpg['samples_per_s']:,.0f} samples/s", file=sys.stderr)
    print(bench.format_table(rows, jpg, plain))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
