"""Error of the cached-coefficient flip used by detection training (scatstore.loaders.detection).

For every image of the demo COCO layout, encoded as a scat1 store (keep-aspect canvas), the valid
cells of a sample are flipped in coefficient space (orientation permutation + spatial flip,
``flip_coefficients`` with each ``align``) and compared with what the encoder stores for the mirror
image of those cells (their canvas pixels flipped, on a reflected canvas, scattered): relative L2
error over the valid cells, median over images. Prints one table row per (size, J, align).

    python benchmarks/detection_flip.py [--sizes 160 224] [--J 3] [--images 12]
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch


def reference(ds, i, J, size):
    from scatstore import Scattering2D
    from scatstore.sources import discover
    from scatstore.sources.samples import FrameSpec, prepare_item

    index = discover(ds.manifest["source"]["root"], layout="coco")
    meta = ds.meta(i)
    item = next(it for it in index.items if it.meta["image_id"] == meta["image_id"])
    (pixels, _, (h, w)), = prepare_item(index.abspath(item), item, [0], FrameSpec(size, keep_aspect=True))
    c = 2 ** J
    hc, wc = math.ceil(h / c), math.ceil(w / c)
    crop = pixels[:, :hc * c, :wc * c][:, :, ::-1]
    canvas = np.pad(crop, ((0, 0), (0, size - crop.shape[1]), (0, size - crop.shape[2])), mode="reflect")
    S = Scattering2D(J=J, shape=(size, size), L=8, max_order=1)
    ref = S(torch.from_numpy(np.ascontiguousarray(canvas)).float().div(255)[None])
    return ref.reshape(-1, size // c, size // c)[:, :hc, :wc]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    ap.add_argument("--J", type=int, default=3)
    ap.add_argument("--images", type=int, default=12)
    a = ap.parse_args()
    from scatstore.loaders.detection import StoreDetection
    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.sources.demo_data import make_coco_layout
    from scatstore.transforms.flip import flip_coefficients

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        src = make_coco_layout(Path(tmp) / "coco", n_images=a.images, seed=0)
        print(f"| size | J | align | median rel. L2 | max | images |\n| --- | --- | --- | --- | --- | --- |")
        for size in a.sizes:
            out = Path(tmp) / f"s{size}"
            encode(EncodeConfig(src=src, out=out, method="scat1", J=a.J, size=size, format="zarr",
                                shard_size=16, progress=False), log=lambda m: None)
            ds = StoreDetection(out)
            refs = [reference(ds, i, a.J, size) for i in range(len(ds))]
            for align in ("none", "cell", "interp"):
                errs = []
                for i, ref in enumerate(refs):
                    x, _ = ds[i]
                    got = flip_coefficients(x, a.J, 8, 1, align=align)
                    errs.append(float((got - ref).norm() / ref.norm()))
                print(f"| {size} | {a.J} | {align} | {100 * np.median(errs):.1f} % | "
                      f"{100 * max(errs):.1f} % | {len(errs)} |")


if __name__ == "__main__":
    main()
