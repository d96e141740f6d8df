"""The training engine: SGD over any per-epoch batch source, with AMP, DDP, checkpoints and JSON logs.

A *batches factory* is ``f(epoch) -> iterable of (x, y)`` (``epoch`` is the 0-based epoch index, so
a loader can reshuffle deterministically per epoch). The scatstore streaming loader, the pixel
baseline (:func:`scatstore.loaders.pixels.jpeg_batches`) and :func:`tensor_batches` all provide one.
Under DDP every rank gets its own factory and must yield its own shard, with the **same number of
training batches** on every rank (the engine also wraps the loop in DDP's ``join`` so a loader that
gets this wrong finishes the epoch instead of hanging).

Per epoch, rank 0 writes one JSON line to stdout (``log``), keys:

``epoch``          1-based number of completed epochs
``train_loss``     mean cross-entropy over the epoch's training samples (all ranks)
``train_top1``     training accuracy, measured on the fly (model in train mode)
``val_top1/5``     held-out accuracy after the epoch (``null`` without validation data)
``samples_per_s``  training samples (all ranks) / wall time of the training loop
``data_wait_frac`` time blocked fetching the next batch (``next()`` + host-to-device copy) / wall
                   time of the training loop, averaged over ranks
``bytes_read``     bytes read by the training data source this epoch, all ranks: the delta of the
                   iterable's (or factory's) ``bytes_read`` counter if it has one, else the sum of the
                   batches' tensor ``nbytes`` as delivered (an estimate: decoded, not on-disk, bytes)
plus ``lr``, ``val_loss``, ``train_samples``, ``epoch_time_s``, ``world_size`` and
``bn_recalibrated`` (training batches of the precise-BatchNorm pass at the epoch's end; 0: none,
see :func:`recalibrate_batchnorm`).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from scatstore.loaders.pixels import shard_indices

BatchesFactory = Callable[[int], Iterable]

CHECKPOINT_FORMAT = "scatstore-train-checkpoint/1"
# precise BatchNorm ("auto"): an epoch of fewer optimizer steps than this ends with a pass that
# recomputes the BatchNorm statistics (see recalibrate_batchnorm), over at most PRECISE_BN_BATCHES
PRECISE_BN_MAX_STEPS = 200
PRECISE_BN_BATCHES = 100
JSON_KEYS = ("epoch", "train_loss", "train_top1", "val_top1", "val_top5", "samples_per_s",
             "data_wait_frac", "bytes_read")


def print_json_line(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- distributed helpers

def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: str | None = None) -> tuple[int, int, int]:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Backend: nccl when training on CUDA, gloo otherwise. Returns ``(rank, world_size, local_rank)``;
    a no-op returning ``(0, 1, 0)`` for a single process.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda")
                                              or device == "auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → ``cuda:LOCAL_RANK`` when available, else CPU; ``"cuda"`` gets the local rank."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    from scatstore.devices import usable_device

    d = usable_device(device)
    if d.type == "cuda" and d.index is None:
        d = usable_device(torch.device("cuda", local_rank))
    return d


class _TensorEpoch:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, batch_size: int,
                 drop_last: bool):
        self.x, self.y, self.idx, self.batch_size, self.drop_last = x, y, idx, batch_size, drop_last

    def __len__(self) -> int:
        n = len(self.idx)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        for b in range(len(self)):
            sel = torch.from_numpy(self.idx[b * self.batch_size:(b + 1) * self.batch_size])
            yield self.x[sel], self.y[sel]


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                   seed: int = 0, drop_last: bool | None = None, rank: int | None = None,
                   world_size: int | None = None) -> BatchesFactory:
    """A batches factory over in-memory tensors, sharded over DDP ranks like :func:`shard_indices`.

    ``drop_last`` defaults to ``shuffle`` (training drops the partial batch; evaluation keeps it).
    ``rank``/``world_size`` default to the initialised process group's.
    """
    r, w = dist_info()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    drop_last = shuffle if drop_last is None else drop_last

    def factory(epoch: int) -> _TensorEpoch:
        idx = shard_indices(len(x), epoch, seed=seed, rank=rank, world_size=world_size,
                            shuffle=shuffle, even=shuffle)
        return _TensorEpoch(x, y, idx, batch_size, drop_last)

    return factory


# --------------------------------------------------------------------------- schedule, RNG, checkpoint

def lr_at(epoch: int, *, base_lr: float, epochs: int, schedule: str = "step",
          warmup_epochs: int = 0) -> float:
    """Learning rate for 0-based ``epoch``.

    ``step``: the seeds' recipe (÷10 at epochs 30 and 60 of 90) scaled to ``epochs``: ÷10 after
    1/3 and 2/3 of the run. ``cosine``: ``base·½(1+cos(π·e/E))``. ``constant``. A linear warm-up
    over the first ``warmup_epochs`` multiplies any of them.
    """
    if schedule == "step":
        milestones = [round(epochs / 3), round(2 * epochs / 3)]
        lr = base_lr * 0.1 ** sum(epoch >= m for m in milestones if m > 0)
    elif schedule == "cosine":
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    elif schedule == "constant":
        lr = base_lr
    else:
        raise ValueError(f"unknown schedule {schedule!r} (step, cosine, constant)")
    if epoch < warmup_epochs:
        lr *= (epoch + 1) / (warmup_epochs + 1)
    return lr


def default_lr(batch_size: int, world_size: int = 1) -> float:
    """The linear scaling rule of Goyal et al.: ``0.1 × global batch / 256``."""
    return 0.1 * batch_size * world_size / 256


def recalibrate_batchnorm(model: nn.Module, batches: Iterable, *, device: torch.device,
                          amp: bool = False, max_batches: int = PRECISE_BN_BATCHES) -> int:
    """Recompute every BatchNorm's running mean and variance from ``batches`` ("precise BN").

    A BatchNorm's running statistics are an exponential average (momentum 0.1) of batch statistics
    taken while the weights were moving: after a few dozen steps at a high learning rate they
    describe earlier networks, not the one evaluated (docs/models.md measures the effect on a
    150-image set: 20 % held-out top-1 in eval mode against 86 % with recomputed statistics).
    This pass resets them and averages the statistics of up to ``max_batches`` training batches
    (train mode, no gradients, cumulative average: momentum ``None``) under the final weights.
    Returns the number of batches used. Parameters and the optimizer are untouched.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or max_batches < 1:
        return 0
    momenta = [m.momentum for m in bns]
    was_training = model.training
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad(), _autocast(device, amp):
            it = iter(batches)
            try:
                for x, y in it:
                    x, _ = _to_device(x, y, device)
                    model(x)
                    n += 1
                    if n >= max_batches:
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return n


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only, no pickle)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a scatstore training checkpoint")
    return ckpt


def restore_checkpoint(ckpt_path: Path | None, model: nn.Module, opt, scaler, *, resume: bool,
                       rank: int = 0) -> tuple[int, list[dict]]:
    """``resume``: load model, optimizer, scaler and RNG states from ``ckpt_path`` when it exists
    (else say so on stderr and start fresh). Returns ``(start_epoch, history)``."""
    if not resume:
        return 0, []
    if ckpt_path is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if not ckpt_path.exists():
        if rank == 0:
            print(f"scatstore train: no checkpoint at {ckpt_path}, starting from scratch",
                  file=sys.stderr)
        return 0, []
    ckpt = load_checkpoint(ckpt_path)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]), list(ckpt.get("history", []))


def write_checkpoint(ckpt_path: Path, *, epoch: int, epochs: int, model: nn.Module, opt, scaler,
                     history: list[dict], meta: dict | None, config: dict) -> None:
    """The engine's ``last.pt`` (:data:`CHECKPOINT_FORMAT`), written atomically."""
    save_checkpoint(ckpt_path, {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "epochs": epochs,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(),
        "history": history,
        "meta": meta or {},
        "config": config,
    })


def epoch_source_info(source: Any, factory: Any, epoch: int) -> tuple[Any, int, int | None]:
    """``(counter object, its bytes_read now, batches in the epoch or None)`` of an epoch's
    iterable: the iterable's ``bytes_read`` counter, else the factory's, else ``(None, 0, …)``
    (then the caller sums what it is given). An epoch of no batch is a ``ValueError``."""
    counter0 = _bytes_counter(source)
    if counter0 is None:
        counter0 = _bytes_counter(factory)
        counter_obj = factory if counter0 is not None else None
    else:
        counter_obj = source
    try:
        total = len(source)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if total == 0:
        # e.g. a small store and a batch larger than it, the last partial batch dropped:
        # training would "run" without a single step and report a loss of 0
        raise ValueError(f"epoch {epoch + 1}: the training data gives no batch: fewer samples "
                         "per process than the batch size, and the partial batch is dropped; "
                         "lower the batch size (--batch-size)")
    return counter_obj, counter0 or 0, total


def publish_epoch(record: dict, history: list[dict], *, rank: int, world: int,
                  log: Callable[[dict], None] | None, ckpt_path: Path | None, epochs: int,
                  model: nn.Module, opt, scaler, meta: dict | None, config: dict) -> None:
    """End of an epoch: append ``record`` to ``history``; rank 0 logs it and writes ``last.pt``;
    all ranks wait for each other."""
    history.append(record)
    if rank == 0:
        if log is not None:
            log(record)
        if ckpt_path is not None:
            write_checkpoint(ckpt_path, epoch=record["epoch"], epochs=epochs, model=model, opt=opt,
                             scaler=scaler, history=history, meta=meta, config=config)
    if world > 1:
        dist.barrier()


def optimizer_step(opt, scaler, loss: torch.Tensor) -> None:
    """Zero the gradients, back-propagate ``loss`` through the (AMP) scaler and step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def end_of_loop(dev: torch.device, t_start: float, bar) -> float:
    """Wait for the device, close the bar; the loop's wall time since ``t_start``."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t_start
    bar.close()
    return wall


def progress_bar(total: int | None, desc: str, enabled: bool):
    """The engine's tqdm bar on stderr (batches)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="batch", disable=not enabled,
                dynamic_ncols=True, mininterval=0.5, leave=False)


def _bytes_counter(obj: Any) -> int | None:
    v = getattr(obj, "bytes_read", None)
    if callable(v):
        v = v()
    return int(v) if isinstance(v, (int, np.integer)) else None


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == y[:, None]
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------- the loop

def evaluate(model: nn.Module, batches: Iterable, *, device: torch.device, amp: bool = False,
             world_size: int = 1) -> dict:
    """Top-1/top-5 accuracy and mean loss over ``batches`` (this rank's shard; summed over ranks)."""
    model.eval()
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, top1, top5, n
    with torch.no_grad(), _autocast(device, amp):
        for x, y in batches:
            x, y = _to_device(x, y, device)
            out = model(x)
            loss = nn.functional.cross_entropy(out.float(), y, reduction="sum")
            c1, c5 = _topk_correct(out, y, (1, 5))
            acc += torch.stack([loss.double(), c1.double(), c5.double(),
                                torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device)])
    acc = _all_reduce(acc, world_size).cpu()
    n = max(acc[3].item(), 1.0)
    return {"val_loss": acc[0].item() / n, "val_top1": acc[1].item() / n, "val_top5": acc[2].item() / n,
            "val_samples": int(acc[3].item())}


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if not x.is_floating_point():
        x = x.float()
    return x, y.long()


def train(model: nn.Module, train_batches_factory: BatchesFactory,
          val_batches_factory: BatchesFactory | None = None, *, epochs: int, lr: float = 0.1,
          momentum: float = 0.9, weight_decay: float = 1e-4, amp: bool = False,
          device: str | torch.device | None = None, checkpoint_dir: str | os.PathLike | None = None,
          resume: bool = False, log: Callable[[dict], None] | None = print_json_line,
          schedule: str = "step", warmup_epochs: int = 0, nesterov: bool = False,
          label_smoothing: float = 0.0, progress: bool = True, meta: dict | None = None,
          join_uneven: bool = True, precise_bn: bool | str = "auto") -> list[dict]:
    """Train ``model`` for ``epochs`` epochs with SGD; returns the per-epoch records (whole history,
    including epochs restored from a checkpoint).

    * AMP: ``torch.autocast`` with bfloat16 on CPU, float16 + ``GradScaler`` on CUDA.
    * DDP: when a process group is initialised (see :func:`setup_distributed`, called here for
      ``torchrun`` launches) the model is wrapped in ``DistributedDataParallel``; metrics are summed
      over ranks; only rank 0 logs and writes checkpoints.
    * Checkpoints: ``checkpoint_dir/last.pt`` after every epoch, written atomically, holding the
      model, optimizer and scaler state, the epoch, RNG states, the history and ``meta`` — tensors
      and plain containers only, loaded with ``weights_only=True``. ``resume=True`` continues from
      it: with deterministic factories the result equals an uninterrupted run.
    * Precise BatchNorm: ``precise_bn=True`` ends every epoch with
      :func:`recalibrate_batchnorm` over the epoch's training batches (the factory called
      again for the same epoch), before evaluation and the checkpoint; ``"auto"`` (default) does so
      only for epochs of fewer than ``PRECISE_BN_MAX_STEPS`` optimizer steps (small datasets:
      an ImageNet epoch has thousands of steps and keeps the usual running averages);
      ``False`` never. Records say ``bn_recalibrated`` (batches used, 0 when not).
    """
    if precise_bn not in (True, False, "auto"):
        raise ValueError(f"precise_bn must be True, False or 'auto', got {precise_bn!r}")
    rank, world, local_rank = setup_distributed(None if device is None else str(device))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    model = model.to(dev)
    core = model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    start_epoch, history = restore_checkpoint(ckpt_path, core, opt, scaler, resume=resume,
                                              rank=rank)

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(core, device_ids=[dev.index] if dev.type == "cuda" else None)

    for epoch in range(start_epoch, epochs):
        cur_lr = lr_at(epoch, base_lr=lr, epochs=epochs, schedule=schedule, warmup_epochs=warmup_epochs)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        model.train()
        source = train_batches_factory(epoch)
        counter_obj, counter0, total = epoch_source_info(source, train_batches_factory, epoch)
        bar = progress_bar(total, f"epoch {epoch + 1}/{epochs}", progress and rank == 0)
        acc = torch.zeros(2, dtype=torch.float64, device=dev)  # loss_sum, correct (no per-step sync)
        n_seen = 0
        est_bytes = 0
        wait = 0.0
        steps = 0
        join_ctx = model.join() if (world > 1 and join_uneven) else nullcontext()
        t_start = time.perf_counter()
        with join_ctx:
            it = iter(source)
            while True:
                t0 = time.perf_counter()
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                if counter_obj is None:
                    est_bytes += x.nbytes + y.nbytes
                x, y = _to_device(x, y, dev)
                wait += time.perf_counter() - t0
                with _autocast(dev, amp):
                    out = model(x)
                    loss = criterion(out, y)
                optimizer_step(opt, scaler, loss)
                with torch.no_grad():
                    bs = y.shape[0]
                    acc[0] += loss.detach().double() * bs
                    acc[1] += (out.argmax(1) == y).sum()
                n_seen += bs
                steps += 1
                bar.update(1)
                if rank == 0 and progress and steps % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{cur_lr:.3g}")
        wall = end_of_loop(dev, t_start, bar)
        bytes_read = (_bytes_counter(counter_obj) - counter0) if counter_obj is not None else est_bytes
        stats = torch.tensor([acc[0].item(), acc[1].item(), float(n_seen), float(bytes_read),
                              wait / max(wall, 1e-9), float(steps)], dtype=torch.float64, device=dev)
        stats = _all_reduce(stats, world).cpu()
        n = max(stats[2].item(), 1.0)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": stats[0].item() / n,
            "train_top1": stats[1].item() / n,
            "val_top1": None,
            "val_top5": None,
            "samples_per_s": stats[2].item() / max(wall, 1e-9),
            "data_wait_frac": stats[4].item() / world,
            "bytes_read": int(stats[3].item()),
            "lr": cur_lr,
            "train_samples": int(stats[2].item()),
            "train_batches": steps,
            "world_size": world,
        }
        recal = 0
        if precise_bn is True or (precise_bn == "auto" and steps < PRECISE_BN_MAX_STEPS):
            # the statistics of the weights that are evaluated and saved, on this rank's data
            recal = recalibrate_batchnorm(core, train_batches_factory(epoch), device=dev, amp=amp)
        record["bn_recalibrated"] = recal
        if world > 1:
            # BatchNorm running statistics drift apart between ranks within an epoch (each rank
            # updates them from its own batches); evaluate and save rank 0's everywhere.
            for b in core.buffers():
                dist.broadcast(b, 0)
        if val_batches_factory is not None:
            record.update(evaluate(core, val_batches_factory(epoch), device=dev, amp=amp, world_size=world))
        record["epoch_time_s"] = time.perf_counter() - t_start
        publish_epoch(record, history, rank=rank, world=world, log=log, ckpt_path=ckpt_path,
                      epochs=epochs, model=core, opt=opt, scaler=scaler, meta=meta,
                      config={"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                              "schedule": schedule, "warmup_epochs": warmup_epochs, "amp": amp,
                              "precise_bn": precise_bn, "world_size": world})
    return history
