"""``scatstore study SRC OUT``: what each representation saves and costs, measured side by side."""
from __future__ import annotations

import os
import sys

import click

from .common import DeviceParam, fail


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def _list_representations(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    from scatstore.pipelines.study import REPRESENTATIONS

    for r in REPRESENTATIONS.values():
        click.echo(f"{r.name:<20} {r.kind:<11} {r.label}")
    click.echo(f"{'cae-<codec>':<20} {'latent':<11} one row per --codec file (or --fit-codec)")
    ctx.exit(0)


@click.command("study")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option("--val", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
              help="Held-out images (same class folders). Default: a stratified 25 % of SRC.")
@click.option("--holdout", type=float, default=0.25, show_default=True,
              help="Without --val: the fraction of each class held out of SRC for scoring.")
@click.option("--methods", default=None,
              help="Comma-separated representation names or globs (e.g. 'jpeg-*,scat1-J3-*'); "
                   "default: all. `scatstore study --list` names them.")
@click.option("--codec", "codecs", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="A codec file from `scatstore fit-codec` (one operating point; repeat for more).")
@click.option("--fit-codec", is_flag=True,
              help="Fit the three cae operating points (C=8/16/32 at 0.098/0.33/0.64 bpp) on SRC.")
@click.option("--codec-steps", type=int, default=300, show_default=True, help="Steps per codec with --fit-codec.")
@click.option("--train", "train", default=None,
              help="Also train the real model on every row: 'auto' (scatstore train's default "
                   "per store: resnet18, scatresnet50 for scat1, scatresnet10 for scat2, cresnet51) "
                   "or comma-separated archs, the first that reads a row's input kind is used.")
@click.option("--epochs", type=int, default=8, show_default=True, help="Epochs of --train.")
@click.option("--train-batch-size", type=int, default=32, show_default=True)
@click.option("--budget", type=float, default=None,
              help="Seconds of --train per representation: training stops after the epoch that crosses it.")
@click.option("--device", type=DeviceParam(), default="cpu", show_default=True,
              help="Device of the encode jobs' transforms, of --fit-codec and of --train.")
@click.option("--size", type=int, default=224, show_default=True, help="Stored frame side in pixels.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Loader batch of the measurements.")
@click.option("--num-workers", type=int, default=2, show_default=True, help="Loader threads / worker processes.")
@click.option("--loader-seconds", type=float, default=1.0, show_default=True, help="Duration of one loader run.")
@click.option("--loader-repeats", type=int, default=3, show_default=True, help="Loader runs per row (median).")
@click.option("--recon-images", type=int, default=3, show_default=True,
              help="Images on the reconstruction sheet (0: none).")
@click.option("--recon-steps", type=int, default=60, show_default=True, help="Gradient steps per scattering inversion.")
@click.option("--detection", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
              help="A COCO source (annotations/instances_*.json + images/): add detection rows, "
                   "Faster R-CNN trained from stored scat1 J=3 and from its JPEGs, AP by pycocotools.")
@click.option("--detection-val", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
              help="Held-out COCO source the detection AP is scored on (default: the training images).")
@click.option("--detection-epochs", type=int, default=20, show_default=True, help="Epochs of each detector.")
@click.option("--detection-size", type=int, default=128, show_default=True,
              help="Keep-aspect canvas side of the detection inputs in pixels.")
@click.option("--list", "list_only", is_flag=True, is_eager=True, expose_value=False,
              callback=_list_representations, help="List the representations and exit.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def study_cmd(src, out, val, holdout, methods, codecs, fit_codec, codec_steps, train, epochs, train_batch_size,
              budget, device, size, batch_size, num_workers, loader_seconds, loader_repeats,
              recon_images, recon_steps, detection, detection_val, detection_epochs, detection_size,
              quiet):
    """Encode SRC into every representation under OUT (reused when present), measure bytes,
    loader speed, model cost and accuracy, and write OUT/study.json, OUT/study.md and PNG figures."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from scatstore.pipelines.study import StudyConfig, StudyError, format_markdown, run_study

    try:
        cfg = StudyConfig(src=src, out=out, val=val, holdout=holdout, methods=_csv(methods), codecs=list(codecs),
                          fit_codec=fit_codec, codec_steps=codec_steps, size=size,
                          batch_size=batch_size, num_workers=num_workers,
                          loader_seconds=loader_seconds, loader_repeats=loader_repeats,
                          train_archs=_csv(train), epochs=epochs, train_batch_size=train_batch_size,
                          budget_s=budget, device=device, recon_images=recon_images,
                          recon_steps=recon_steps, detection=detection, detection_val=detection_val,
                          detection_epochs=detection_epochs, detection_size=detection_size,
                          progress=not quiet and sys.stderr.isatty())
        result = run_study(cfg)
    except StudyError as exc:
        fail(str(exc))
    click.echo(format_markdown(result))
    click.echo(f"study: {result['elapsed_s']:.0f} s → {out}/study.json, study.md, "
               + ", ".join(result["figures"].values()))
