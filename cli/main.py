"""Entry point of the ``scatstore`` command: a thin layer over the library.

Sub-commands are imported on first use so that ``scatstore --help`` does not import torch.
"""
from __future__ import annotations

import importlib
import json
import sys

import click

from scatstore import __version__

from scatstore.stores.registry import format_names

from .common import DeviceParam, StoreLocation, fail

# command name -> "module:attribute" of a click command defined elsewhere in scatstore.cli
_LAZY_COMMANDS = {
    "train": "scatstore.cli.train:train_cmd",
    "bench-load": "scatstore.cli.loading:bench_load_cmd",
    "fit-codec": "scatstore.cli.codec:fit_codec_cmd",
    "decode": "scatstore.cli.codec:decode_cmd",
    "study": "scatstore.cli.study:study_cmd",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def get_command(self, ctx, name):
        if name in _LAZY_COMMANDS:
            module, attr = _LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scatstore")
def main() -> None:
    """Encode image datasets once into compact tensors and stream them into training.

    \b
    Typical use:
      scatstore encode /data/imagenet/train out/ --method scat1 --J 3
      scatstore report out/
      scatstore train out/ --arch scatresnet50 --epochs 90
    """


@main.command("encode")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--method", type=click.Choice(["scat1", "scat2", "raw", "cae"]), default="scat1",
              show_default=True, help="Representation to store.")
@click.option("--J", "J", type=int, default=None, help="Scattering scale (2^J subsampling)  [default: 3; scat1/scat2 only]")
@click.option("--L", "L", type=int, default=None, help="Scattering orientations  [default: 8; scat1/scat2 only]")
@click.option("--codec", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Codec file for --method cae (from `scatstore fit-codec`).")
@click.option("--format", "fmt", type=click.Choice(list(format_names())), default="zarr",
              show_default=True, help="Store format.")
@click.option("--shard-size", type=int, default=512, show_default=True, help="Samples per shard.")
@click.option("--size", type=int, default=224, show_default=True, help="Stored image side in pixels.")
@click.option("--dtype", type=click.Choice(["float16", "float32", "uint8", "tc"]), default=None,
              help="Coefficient storage type (uint8: per-channel quantization; tc: transform-coded, "
                   "smaller than the JPEG, docs/coefficient_codec.md)  [default: float16; "
                   "scat1/scat2 only]")
@click.option("--quality", type=float, default=None,
              help="Quality of --dtype tc, 0..100: each +10 halves the quantization step (50: "
                   "~2.5 %% relative error)  [default: 50]")
@click.option("--compression", default="default", show_default=True,
              help="Store compression: default (zarr zstd:3, h5 gzip:1, wds none), none, zstd[:1-22] "
                   "(zarr), gzip[:0-9] (zarr, h5), lzf (h5). 'none' streams fastest (docs/loading.md).")
@click.option("--layout", type=click.Choice(["auto", "imagenet", "coco", "folder"]), default="auto",
              show_default=True, help="Source layout.")
@click.option("--split", default=None, help="COCO: which instances_<split>.json to use.")
@click.option("--augment", type=int, default=0, show_default=True,
              help="Store K random-resized-crop+flip variants per image (0: one centre crop).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the augment variants.")
@click.option("--workers", type=int, default=1, show_default=True, help="Parallel workers: N worker processes, or with --scheduler local N dask worker "
                   "threads. 1: one process, decode threads ahead of a transform thread per core "
                   "(the fastest on one machine).")
@click.option("--scheduler", default=None,
              help="Run on dask.distributed: a scheduler ADDRESS, or 'local' for a LocalCluster of --workers threads in this process.")
@click.option("--device", type=DeviceParam(), default="cpu", show_default=True,
              help="Device of the transform (cpu, cuda, cuda:1).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per transform call.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def encode_cmd(src, out, method, J, L, codec, fmt, shard_size, size, dtype, quality, compression, layout, split, augment,
               seed, workers, scheduler, device, batch_size, quiet):
    """Encode the images under SRC into a sharded store at OUT (re-run to resume)."""
    from scatstore.pipelines.encode import (EncodeConfig, EncodeError, JobTerminated, OptionError,
                                            encode)

    try:
        cfg = EncodeConfig(src=src, out=out, method=method, J=J, L=L, codec=codec, format=fmt,
                           shard_size=shard_size, size=size, dtype=dtype, quality=quality,
                           compression=compression, layout=layout, split=split,
                           augment=augment, seed=seed, workers=workers, scheduler=scheduler,
                           device=device, batch_size=batch_size, progress=not quiet)
        manifest = encode(cfg)
    except OptionError as exc:  # the library names the field: say the flag
        fail(f"--{exc.option.replace('_', '-')}: {exc.problem}")
    except EncodeError as exc:
        fail(str(exc))
    except KeyboardInterrupt as exc:  # encode said what is committed and how to resume
        sys.exit(143 if isinstance(exc, JobTerminated) else 130)  # 128 + the signal's number
    if not manifest["count"]:  # committed (for report and rejected.jsonl), but nothing to train on
        fail(f"no source file of {src} could be used: see {out}/rejected.jsonl", 1)


@main.command("report")
@click.argument("out", type=StoreLocation())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (keys in docs/format.md).")
def report_cmd(out, as_json):
    """Storage, ratios against raw pixels and source files, bits per pixel."""
    from scatstore.pipelines.report import format_report, report
    from scatstore.stores import StoreError

    try:
        r = report(out)
    except StoreError as exc:
        fail(str(exc))
    click.echo(json.dumps(r, indent=2) if as_json else format_report(r))


@main.command("verify")
@click.argument("out", type=StoreLocation())
def verify_cmd(out):
    """Check the manifest, every file's checksum, archive members, unlisted files and the counts;
    print every problem and exit 1 when there is any."""
    from scatstore.stores import verify

    result = verify(out)
    if result.ok:
        click.echo(f"ok: {out} ({result.count} samples, {result.n_shards} shards, "
                   f"{result.files_checked} files checked)")
        return
    for line in result.lines():
        click.echo(line, err=True)
    click.echo(f"scatstore: error: {out}: {len(result.damaged)} damaged files or samples, "
               f"{len(result.problems)} other problems", err=True)
    sys.exit(1)


@main.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Working directory for the sample sources and stores.")
@click.option("--n-per-class", type=int, default=12, show_default=True, help="Images per demo class.")
@click.option("--workers", type=int, default=1, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(out, n_per_class, workers, quiet):
    """Build sample ImageNet/COCO datasets from skimage's photos, encode them and report."""
    from scatstore.pipelines.demo import run_demo
    from scatstore.pipelines.encode import EncodeError

    try:
        run_demo(out, n_per_class=n_per_class, workers=workers, progress=not quiet)
    except EncodeError as exc:
        fail(str(exc))


if __name__ == "__main__":
    main()
