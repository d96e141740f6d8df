"""Loader throughput measurements shared by ``scatstore bench-load`` and ``benchmarks/loading.py``.

Each measurement warms the page cache (reads the files once), then iterates batches for about
``seconds`` (whole epochs are chained), repeats ``repeats`` times and reports the median
samples/s and MB/s (bytes read from the files, 1 MB = 10^6 bytes).

- :func:`measure_loader`: :func:`scatstore.loader` (the store's own format).
- :func:`measure_plain_wds`: a plain ``webdataset`` pipeline over the same tar shards (shard
  shuffle, 1000-sample buffer shuffle, ``.npy`` decoded with ``allow_pickle=False``, batched,
  torch ``DataLoader`` with ``num_workers`` processes), the way webdataset's documentation
  builds it.
- :func:`measure_jpeg`: the standard JPEG decode + RandomResizedCrop(224) + flip DataLoader
  (:func:`scatstore.loaders.pixels.jpeg_batches`) on the source images, same cores.
"""
from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def warm_files(paths) -> int:
    """Read every file under ``paths`` once (into the page cache); returns bytes read."""
    n = 0
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while True:
                    b = fh.read(1 << 24)
                    if not b:
                        break
                    n += len(b)
    return n


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _timed(make_iter, seconds: float, bytes_fn, warmup_batches: int = 3) -> tuple[float, float, float]:
    """(samples/s, MB/s, CPU microseconds per sample) over ~``seconds`` of batches from
    successive ``make_iter(epoch)``, after ``warmup_batches`` batches (buffers allocated and
    paged in: first-touch page faults are a one-off cost, several times the copy itself)."""
    epoch = 0
    it = iter(make_iter(epoch))

    def next_batch():
        # Chain epochs; an epoch with no batch at all (fewer samples than one batch with
        # drop_last) would otherwise spin forever.
        nonlocal it, epoch
        for _ in range(2):
            try:
                return next(it)
            except StopIteration:
                epoch += 1
                it = iter(make_iter(epoch))
        raise ValueError("the loader yields no batch: the dataset holds fewer samples than one "
                         "batch (use a smaller --batch-size)")

    for _ in range(warmup_batches):
        next_batch()
    n = 0
    b0 = bytes_fn()
    c0 = _cpu()  # worker processes count only once they have exited (RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    while True:
        x, y = next_batch()
        n += int(y.shape[0])
        if time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - t0
    nb = bytes_fn() - b0
    del it
    import gc

    gc.collect()
    return n / dt, nb / dt / 1e6, (_cpu() - c0) / max(n, 1) * 1e6


def _median(runs):
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
            statistics.median(r[2] for r in runs))


def measure_loader(path, batch_size: int = 256, num_workers: int = 2, seconds: float = 5.0,
                   repeats: int = 3, dtype=torch.float32, device: str = "cpu") -> dict:
    from scatstore.loaders.stream import loader

    ld = loader(path, batch_size, shuffle=True, seed=0, num_workers=num_workers, device=device,
                dtype=dtype)
    warm = max(3, 2 * len(ld))  # two epochs: every pooled buffer allocated and paged in
    runs = [_timed(ld, seconds, lambda: ld.bytes_read, warmup_batches=warm if i == 0 else 3)
            for i in range(repeats)]
    sps, mbs, cpu = _median(runs)
    return {"what": f"scatstore loader ({ld.spec.format}, {ld.spec.dtype}, "
                    f"{'stored dtype' if dtype is None else str(dtype).replace('torch.', '')} out)",
            "samples_per_s": sps, "mb_per_s": mbs, "cpu_us_per_sample": cpu, "runs": runs,
            "format": ld.spec.format, "count": len(ld.slots)}


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def plain_wds_pipeline(urls: list[str], batch_size: int, seed: int = 0):
    """The plain webdataset pipeline (no pickle: explicit .npy/.cls decoders)."""
    import webdataset as wds

    def to_tensors(sample):
        return torch.from_numpy(_npy(sample["x.npy"])), int(sample["cls"])

    return (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False)
            .shuffle(1000, seed=seed)
            .map(to_tensors)
            .batched(batch_size, partial=False))


def measure_plain_wds(path, batch_size: int = 256, num_workers: int = 2, seconds: float = 5.0,
                      repeats: int = 3) -> dict:
    from scatstore.stores import get_format, read_manifest

    root = Path(path)
    m = read_manifest(root)
    urls_of = get_format(m["store"]["format"]).webdataset_urls
    if urls_of is None:
        raise ValueError(f"{root} is a {m['store']['format']} store: the plain webdataset baseline "
                         "needs a store of webdataset tars")
    urls = urls_of(root, m)
    sizes = {u: os.path.getsize(u) for u in urls}
    per_sample = sum(sizes.values()) / max(1, m["count"])
    counter = {"n": 0}

    def make(epoch):
        ds = plain_wds_pipeline(urls, batch_size, seed=epoch)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None)

        def gen():
            for x, y in dl:
                counter["n"] += int(y.shape[0])
                yield x.float(), y
        return gen()

    runs = [_timed(make, seconds, lambda: int(counter["n"] * per_sample), warmup_batches=20)
            for _ in range(repeats)]
    sps, mbs, cpu = _median(runs)
    return {"what": f"plain webdataset ({num_workers} DataLoader workers, float32 out)",
            "samples_per_s": sps, "mb_per_s": mbs, "cpu_us_per_sample": cpu, "runs": runs}


def measure_jpeg(src, batch_size: int = 256, num_workers: int = 2, seconds: float = 5.0,
                 repeats: int = 3, size: int = 224) -> dict:
    from scatstore.loaders.pixels import jpeg_batches

    jb = jpeg_batches(src, batch_size, size=size, train=True, seed=0, num_workers=num_workers,
                      drop_last=False)
    runs = [_timed(jb, seconds, lambda: jb.bytes_read, warmup_batches=1) for _ in range(repeats)]
    sps, mbs, cpu = _median(runs)
    return {"what": f"JPEG decode+RandomResizedCrop {size} DataLoader ({num_workers} workers)",
            "samples_per_s": sps, "mb_per_s": mbs, "cpu_us_per_sample": cpu, "runs": runs}


def format_table(rows: list[dict], jpeg: dict | None, plain: dict | None) -> str:
    head = f"{'pipeline':<62} {'samples/s':>10} {'MB/s':>8} {'vs JPEG':>8} {'vs wds':>7}"
    lines = [head, "-" * len(head)]
    for r in rows + [x for x in (plain, jpeg) if x]:
        vj = f"{r['samples_per_s'] / jpeg['samples_per_s']:.1f}x" if jpeg else "-"
        vw = f"{r['samples_per_s'] / plain['samples_per_s']:.1f}x" if plain else "-"
        lines.append(f"{r['what']:<62} {r['samples_per_s']:>10,.0f} {r['mb_per_s']:>8,.0f} "
                     f"{vj:>8} {vw:>7}")
    return "\n".join(lines)
