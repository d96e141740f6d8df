"""`scatstore demo`: the main job end to end on sample data shipped with scikit-image.

Builds a small ImageNet-layout dataset (texture and photo classes) and a COCO-layout dataset from
the photographs and textures inside the scikit-image wheel, encodes them (scat1 J=3 and the raw
pixel baseline), verifies the stores and prints the reports side by side.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from scatstore.pipelines.encode import EncodeConfig, encode
from scatstore.pipelines.report import format_report, report


def run_demo(out: str | Path, n_per_class: int = 12, workers: int = 1, progress: bool = True,
             echo=print) -> dict[str, dict]:
    """Run the demo under ``out``; returns the reports keyed by store name."""
    from scatstore.sources.demo_data import make_coco_layout, make_imagenet_layout
    from scatstore.stores import verify

    out = Path(out)
    sources = out / "sources"
    imagenet = sources / "imagenet"
    coco = sources / "coco"
    # The sample sources are cheap and deterministic: rebuild them so a stale copy never leaks in.
    for path in (imagenet, coco):
        if path.exists():
            shutil.rmtree(path)
    make_imagenet_layout(imagenet, n_per_class=n_per_class, seed=0)
    make_coco_layout(coco, n_images=max(8, n_per_class), seed=0)

    jobs = {
        "imagenet-scat1-J3": dict(src=imagenet, method="scat1", J=3, format="zarr"),
        "imagenet-raw": dict(src=imagenet, method="raw", format="zarr"),
        "imagenet-scat1-J3-uint8-wds": dict(src=imagenet, method="scat1", J=3, format="wds", dtype="uint8"),
        "imagenet-scat1-J3-tc": dict(src=imagenet, method="scat1", J=3, format="zarr", dtype="tc"),
        "coco-scat1-J3": dict(src=coco, method="scat1", J=3, format="h5"),
    }
    reports = {}
    for name, job in jobs.items():
        store = out / "stores" / name
        echo(f"\n== {name}: scatstore encode {job['src']} {store} --method {job['method']} "
             f"--format {job['format']}" + (f" --J {job['J']}" if "J" in job else "")
             + (f" --dtype {job['dtype']}" if "dtype" in job else ""))
        cfg = EncodeConfig(out=store, shard_size=16, workers=workers, progress=progress, **job)
        encode(cfg, log=lambda msg: echo(msg))
        result = verify(store)
        if not result.ok:
            raise RuntimeError(f"demo store {store} failed verification: {result.damaged}")
        reports[name] = report(store)
        echo(format_report(reports[name]))
    echo("\n== summary (bytes on disk vs raw uint8 pixels, vs the source files, vs a q90 JPEG "
         "of the stored frame)")
    for name, r in reports.items():
        echo(f"{name:<30} {r['count']:>4} samples  {r['bytes_per_sample'] / 1000:>8.1f} kB/sample  "
             f"coefficients {r['coefficient_ratio']:.3f}×  bytes {r['bytes_ratio']:.3f}×  "
             f"vs source {_x(r['source_bytes_ratio'])}  vs q90 JPEG {_x(r['ratio_vs_jpeg_q90'])}  "
             f"{r['bits_per_pixel']:.2f} bpp")
    sys.stdout.flush()
    return reports


def _x(v) -> str:
    return "—" if v is None else f"{v:.3f}×"
