"""``scatstore train``: train a model on a scatstore store (or, as the baseline, on the source JPEGs).

One JSON line per epoch on stdout (rank 0), a progress bar on stderr. Under ``torchrun`` every
process runs this command; the process group is set up from the environment (gloo on CPU, nccl
on CUDA), each rank reads its own shard, and rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys

import click

from scatstore.stores.fs import is_url

from .common import DeviceParam, fail, parse_size

def _echo(msg: str) -> None:
    click.echo(f"scatstore train: {msg}", err=True)


def _store(path: str) -> dict:
    """The store's manifest, or a one-line error (no store there, or an unfinished one)."""
    from scatstore.stores import StoreError, read_manifest

    if not is_url(path) and not os.path.isdir(path):
        fail(f"{path}: no such store directory")
    try:
        return read_manifest(path)
    except StoreError as exc:
        fail(str(exc))


def _check_options(ctx, *, epochs, batch_size, lr, momentum, weight_decay, warmup_epochs,
                   num_workers, seed, image_size, num_classes, arch, pixels) -> str | None:
    """Every numeric option checked before anything is read or built: one line naming the
    option, never a traceback from deep inside torch. Returns the canonical arch (or None)."""
    import math

    def bad(opt, why):
        fail(f"{opt} {why}")

    if epochs < 1:
        bad("--epochs", f"must be >= 1, got {epochs}")
    if batch_size < 1:
        bad("--batch-size", f"must be >= 1, got {batch_size}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        bad("--lr", f"must be a finite number > 0, got {lr}")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        bad("--momentum", f"must be in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        bad("--weight-decay", f"must be a finite number >= 0, got {weight_decay}")
    if warmup_epochs < 0 or warmup_epochs >= epochs:
        bad("--warmup-epochs", f"must be in 0..{epochs - 1} (fewer than --epochs {epochs}), "
                               f"got {warmup_epochs}")
    if num_workers is not None and num_workers < 0:
        bad("--num-workers", f"must be >= 0, got {num_workers}")
    if not 0 <= seed < 2 ** 32:
        bad("--seed", f"must be in 0..2^32-1, got {seed}")
    if num_classes is not None and num_classes < 2:
        bad("--num-classes", f"a classifier needs at least 2 classes, got {num_classes}")
    if pixels is not None and image_size < 32:
        bad("--image-size", f"must be >= 32 pixels, got {image_size}")
    if pixels is None and ctx.get_parameter_source("image_size") is \
            click.core.ParameterSource.COMMANDLINE:
        _echo("warning: --image-size only applies to --pixels; a store's samples keep their size")
    if arch is None:
        return None
    from scatstore.models import canonical_arch

    try:
        return canonical_arch(arch)
    except ValueError as exc:
        bad("--arch", str(exc))


def check_val_store(train_manifest: dict, val_manifest: dict, train_path: str, val_path: str) -> None:
    """The validation store must be labeled with the training store's classes, in the same
    order (label i means the same class in both); a one-line error naming both lists."""
    t = list(train_manifest.get("class_names") or [])
    v = list(val_manifest.get("class_names") or [])
    if not v:
        fail(f"--val {val_path} is unlabeled (no class names): it cannot be "
                               "scored; encode the validation images from class folders")
    if v != t:
        def show(names):
            return "[" + ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "") + "]"
        fail(f"--val {val_path} has classes {show(v)}, the training store "
                               f"{train_path} has {show(t)}: label numbers would not mean the same "
                               "class")


def _check_labels(manifest: dict, labels, n_classes: int, path: str) -> None:
    """A training store needs labels, all below the number of classes."""
    import numpy as np

    labels = np.asarray(labels)
    if not manifest.get("class_names") or (len(labels) and labels.min() < 0):
        fail(f"{path} is unlabeled (no class names): train needs a store "
                               "encoded from class folders")
    if len(labels) and labels.max() >= n_classes:
        fail(f"--num-classes {n_classes} is too small: {path} holds label "
                               f"{int(labels.max())} ({len(manifest['class_names'])} classes)")


def _interrupted_note(checkpoint_dir: str | None) -> str:
    """What an interrupted run leaves to resume from."""
    if not checkpoint_dir:
        return "interrupted (no --checkpoint-dir: nothing to resume from)"
    from scatstore.pipelines.train import load_checkpoint

    path = os.path.join(checkpoint_dir, "last.pt")
    try:
        epoch = int(load_checkpoint(path)["epoch"])
    except (OSError, ValueError, KeyError, RuntimeError):
        return f"interrupted before the first checkpoint in {checkpoint_dir}"
    return (f"interrupted; {path} holds epoch {epoch}: re-run the same command with --resume "
            "to continue from it")


@contextlib.contextmanager
def _training_errors(rank: int, checkpoint_dir: str | None):
    """Data or settings that cannot train end in one line; Ctrl-C says what to resume from
    (exit 130)."""
    from scatstore.stores import StoreError

    try:
        yield
    except (ValueError, StoreError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        if rank == 0:
            _echo(_interrupted_note(checkpoint_dir))
        sys.exit(130)


def _store_loader(path: str, *, batch_size: int, train: bool, seed: int, num_workers: int,
                  device: str, rank: int, world: int, skip_damaged: bool = False,
                  cache_dir: str | None = None, cache_bytes: int | None = None):
    """The streaming loader of a store: called with an epoch, it gives that epoch's batches of
    this rank; its ``bytes_read`` counter feeds the engine's I/O figure."""
    from scatstore import loader
    from scatstore.stores import StoreError

    try:
        return loader(path, batch_size, shuffle=train, seed=seed, num_workers=max(1, num_workers),
                      drop_last=train, device=device, rank=rank, world_size=world,
                      skip_damaged=skip_damaged, cache_dir=cache_dir, cache_bytes=cache_bytes)
    except (StoreError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))


def _train_detection(ctx, *, data, pixels, val, arch, epochs, batch_size, lr, momentum, weight_decay,
                     schedule, precise_bn, device, amp, checkpoint_dir, resume, num_workers, seed,
                     image_size, no_progress, flip, width, layers, anchor_size, box_batch_size,
                     proposals, eval_every, backbone_weights, fpn_channels, cache_dir=None,
                     cache_bytes=None):
    """``--task detection``: Faster R-CNN + FPN on a COCO store (or the COCO source's JPEGs with
    --pixels), pycocotools AP of --val after each epoch (scatstore.pipelines.detect)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from scatstore.loaders.detection import PixelDetection, StoreDetection, detection_batches
    from scatstore.models import DEFAULT_DETECTOR, build_detector, canonical_detector, count_params
    from scatstore.models import detector_info
    from scatstore.pipelines.detect import coco_evaluator, default_detection_lr, train_detector
    from scatstore.pipelines.train import resolve_device, setup_distributed
    from scatstore.stores import StoreError

    if ctx.get_parameter_source("batch_size") is not click.core.ParameterSource.COMMANDLINE:
        batch_size = 2  # images per process, the detection references' per-GPU batch
    rank, world, _ = setup_distributed(device)
    dev = resolve_device(device)
    if num_workers is None:
        num_workers = 0 if dev.type == "cpu" else min(4, os.cpu_count() or 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    def dataset(path, train):
        want_flip = train and flip != "off"
        try:
            if pixels is not None:
                return PixelDetection(path, image_size, flip=want_flip, seed=seed)
            if not os.path.isdir(path):
                fail(f"{path}: no such store directory")
            _store(path)
            method = _store(path)["method"]["name"]
            if method == "cae" and flip == "auto":
                want_flip = False  # no flip of latents (docs/loading.md)
            return StoreDetection(path, flip=want_flip, seed=seed, cache_dir=cache_dir,
                                  cache_bytes=cache_bytes)
        except (StoreError, ValueError, FileNotFoundError) as exc:
            fail(str(exc))

    try:
        train_ds = dataset(pixels or data, True)
        val_ds = dataset(val, False) if val is not None else None
        if val_ds is not None and val_ds.category_ids != train_ds.category_ids:
            fail(f"--val {val} has category ids {val_ds.category_ids}, the training data "
                 f"{pixels or data} has {train_ds.category_ids}")
        if len(train_ds) == 0:
            fail(f"{pixels or data} holds no images")
        kind = train_ds.input_kind
        if arch is None:
            arch = "fasterrcnn_resnet50" if kind == "pixels" else DEFAULT_DETECTOR.get(
                getattr(train_ds, "method", "raw"), "fasterrcnn_scatresnet50")
        try:
            arch = canonical_detector(arch)
        except ValueError as exc:
            fail(f"--arch {exc}")
        info = detector_info(arch)
        if info["input"] != kind:
            fail(f"{arch} reads {info['input']} input; {pixels or data} gives {kind}")
        kw: dict = {}
        if kind == "scattering":
            kw["J"] = int(train_ds.params["J"])
            if width is not None:
                kw["width"] = width
            if layers is not None:
                kw["layers"] = layers
        elif width is not None or layers is not None:
            fail("--width/--layers apply to fasterrcnn_scatresnet50")
        if kind == "latent":
            kw["latent_stride"] = train_ds.input_stride
        if fpn_channels is not None:
            if kind == "pixels":
                fail("--fpn-channels applies to the scattering and latent detectors "
                     "(torchvision's ResNet-FPN has 256)")
            kw["fpn_channels"] = fpn_channels
        if anchor_size is not None:
            kw["anchor_size"] = anchor_size
        if box_batch_size is not None:
            kw["box_batch_size_per_image"] = box_batch_size
        if proposals is not None:
            kw["rpn_post_nms_top_n_train"] = kw["rpn_post_nms_top_n_test"] = proposals
            kw["rpn_pre_nms_top_n_train"] = kw["rpn_pre_nms_top_n_test"] = max(proposals, 1000)
        in_channels = train_ds.in_channels
        model = build_detector(arch, in_channels, train_ds.num_classes, **kw)
        if backbone_weights is not None:
            from scatstore.models.detection import freeze_batchnorm, load_backbone_weights
            from scatstore.pipelines.train import load_checkpoint

            try:
                sd = load_checkpoint(backbone_weights)["model"]
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                fail(f"--backbone-weights {backbone_weights}: {exc}")
            missing, _ = load_backbone_weights(model, sd)
            if missing:
                fail(f"--backbone-weights {backbone_weights}: {len(missing)} body parameters "
                     f"missing (e.g. {missing[0]}): not a checkpoint of this backbone")
            freeze_batchnorm(model.backbone.body)
        if lr is None:
            lr = default_detection_lr(batch_size, world)
        if rank == 0:
            _echo(f"{arch}: {count_params(model):,} parameters, {len(train_ds)} training images, "
                  f"input {kind} ({in_channels} channels, stride {model.input_stride}), FPN "
                  f"strides {model.level_strides}, {train_ds.num_classes} categories, device {dev}, "
                  f"world size {world}, batch {batch_size}, lr {lr:g}")
        train_f = detection_batches(train_ds, batch_size, shuffle=True, seed=seed,
                                    num_workers=num_workers, rank=rank, world_size=world)
        val_f = evaluator = None
        if val_ds is not None:
            val_f = detection_batches(val_ds, batch_size, shuffle=False, seed=seed,
                                      num_workers=num_workers, rank=rank, world_size=world)
            evaluator = coco_evaluator(val_ds)
        meta = {"task": "detection", "arch": arch, "in_channels": int(in_channels),
                "num_classes": train_ds.num_classes, "category_ids": train_ds.category_ids,
                "model_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
                "data": {"kind": "pixels" if pixels else "store",
                         "path": os.path.abspath(pixels or data), "image_size": image_size if pixels else None},
                "batch_size": batch_size, "seed": seed}
        with _training_errors(rank, checkpoint_dir):
            train_detector(model, train_f, val_f, evaluator, epochs=epochs, lr=lr,
                           momentum=momentum, weight_decay=weight_decay, amp=amp, device=dev,
                           checkpoint_dir=checkpoint_dir, resume=resume, schedule=schedule,
                           precise_bn={"auto": "auto", "on": True, "off": False}[precise_bn],
                           progress=not no_progress and sys.stderr is not None, meta=meta,
                           eval_every=eval_every)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _layers(ctx, param, value):
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(","))
    except ValueError:
        out = ()
    if len(out) != 3 or min(out) < 1:
        raise click.BadParameter(f"three positive block counts like 5,8,3, got {value!r}")
    return out


@click.command("train")
@click.argument("data", required=False, type=click.Path(path_type=str))
@click.option("--task", type=click.Choice(["classification", "detection"]), default="classification",
              show_default=True, help="detection: Faster R-CNN + FPN on a COCO store (docs/models.md).")
@click.option("--pixels", "pixels", type=click.Path(exists=True, file_okay=False, path_type=str),
              default=None, help="Train the pixel baseline on this source JPEG folder instead of a store.")
@click.option("--arch", default=None,
              help="Model: scatresnet10, scatresnet50, scatwrn, cresnet39/51/72, resnet18/34/50/101. "
                   "Default: from the store's method (scat1→scatresnet50, scat2→scatresnet10, "
                   "cae→cresnet51), resnet18 for --pixels.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True, help="Per process.")
@click.option("--lr", type=float, default=None,
              help="Base learning rate [default: 0.1 × global batch / 256].")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["step", "cosine", "constant"]), default="step",
              show_default=True, help="step: ÷10 after 1/3 and 2/3 of the epochs (the seeds' 30/60/90).")
@click.option("--warmup-epochs", type=int, default=0, show_default=True)
@click.option("--precise-bn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Recompute the BatchNorm statistics from the training data at each epoch end "
                   "(auto: when an epoch has fewer than 200 steps, i.e. small datasets).")
@click.option("--val", "val", type=click.Path(exists=True, path_type=str), default=None,
              help="Held-out data: a store (or a source folder with --pixels).")
@click.option("--device", type=DeviceParam(allow_auto=True), default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:1.")
@click.option("--amp", is_flag=True, help="Mixed precision: bfloat16 autocast on CPU, float16 + GradScaler on CUDA.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Write DIR/last.pt after every epoch.")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint-dir/last.pt.")
@click.option("--num-workers", type=int, default=None, help="Loader worker processes [default: min(4, cores)].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=int, default=224, show_default=True, help="Crop side for --pixels.")
@click.option("--num-classes", type=int, default=None, help="Override the number of classes.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--skip-damaged", is_flag=True,
              help="Count, log and leave out the samples of damaged chunks (crc32c mismatch) "
                   "instead of stopping with an error.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Local cache of a store at a URL (s3://, gs://, https://)  [default: "
                   "$SCATSTORE_CACHE_DIR or ~/.cache/scatstore].")
@click.option("--cache-size", default=None,
              help="Size limit of the cached shard files, e.g. 50G  [default: none].")
@click.option("--flip", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Detection: horizontal flip of training samples (auto: on, off for cae latents).")
@click.option("--width", type=int, default=None,
              help="Detection, fasterrcnn_scatresnet50: bottleneck width (default 128, seed 000's).")
@click.option("--layers", callback=_layers, default=None,
              help="Detection, fasterrcnn_scatresnet50: blocks per stage (default 5,8,3).")
@click.option("--fpn-channels", type=int, default=None,
              help="Detection, scattering/latent detectors: FPN channels (default 256).")
@click.option("--anchor-size", type=int, default=None,
              help="Detection: anchor side on the finest FPN level, doubling per level "
                   "(default 4 × its stride: 32).")
@click.option("--box-batch-size", type=int, default=None,
              help="Detection: RoIs sampled per image for the box head (default 512).")
@click.option("--proposals", type=int, default=None,
              help="Detection: RPN proposals kept per image after NMS (default 2000 training, "
                   "1000 evaluation; fewer for small images).")
@click.option("--eval-every", type=int, default=1, show_default=True,
              help="Detection: score --val after every n-th epoch (and the last).")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False, path_type=str),
              default=None, help="Detection: a `scatstore train` classification checkpoint of the "
                                 "same backbone (e.g. ScatResNet-50 on ImageNet); BatchNorm frozen.")
@click.pass_context
def train_cmd(ctx, data, task, pixels, arch, epochs, batch_size, lr, momentum, weight_decay, schedule,
              warmup_epochs, precise_bn, val, device, amp, checkpoint_dir, resume, num_workers, seed,
              image_size, num_classes, no_progress, skip_damaged, cache_dir, cache_size, flip, width,
              layers, anchor_size, box_batch_size, proposals, eval_every, backbone_weights,
              fpn_channels):
    """Train ARCH on the store DATA (or on the JPEGs of --pixels SRC), one JSON line per epoch."""
    if (data is None) == (pixels is None):
        fail("give either a store DATA or --pixels SRC (not both)")
    if resume and not checkpoint_dir:
        fail("--resume needs --checkpoint-dir")
    detection_only = {"flip": flip != "auto", "width": width is not None,
                      "layers": layers is not None, "anchor-size": anchor_size is not None,
                      "box-batch-size": box_batch_size is not None,
                      "proposals": proposals is not None, "eval-every": eval_every != 1,
                      "fpn-channels": fpn_channels is not None,
                      "backbone-weights": backbone_weights is not None}
    if task == "detection":
        if skip_damaged:
            fail("--skip-damaged applies to classification")
        _check_options(ctx, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                       weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                       num_workers=num_workers, seed=seed, image_size=image_size,
                       num_classes=num_classes, arch=None, pixels=pixels)
        for opt, v in (("--width", width), ("--anchor-size", anchor_size),
                       ("--box-batch-size", box_batch_size), ("--proposals", proposals),
                       ("--eval-every", eval_every), ("--fpn-channels", fpn_channels)):
            if v is not None and v < 1:
                fail(f"{opt} must be >= 1, got {v}")
        if num_classes is not None or warmup_epochs:
            fail("--num-classes and --warmup-epochs apply to classification (detection takes "
                 "its categories from the data and warms up over steps)")
        _train_detection(ctx, data=data, pixels=pixels, val=val, arch=arch, epochs=epochs,
                         batch_size=batch_size, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, schedule=schedule, precise_bn=precise_bn,
                         device=device, amp=amp, checkpoint_dir=checkpoint_dir, resume=resume,
                         num_workers=num_workers, seed=seed, image_size=image_size,
                         no_progress=no_progress, flip=flip, width=width, layers=layers,
                         anchor_size=anchor_size, box_batch_size=box_batch_size,
                         proposals=proposals, eval_every=eval_every,
                         backbone_weights=backbone_weights, fpn_channels=fpn_channels,
                         cache_dir=cache_dir, cache_bytes=parse_size(cache_size))
        return
    used = [f"--{k}" for k, v in detection_only.items() if v]
    if used:
        fail(f"{', '.join(used)} apply to --task detection")
    if skip_damaged and pixels is not None:
        fail("--skip-damaged applies to stores, not to --pixels")
    arch = _check_options(ctx, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                          num_workers=num_workers, seed=seed, image_size=image_size,
                          num_classes=num_classes, arch=arch, pixels=pixels)

    import numpy as np
    import torch
    import torch.distributed as dist

    from scatstore.models import arch_info, build_model, canonical_arch, count_params, default_arch
    from scatstore.pipelines.train import default_lr, resolve_device, setup_distributed, train
    from scatstore.stores import StoreError

    rank, world, _ = setup_distributed(device)
    dev = resolve_device(device)
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    try:
        if pixels is not None:
            from scatstore.loaders.pixels import jpeg_batches

            def split_for(root: str, name: str) -> str | None:
                return name if os.path.isdir(os.path.join(root, name)) and \
                    os.path.isdir(os.path.join(root, "val" if name == "train" else "train")) else None

            train_f = jpeg_batches(pixels, batch_size, size=image_size, train=True, seed=seed,
                                   num_workers=num_workers, rank=rank, world_size=world,
                                   split=split_for(pixels, "train"))
            val_f = None
            if val is not None:
                val_f = jpeg_batches(val, batch_size, size=image_size, train=False, seed=seed,
                                     num_workers=num_workers, rank=rank, world_size=world,
                                     split=split_for(val, "val"))
            arch = canonical_arch(arch or "resnet18")
            if arch_info(arch)["input"] != "pixels":
                fail(f"--pixels trains a pixel model; {arch} expects "
                     f"{arch_info(arch)['input']} input")
            in_channels, input_size = 3, image_size
            n_classes = num_classes or train_f.num_classes
            if n_classes < max(2, train_f.num_classes):
                fail(f"--num-classes {n_classes} is too small: {pixels} has "
                                       f"{train_f.num_classes} class folders")
            data_desc = {"kind": "pixels", "path": os.path.abspath(pixels)}
        else:
            cache = {"cache_dir": cache_dir, "cache_bytes": parse_size(cache_size)}
            manifest = _store(data)
            if not manifest["count"]:
                fail(f"{data} holds no samples ({manifest['rejected']} source files rejected: "
                      "see its rejected.jsonl)")
            val_manifest = None
            if val is not None:
                if not is_url(val) and not os.path.isdir(val):
                    fail(f"--val {val} is not a store directory")
                val_manifest = _store(val)
                check_val_store(manifest, val_manifest, data, val)
            train_f = _store_loader(data, batch_size=batch_size, train=True, seed=seed,
                                    num_workers=num_workers, device=str(dev), rank=rank, world=world,
                                    skip_damaged=skip_damaged, **cache)
            n_classes = num_classes or len(manifest.get("class_names") or [])
            _check_labels(manifest, train_f.labels, n_classes, data)
            val_f = None
            if val is not None:
                val_f = _store_loader(val, batch_size=batch_size, train=False, seed=seed,
                                      num_workers=num_workers, device=str(dev), rank=rank, world=world,
                                      skip_damaged=skip_damaged, **cache)
                _check_labels(val_manifest, val_f.labels, n_classes, val)
            method = manifest["method"]["name"]
            arch = canonical_arch(arch or default_arch(method))
            # what the loader yields: C·K channels of coefficients, 3 of pixels, a codec's latents
            in_channels, input_size = train_f.in_channels, train_f.input_size
            data_desc = {"kind": "store", "path": data if is_url(data) else os.path.abspath(data),
                         "method": method}

        model = build_model(arch, in_channels, n_classes, input_size=input_size)
        if lr is None:
            lr = default_lr(batch_size, world)
        if rank == 0:
            _echo(f"{arch}: {count_params(model):,} parameters, input ({in_channels}, {input_size}, "
                  f"{input_size}), {n_classes} classes, device {dev}, world size {world}, lr {lr:g}")
        meta = {"arch": arch, "in_channels": int(in_channels), "num_classes": int(n_classes),
                "input_size": int(input_size) if input_size else None, "data": data_desc,
                "batch_size": batch_size, "seed": seed}
        try:
            with _training_errors(rank, checkpoint_dir):
                train(model, train_f, val_f, epochs=epochs, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, amp=amp, device=dev,
                      checkpoint_dir=checkpoint_dir, resume=resume, schedule=schedule,
                      warmup_epochs=warmup_epochs,
                      precise_bn={"auto": "auto", "on": True, "off": False}[precise_bn],
                      progress=not no_progress and sys.stderr is not None, meta=meta)
        finally:
            if skip_damaged and rank == 0:
                for name, f in (("training", train_f), ("validation", val_f)):
                    bad = getattr(getattr(f, "reader", None), "damaged", None)
                    if bad:
                        _echo(f"--skip-damaged: left out {len(bad)} samples of "
                              f"{f.reader.damaged_chunks} damaged chunks of the {name} store")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
