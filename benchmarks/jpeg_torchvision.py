"""torchvision's JPEG pipeline as a loader baseline, run by ``benchmarks/loading.py``.

Standalone on purpose (imports only torch, torchvision and the standard library): it runs under
any Python that has a working torchvision, e.g. a separate virtual environment with
``torch==2.14.1 torchvision==0.29.1`` when the project's own torch has no matching torchvision
(PyPI's torchvision wheels need libtorch_cuda, which the CPU build of torch 2.13 lacks).

Pipeline, the usual ImageNet evaluation transform on uint8 tensors: ``torchvision.io.decode_jpeg``
(libjpeg-turbo) -> ``Resize(256)`` (antialiased bilinear) -> ``CenterCrop(224)`` -> float32 in
[0, 1] -> ``Normalize`` (ImageNet mean/std); a ``DataLoader`` with ``--num-workers`` worker
processes, batch ``--batch-size``, shuffled. Prints one JSON line: samples/s per round (after a
warm-up of one pass), CPU µs per sample (this process and its workers, from /proc), the torch/torchvision versions and the settings.

Usage: python jpeg_torchvision.py ROOT [--batch-size 256] [--num-workers 2] [--seconds 3]
       [--rounds 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args(argv)

    import torch
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2

    torch.set_num_threads(1)
    files = []
    for dirpath, _, names in os.walk(a.root):
        files += [os.path.join(dirpath, n) for n in names if n.lower().endswith((".jpg", ".jpeg"))]
    files.sort()
    if not files:
        print(json.dumps({"error": f"no JPEG under {a.root}"}))
        return 1
    tf = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224),
                     v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])

    # an epoch of at least 16 batches, cycling over the files: with fewer samples than
    # num_workers x batch_size, an epoch would keep only some of the workers busy
    n_items = max(len(files), 16 * a.batch_size)

    class Jpegs(torch.utils.data.Dataset):
        def __len__(self):
            return n_items

        def __getitem__(self, i):
            img = decode_jpeg(read_file(files[i % len(files)]), mode=ImageReadMode.RGB)
            return tf(img), i % 1000

    dl = torch.utils.data.DataLoader(Jpegs(), batch_size=a.batch_size, shuffle=True,
                                     num_workers=a.num_workers, drop_last=False,
                                     persistent_workers=a.num_workers > 0,
                                     prefetch_factor=4 if a.num_workers else None)

    def batches():
        while True:
            yield from dl

    it = batches()
    n0 = 0
    while n0 < max(len(files), 2 * a.batch_size * max(1, a.num_workers)):  # warm-up: workers started, files in the page cache
        n0 += int(next(it)[1].shape[0])
    def cpu_seconds() -> float:
        """CPU time of this process and of the DataLoader's worker processes so far."""
        tck = os.sysconf("SC_CLK_TCK")
        total = sum(os.times()[:2])
        for w in getattr(dl._iterator, "_workers", []) if dl._iterator is not None else []:
            try:
                with open(f"/proc/{w.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tck
            except (OSError, IndexError, ValueError):
                pass
        return total

    rounds, cpu_us = [], []
    for _ in range(a.rounds):
        n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
        while time.perf_counter() - t0 < a.seconds:
            n += int(next(it)[1].shape[0])
        rounds.append(n / (time.perf_counter() - t0))
        cpu_us.append((cpu_seconds() - c0) / max(n, 1) * 1e6)
    print(json.dumps({"samples_per_s": rounds, "cpu_us_per_sample": cpu_us,
                      "torch": torch.__version__,
                      "torchvision": torchvision.__version__, "files": len(files),
                      "batch_size": a.batch_size, "num_workers": a.num_workers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
