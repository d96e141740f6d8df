"""``scatstore train``: train a model on a scatstore store (or, as the baseline, on the source JPEGs).

One JSON line per epoch on stdout (rank 0), a progress bar on stderr. Under ``torchrun`` every
process runs this command; the process group is set up from the environment (gloo on CPU, nccl
on CUDA), each rank reads its own shard, and rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import inspect
import math
import os
import random
import sys

import click

# store method name -> default architecture
_DEFAULT_ARCH = {"scat1": "scatresnet50", "scat2": "scatresnet10", "cae": "cresnet51", "raw": "resnet18"}


def _echo(msg: str) -> None:
    click.echo(f"scatstore train: {msg}", err=True)


def _manifest(path: str) -> dict:
    try:
        from scatstore.stores.manifest import read_manifest
    except ImportError:
        return {}
    try:
        return read_manifest(path)
    except Exception:  # noqa: BLE001 - the loader reports real problems with the store
        return {}


def _as_factory(obj):
    """Turn what ``scatstore.loader`` returns into ``f(epoch) -> iterable``."""
    if hasattr(obj, "set_epoch"):
        def factory(epoch: int):
            obj.set_epoch(epoch)
            return obj
    elif callable(obj) and not hasattr(obj, "__iter__"):
        factory = obj
    else:
        def factory(epoch: int):
            return obj
    if hasattr(obj, "bytes_read"):
        return _CounterFactory(factory, obj)
    return factory


class _CounterFactory:
    """A factory that exposes the loader's ``bytes_read`` counter to the engine."""

    def __init__(self, factory, obj):
        self._factory, self._obj = factory, obj

    def __call__(self, epoch: int):
        return self._factory(epoch)

    @property
    def bytes_read(self):
        v = self._obj.bytes_read
        return v() if callable(v) else v


def _store_loader(path: str, *, batch_size: int, train: bool, seed: int, num_workers: int,
                  device: str, rank: int, world: int):
    try:
        import scatstore
        loader_fn = scatstore.loader
    except (AttributeError, ImportError) as e:
        raise click.ClickException(
            f"cannot read the store {path!r}: the streaming loader (scatstore.loader) is not "
            f"available in this installation ({e}). Train the pixel baseline with --pixels SRC.") from e
    kwargs = dict(batch_size=batch_size, shuffle=train, seed=seed, num_workers=num_workers,
                  drop_last=train, device=device)
    params = inspect.signature(loader_fn).parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if world > 1:
        if "rank" in params or has_var_kw:
            kwargs.update(rank=rank, world_size=world)
        else:
            _echo("warning: scatstore.loader takes no rank/world_size; relying on it to shard by "
                  "itself under torch.distributed")
    return loader_fn(path, **kwargs)


def _infer_shapes(manifest: dict, loader, factory) -> tuple[int | None, int | None]:
    """(in_channels, input_size) from the manifest's sample_shape, the loader, or a first batch."""
    shape = manifest.get("sample_shape")
    if shape is None:
        shape = getattr(loader, "sample_shape", None)
    if shape is None:
        x, _ = next(iter(factory(0)))
        shape = tuple(x.shape[1:])
    shape = [int(s) for s in shape]
    if len(shape) < 3:
        return (math.prod(shape) if shape else None), None
    return math.prod(shape[:-2]), shape[-1]


@click.command("train")
@click.argument("data", required=False, type=click.Path(path_type=str))
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
@click.option("--val", "val", type=click.Path(exists=True, path_type=str), default=None,
              help="Held-out data: a store (or a source folder with --pixels).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--amp", is_flag=True, help="Mixed precision: bfloat16 autocast on CPU, float16 + GradScaler on CUDA.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Write DIR/last.pt after every epoch.")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint-dir/last.pt.")
@click.option("--num-workers", type=int, default=None, help="Loader worker processes [default: min(4, cores)].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=int, default=224, show_default=True, help="Crop side for --pixels.")
@click.option("--num-classes", type=int, default=None, help="Override the number of classes.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_cmd(data, pixels, arch, epochs, batch_size, lr, momentum, weight_decay, schedule,
              warmup_epochs, val, device, amp, checkpoint_dir, resume, num_workers, seed, image_size,
              num_classes, no_progress):
    """Train ARCH on the store DATA (or on the JPEGs of --pixels SRC), one JSON line per epoch."""
    if (data is None) == (pixels is None):
        raise click.UsageError("give either a store DATA or --pixels SRC (not both)")
    if resume and not checkpoint_dir:
        raise click.UsageError("--resume needs --checkpoint-dir")
    if epochs < 1 or batch_size < 1:
        raise click.UsageError("--epochs and --batch-size must be positive")

    import numpy as np
    import torch
    import torch.distributed as dist

    from scatstore.models import arch_info, build_model, canonical_arch, count_params
    from scatstore.pipelines.train import resolve_device, setup_distributed, train

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
                raise click.UsageError(f"--pixels trains a pixel model; {arch} expects "
                                       f"{arch_info(arch)['input']} input")
            in_channels, input_size = 3, image_size
            n_classes = num_classes or train_f.num_classes
            data_desc = {"kind": "pixels", "path": os.path.abspath(pixels)}
        else:
            manifest = _manifest(data)
            ld = _store_loader(data, batch_size=batch_size, train=True, seed=seed,
                               num_workers=num_workers, device=str(dev), rank=rank, world=world)
            train_f = _as_factory(ld)
            val_f = None
            if val is not None:
                vld = _store_loader(val, batch_size=batch_size, train=False, seed=seed,
                                    num_workers=num_workers, device=str(dev), rank=rank, world=world)
                val_f = _as_factory(vld)
            method = (manifest.get("method") or {}).get("name") if isinstance(manifest.get("method"), dict) \
                else manifest.get("method")
            arch = canonical_arch(arch or _DEFAULT_ARCH.get(method or "", "scatresnet10"))
            in_channels, input_size = _infer_shapes(manifest, ld, train_f)
            n_classes = num_classes or len(manifest.get("class_names") or []) \
                or getattr(ld, "num_classes", None) or len(getattr(ld, "class_names", None) or [])
            if not n_classes:
                raise click.UsageError("cannot tell the number of classes from the store; pass --num-classes")
            data_desc = {"kind": "store", "path": os.path.abspath(data), "method": method}

        model = build_model(arch, in_channels, n_classes, input_size=input_size)
        if lr is None:
            lr = 0.1 * batch_size * world / 256
        if rank == 0:
            _echo(f"{arch}: {count_params(model):,} parameters, input ({in_channels}, {input_size}, "
                  f"{input_size}), {n_classes} classes, device {dev}, world size {world}, lr {lr:g}")
        meta = {"arch": arch, "in_channels": int(in_channels), "num_classes": int(n_classes),
                "input_size": int(input_size) if input_size else None, "data": data_desc,
                "batch_size": batch_size, "seed": seed}
        train(model, train_f, val_f, epochs=epochs, lr=lr, momentum=momentum,
              weight_decay=weight_decay, amp=amp, device=dev, checkpoint_dir=checkpoint_dir,
              resume=resume, schedule=schedule, warmup_epochs=warmup_epochs,
              progress=not no_progress and sys.stderr is not None, meta=meta)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
