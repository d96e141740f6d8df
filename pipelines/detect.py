"""Detection training: torchvision Faster R-CNN on stored COCO tensors, evaluated with pycocotools.

The same engine as classification (:mod:`scatstore.pipelines.train`: device and DDP setup,
checkpoints ``last.pt`` written atomically and ``--resume``, RNG state, precise BatchNorm, progress
bar, one JSON line per epoch), with a detection step: the model takes ``(images, targets)`` from
:func:`scatstore.loaders.detection.detection_batches` and returns its four losses.

Per epoch, rank 0 writes one JSON line (``log``), keys:

``epoch``, ``lr``            1-based epoch, learning rate at its end
``train_loss``               mean over the epoch's steps of the summed losses
``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``: their means
``train_loss_steps``         the loss curve: the summed loss per step (at most 50 points: means
                             over equal runs of steps)
``val_map``, ``val_map50``, ``val_map75``, ``val_map_s/m/l``: COCO AP of the validation data
                             (``null`` without it; size ranges without ground truth ``null``)
``samples_per_s``            training images / wall time of the training loop
``data_wait_frac``           time blocked fetching the next batch / wall time of the loop
``bytes_read``               stored (or JPEG) bytes of the epoch's training samples
plus ``train_samples``, ``train_batches``, ``world_size``, ``bn_recalibrated``,
``val_images``, ``val_detections``, ``val_time_s``, ``epoch_time_s``, ``cpu_time_s`` (this
process's CPU seconds for the epoch: with ``epoch_time_s``, how much of the machine it had).

The learning rate follows :func:`detection_lr_at` (``step``: ÷10 after 8/12 and 11/12 of the
epochs, Detectron's "1×" schedule shape) with a linear warm-up over the first ``warmup_iters``
steps from ``0.001 ×`` (torchvision's detection references).
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .train import (PRECISE_BN_MAX_STEPS, _all_reduce, _autocast, end_of_loop, epoch_source_info,
                    optimizer_step, print_json_line, progress_bar, publish_epoch,
                    recalibrate_batchnorm, resolve_device, restore_checkpoint, setup_distributed)

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
CURVE_POINTS = 50


def detection_lr_at(epoch: int, *, base_lr: float, epochs: int, schedule: str = "step") -> float:
    """Learning rate of 0-based ``epoch``: ``step`` ÷10 after ``round(8/12·E)`` and
    ``round(11/12·E)`` epochs (8 and 11 of 12), ``cosine``, or ``constant``."""
    if schedule == "step":
        milestones = [round(epochs * 8 / 12), round(epochs * 11 / 12)]
        return base_lr * 0.1 ** sum(epoch >= m for m in milestones if 0 < m < epochs)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown schedule {schedule!r} (step, cosine, constant)")


def default_detection_lr(batch_size: int, world_size: int = 1) -> float:
    """The linear scaling rule of the detection references: ``0.02 × global batch / 16``."""
    return 0.02 * batch_size * world_size / 16


def _targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
            for t in targets]


def _backbone_batches(model: nn.Module, batches: Iterable, device: torch.device):
    """``(backbone input, dummy)`` of detection batches: what precise BN runs the backbone on."""
    for images, _ in batches:
        image_list, _ = model.transform([i.to(device) for i in images])
        yield image_list.tensors, torch.zeros(1, dtype=torch.long)


def evaluate_detector(model: nn.Module, batches: Iterable, evaluator, *, device: torch.device,
                      amp: bool = False, world_size: int = 1) -> dict:
    """Run ``model`` (eval mode) over ``batches`` and score with ``evaluator``
    (:class:`scatstore.evaluation.coco.CocoEvaluator`; its detections are gathered on every rank).
    Returns ``{"val_map", "val_map50", ..., "val_images", "val_detections"}``."""
    model.eval()
    with torch.no_grad(), _autocast(device, amp):
        for images, targets in batches:
            out = model([i.to(device) for i in images])
            for o, t in zip(out, targets):
                evaluator.add(t, o["boxes"].float().cpu().numpy(), o["scores"].float().cpu().numpy(),
                              o["labels"].cpu().numpy())
    if world_size > 1:
        parts: list = [None] * world_size
        dist.all_gather_object(parts, (evaluator.results, sorted(evaluator.image_ids)))
        evaluator.results = [r for res, _ in parts for r in res]
        evaluator.image_ids = {i for _, ids in parts for i in ids}
    s = evaluator.summarize()
    return {"val_map": s["map"], "val_map50": s["map50"], "val_map75": s["map75"],
            "val_map_s": s["map_s"], "val_map_m": s["map_m"], "val_map_l": s["map_l"],
            "val_images": s["n_images"], "val_detections": s["n_detections"]}


def _curve(values: list[float], points: int = CURVE_POINTS) -> list[float]:
    if len(values) <= points:
        return [round(v, 5) for v in values]
    edges = [round(k * len(values) / points) for k in range(points + 1)]
    return [round(sum(values[a:b]) / max(b - a, 1), 5) for a, b in zip(edges, edges[1:])]


def train_detector(model: nn.Module, train_batches_factory: Callable[[int], Iterable],
                   val_batches_factory: Callable[[int], Iterable] | None = None,
                   evaluator_factory: Callable[[], Any] | None = None, *, epochs: int,
                   lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 1e-4,
                   amp: bool = False, device: str | torch.device | None = None,
                   checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
                   log: Callable[[dict], None] | None = print_json_line, schedule: str = "step",
                   warmup_iters: int | None = None, progress: bool = True,
                   meta: dict | None = None, precise_bn: bool | str = "auto",
                   eval_every: int = 1) -> list[dict]:
    """Train a torchvision detection ``model`` with SGD for ``epochs``; returns the per-epoch
    records (the whole history, restored epochs included).

    ``evaluator_factory()`` gives a fresh :class:`~scatstore.evaluation.coco.CocoEvaluator` for
    each validation pass over ``val_batches_factory(epoch)``. ``warmup_iters`` (default
    ``min(1000, total steps // 20)``): linear warm-up from ``0.001 × lr``. ``precise_bn``: as in
    :func:`scatstore.pipelines.train.train`, the backbone's BatchNorm statistics recomputed on the
    epoch's training images; ``"auto"``: for epochs of fewer than 200 steps that are scored or
    end the run (training steps use batch statistics, so the others do not need it).
    ``eval_every``: validate after every n-th epoch and after the last (other records say
    ``null``). Checkpoints, ``resume``, AMP and DDP behave as in classification.
    """
    if precise_bn not in (True, False, "auto"):
        raise ValueError(f"precise_bn must be True, False or 'auto', got {precise_bn!r}")
    rank, world, _ = setup_distributed(None if device is None else str(device))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    model = model.to(dev)
    core = model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    start_epoch, history = restore_checkpoint(ckpt_path, core, opt, scaler, resume=resume, rank=rank)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(core, device_ids=[dev.index] if dev.type == "cuda" else None)

    steps_per_epoch = None
    for epoch in range(start_epoch, epochs):
        cur_lr = detection_lr_at(epoch, base_lr=lr, epochs=epochs, schedule=schedule)
        model.train()
        source = train_batches_factory(epoch)
        counter_obj, counter0, total = epoch_source_info(source, train_batches_factory, epoch)
        steps_per_epoch = total or steps_per_epoch or 1
        warm = warmup_iters if warmup_iters is not None else \
            min(1000, max(1, steps_per_epoch * epochs // 20))
        bar = progress_bar(total, f"epoch {epoch + 1}/{epochs}", progress and rank == 0)
        sums = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64)
        curve: list[float] = []
        n_seen, steps, wait = 0, 0, 0.0
        t_start, cpu_start = time.perf_counter(), time.process_time()
        it = iter(source)
        while True:
            t0 = time.perf_counter()
            try:
                images, targets = next(it)
            except StopIteration:
                break
            images = [i.to(dev, non_blocking=True) for i in images]
            targets = _targets_to(targets, dev)
            wait += time.perf_counter() - t0
            global_step = epoch * steps_per_epoch + steps
            step_lr = cur_lr
            if global_step < warm:
                a = global_step / warm
                step_lr = cur_lr * (0.001 * (1 - a) + a)
            for g in opt.param_groups:
                g["lr"] = step_lr
            with _autocast(dev, amp):
                losses = model(images, targets)
                loss = sum(losses[k] for k in LOSS_KEYS)
            if not torch.isfinite(loss):
                raise ValueError(f"epoch {epoch + 1}, step {steps + 1}: the loss is {loss.item()} "
                                 f"({ {k: float(v) for k, v in losses.items()} }); lower --lr")
            optimizer_step(opt, scaler, loss)
            vals = [float(losses[k].detach()) for k in LOSS_KEYS]
            sums += torch.tensor([sum(vals), *vals], dtype=torch.float64)
            curve.append(sum(vals))
            n_seen += len(images)
            steps += 1
            bar.update(1)
            if rank == 0 and progress and steps % 5 == 0:
                bar.set_postfix(loss=f"{sum(vals):.3f}", lr=f"{step_lr:.3g}")
        wall = end_of_loop(dev, t_start, bar)
        bytes_read = counter_obj.bytes_read - counter0 if counter_obj is not None else 0
        stats = torch.cat([sums, torch.tensor([float(steps), float(n_seen), float(bytes_read),
                                               wait / max(wall, 1e-9)], dtype=torch.float64)])
        stats = _all_reduce(stats.to(dev), world).cpu()
        n_steps = max(stats[len(LOSS_KEYS) + 1].item(), 1.0)
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": stats[0].item() / n_steps}
        record.update({k: stats[1 + j].item() / n_steps for j, k in enumerate(LOSS_KEYS)})
        record.update({
            "train_loss_steps": _curve(curve),
            "val_map": None, "val_map50": None, "val_map75": None,
            "samples_per_s": stats[-3].item() / max(wall, 1e-9),
            "data_wait_frac": stats[-1].item() / world,
            "bytes_read": int(stats[-2].item()),
            "lr": cur_lr,
            "train_samples": int(stats[-3].item()),
            "train_batches": steps,
            "world_size": world,
        })
        recal = 0
        scored = val_batches_factory is not None and evaluator_factory is not None and \
            ((epoch + 1) % max(1, eval_every) == 0 or epoch + 1 == epochs)
        # auto: short epochs, and only those that are scored or end the run (the statistics
        # matter in eval mode only; training steps use batch statistics)
        if precise_bn is True or (precise_bn == "auto" and steps < PRECISE_BN_MAX_STEPS
                                  and (scored or epoch + 1 == epochs)):
            recal = recalibrate_batchnorm(core.backbone, _backbone_batches(
                core, train_batches_factory(epoch), dev), device=dev, amp=amp)
        record["bn_recalibrated"] = recal
        if world > 1:
            for b in core.buffers():
                dist.broadcast(b, 0)
        if scored:
            t_val = time.perf_counter()
            record.update(evaluate_detector(core, val_batches_factory(epoch), evaluator_factory(),
                                            device=dev, amp=amp, world_size=world))
            record["val_time_s"] = time.perf_counter() - t_val
        record["epoch_time_s"] = time.perf_counter() - t_start
        record["cpu_time_s"] = time.process_time() - cpu_start
        publish_epoch(record, history, rank=rank, world=world, log=log, ckpt_path=ckpt_path,
                      epochs=epochs, model=core, opt=opt, scaler=scaler, meta=meta,
                      config={"task": "detection", "lr": lr, "momentum": momentum,
                              "weight_decay": weight_decay, "schedule": schedule,
                              "warmup_iters": warm, "amp": amp, "precise_bn": precise_bn,
                              "world_size": world})
    return history


def coco_evaluator(dataset) -> Callable[[], Any]:
    """An evaluator factory for a detection dataset: pycocotools against the source annotation
    file (a store's manifest names its source; the pixel baseline reads it), else against the
    stored boxes themselves, in the stored frame."""
    from scatstore.evaluation.coco import (CocoEvaluator, find_annotations, gt_from_samples,
                                           load_gt)

    manifest = getattr(dataset, "manifest", None)
    if manifest is not None:
        path = find_annotations(manifest)
    else:
        index = dataset.index
        path = find_annotations({"source": {"root": index.root}, "job": {"params": {"split": index.split}}})
    if path is not None:
        gt = load_gt(path)
    else:
        print(f"scatstore train: warning: the source annotation file of {getattr(dataset, 'path', '')} "
              "is not found; scoring against the stored boxes, in the stored frame", file=sys.stderr)
        gt = gt_from_samples([(dataset.meta(i), None) for i in range(len(dataset))],
                             [{"id": c} for c in dataset.category_ids])
    return lambda: CocoEvaluator(gt, dataset.category_ids)
