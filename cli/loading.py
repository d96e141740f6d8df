"""``scatstore bench-load DATA [--jpeg SRC]``: loader throughput against the usual pipelines."""
from __future__ import annotations

import json
import os

import click

from .common import DeviceParam, fail


@click.command("bench-load")
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--jpeg", "jpeg", type=click.Path(exists=True, file_okay=False), default=None,
              help="Source image folder of the same images: time the JPEG decode+crop DataLoader.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True,
              help="Reader threads (scatstore) / DataLoader worker processes (baselines).")
@click.option("--seconds", type=float, default=5.0, show_default=True, help="Duration of one run.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Runs per row (median).")
@click.option("--device", type=DeviceParam(), default="cpu", show_default=True,
              help="Device the batches go to.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench_load_cmd(data, jpeg, batch_size, num_workers, seconds, repeats, device, as_json):
    """Samples/s and MB/s of the scatstore loader over each DATA store, from the page cache,
    against (a) a JPEG decode + resize + crop DataLoader over --jpeg and (b) a plain webdataset
    pipeline over the same tar shards (when a DATA store is a webdataset store); prints the ratios.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool


    from scatstore.loaders import bench
    from scatstore.stores import StoreError, get_format, read_manifest

    rows, plain, jpg = [], None, None
    try:
        for path in data:
            m = read_manifest(path)
            bench.warm_files([path])
            r = bench.measure_loader(path, batch_size, max(1, num_workers), seconds, repeats,
                                     device=device)
            r["what"] = f"scatstore {m['store']['format']} {m['dtype']} ({os.path.basename(os.path.normpath(path))})"
            rows.append(r)
            if plain is None and get_format(m["store"]["format"]).webdataset_urls is not None \
                    and m["dtype"] != "bytes":
                plain = bench.measure_plain_wds(path, batch_size, num_workers, seconds, repeats)
        if jpeg:
            bench.warm_files([jpeg])
            jpg = bench.measure_jpeg(jpeg, batch_size, num_workers, seconds, repeats)
    except (StoreError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps({"loader": rows, "plain_webdataset": plain, "jpeg": jpg},
                              indent=2, default=str))
        return
    click.echo(bench.format_table(rows, jpg, plain))
    for r in rows:
        extra = []
        if jpg:
            extra.append(f"{r['samples_per_s'] / jpg['samples_per_s']:.1f}x the JPEG pipeline")
        if plain:
            extra.append(f"{r['samples_per_s'] / plain['samples_per_s']:.1f}x plain webdataset")
        if extra:
            click.echo(f"{r['what']}: " + ", ".join(extra))

