"""Shard assembly: a shard's prepared samples -> batches -> the method -> one ShardBatch, written
and committed by the store (``StoreWriter.write_shard``: the shard's only commit).

A shard's content depends only on its slots (batches never span shards and are cut in slot
order), so every output byte is the same whatever the executor, workers or threads.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import jobdir, signals
from .prefetch import prepared

# Methods that measure (the learned codec) decode this many samples per shard to record PSNR /
# MS-SSIM and actual vs estimated rate: a deterministic subset, so cost stays small.
MEASURE_PER_SHARD = 8


class ShardCancelled(RuntimeError):
    """A shard task stopped because its run was interrupted (its shard is left for the resume)."""


@dataclass
class ShardTask:
    """One shard's work (plain data: pickles to worker processes and dask workers)."""

    index: int
    out: str
    src_root: str
    spec: dict
    method: Any
    slots: list[int]
    items: list[Any]  # SourceItem per slot
    variants: list[int]
    frame: Any  # scatstore.sources.FrameSpec
    dtype: str
    batch_size: int
    torch_threads: int = 0
    run: str = ""  # this run's token: names its cancel file
    codec: Any = None  # dtype "tc": the store's CoefficientCodec (pickles as its record)


@dataclass
class ShardResult:
    index: int
    record: dict
    rejected: list[dict]
    seconds: float
    n_items: int = 0
    stats: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)


JPEG_QUALITY = 90  # the reference JPEG of `scatstore report` (a quality-90 file of the frame)
# frames per shard (its first ones) whose q90 JPEG is measured: ~1 ms each (PIL, 224²), so
# about 1 % of a 512-sample shard's transform time
JPEG_PER_SHARD = 32


def frame_jpeg_sums(images: np.ndarray) -> dict[str, float]:
    """Bytes of a quality-90 JPEG (PIL / libjpeg, 4:2:0) of each stored frame, summed: the
    reference the report compares every store with (``reference_jpeg`` in the manifest)."""
    import io

    from PIL import Image

    total = 0
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(
            buf, format="JPEG", quality=JPEG_QUALITY)
        total += buf.tell()
    return {"jpeg_q90_bytes_sum": float(total), "jpeg_q90_n": float(len(images))}


def make_tasks(cfg, method, index, spec, todo, torch_threads: int, run: str, frame,
               dtype: str, codec=None) -> list[ShardTask]:
    variants = cfg.variants
    tasks = []
    for s in todo:
        lo, hi = s * cfg.shard_size, min((s + 1) * cfg.shard_size, spec.n_slots)
        slots = list(range(lo, hi))
        tasks.append(ShardTask(
            index=s, out=str(cfg.out), src_root=str(index.root), spec=spec.to_dict(), method=method,
            slots=slots, items=[index.items[i // variants] for i in slots],
            variants=[i % variants for i in slots], frame=frame, dtype=dtype,
            batch_size=cfg.batch_size, torch_threads=torch_threads, run=run, codec=codec))
    return tasks


def window(task: ShardTask) -> int:
    # two batches ahead: the next batch is ready when the transform finishes this one, without
    # holding many decoded images (150 kB each at 224²) in memory
    return max(2 * task.batch_size, 4)


def encode_batch(task: ShardTask, method, images: np.ndarray) -> tuple[Any, dict, Any]:
    """Run the method on a uint8 batch. Returns (stored x, extra per-sample arrays, the method's
    output for ``measure``)."""
    if method.output_kind == "coefficients" and task.dtype in ("float16", "float32"):
        # the method may write the stored float type itself (one rounding, no second pass)
        encoded = method.encode(images, out_dtype=task.dtype)
    else:
        encoded = method.encode(images)
    kind = method.output_kind
    if kind == "bytes":
        return list(encoded), {}, encoded
    if kind == "pixels":
        return np.ascontiguousarray(encoded, dtype=np.uint8), {}, encoded
    if task.dtype == "tc":  # one transform-coded blob per sample (float32 coefficients in)
        return task.codec.encode(encoded), {}, encoded
    if task.dtype == "uint8":
        from scatstore.transforms.quantize import quantize_uint8

        q, qscale, qoffset = quantize_uint8(encoded)
        return q, {"qscale": qscale, "qoffset": qoffset}, encoded
    return np.ascontiguousarray(encoded, dtype=task.dtype), {}, encoded


class ShardEncoder:
    """One shard: collects its prepared samples in slot order, cuts them into batches, has them
    transformed (by ``run``: at once in this thread, or by a pool of transform threads), places
    the results by position and builds the shard's ShardBatch."""

    def __init__(self, task: ShardTask, on_progress: Callable[[int], None] | None,
                 run: Callable[[Callable[[], None]], None] | None = None,
                 on_complete: Callable[["ShardEncoder"], None] | None = None):
        self.task = task
        self.method = task.method
        self.on_progress = on_progress
        self.run = run or (lambda job: job())
        self.on_complete = on_complete
        self.started = time.perf_counter()
        self.t_start = time.time()
        self.rejected: list[dict] = []
        self.kept_slots: list[int] = []
        self.keys: list[str] = []
        self.labels: list[int] = []
        self.metas: list[dict] = []
        self.hws: list = []
        self.batch: list = []
        self.n_dispatched = 0
        self.lock = threading.Lock()
        self.pending = 0
        self.closed = False
        self.x_buf: np.ndarray | None = None   # array outputs, written in place by position
        self.parts: dict[int, tuple] = {}       # offset -> (bytes list or None, extras, quality)
        self.t_decode = self.t_encode = self.c_encode = 0.0

    def add(self, slot: int, item, variant: int, result) -> None:
        task = self.task
        if isinstance(result, Exception):
            from scatstore.sources import path_meta

            self.rejected.append({"slot": slot, "key": item.key, **path_meta(item.path),
                                  "code": getattr(result, "code", "corrupt"), "reason": str(result)})
            if self.on_progress:
                self.on_progress(1)
            return
        pixels, meta, hw, seconds = result
        self.t_decode += seconds
        self.kept_slots.append(slot)
        self.keys.append(item.key if not task.frame.augment else f"{item.key}_a{variant}")
        self.labels.append(int(item.label))
        self.metas.append(meta)
        self.hws.append(hw)
        self.batch.append(pixels)
        if len(self.batch) >= task.batch_size:
            self._dispatch()

    def _dispatch(self) -> None:
        if not self.batch:
            return
        batch, offset = self.batch, self.n_dispatched
        self.batch, self.n_dispatched = [], offset + len(batch)
        with self.lock:
            self.pending += 1
        self.run(lambda: self._encode(offset, batch))

    def _encode(self, offset: int, pixels: list) -> None:
        from scatstore.transforms.methods import batch_buffer

        t0, c0 = time.perf_counter(), time.thread_time()
        # (the method's output may alias `images`, e.g. raw pixels: it is copied out below,
        # before this thread reuses the buffer)
        images = np.stack(pixels, out=batch_buffer("images", (len(pixels), *pixels[0].shape),
                                                   pixels[0].dtype))
        x, extra, encoded = encode_batch(self.task, self.method, images)
        quality = None
        # The samples measured are the shard's first ones, by position: the same subset
        # whichever thread runs which batch.
        take = MEASURE_PER_SHARD - offset
        if take > 0:
            quality = self.method.measure(images[:take], encoded[:take])
        if JPEG_PER_SHARD - offset > 0:
            quality = {**(quality or {}), **frame_jpeg_sums(images[:JPEG_PER_SHARD - offset])}
        with self.lock:
            if isinstance(x, np.ndarray) and self.x_buf is None:
                self.x_buf = np.empty((len(self.task.slots), *x.shape[1:]), dtype=x.dtype)
            self.parts[offset] = (None if isinstance(x, np.ndarray) else list(x), extra, quality)
            self.t_encode += time.perf_counter() - t0
            self.c_encode += time.thread_time() - c0
        if isinstance(x, np.ndarray):
            self.x_buf[offset:offset + len(x)] = x  # disjoint rows per batch: no lock needed
        if self.on_progress:
            self.on_progress(len(pixels))
        self._batch_done()

    def _batch_done(self) -> None:
        with self.lock:
            self.pending -= 1
            complete = self.closed and self.pending == 0
        if complete and self.on_complete:
            self.on_complete(self)

    def close(self) -> None:
        """No more samples: dispatch the last batch; ``on_complete`` runs when all are done."""
        self._dispatch()
        with self.lock:
            self.closed = True
            complete = self.pending == 0
        if complete and self.on_complete:
            self.on_complete(self)

    def write(self) -> ShardResult:
        """Write the (complete) shard: its notes, then the store's files and commit record."""
        from scatstore.stores import ShardBatch, StoreSpec, writer_for

        t0, c0 = time.perf_counter(), time.thread_time()
        task = self.task
        spec = StoreSpec.from_dict(task.spec)
        offsets = sorted(self.parts)
        n = len(self.kept_slots)
        if self.x_buf is not None:
            x_all: Any = self.x_buf[:n]
        elif offsets:
            x_all = [b for o in offsets for b in self.parts[o][0]]
        else:
            x_all = [] if spec.sample_shape is None else np.zeros((0, *spec.sample_shape), dtype=task.dtype)
        quality: dict[str, float] = {}
        for o in offsets:  # summed in position order: the same float sums every run
            for k, v in (self.parts[o][2] or {}).items():
                quality[k] = quality.get(k, 0.0) + v
        kwargs: dict[str, Any] = {
            "slots": np.asarray(self.kept_slots, dtype=np.int64), "keys": self.keys, "x": x_all,
            "y": np.asarray(self.labels, dtype=np.int64), "meta": self.metas,
        }
        if spec.quantized:
            for k in ("qscale", "qoffset"):
                kwargs[k] = (np.concatenate([self.parts[o][1][k] for o in offsets]) if offsets
                             else np.zeros((0, *spec.sample_shape[:2]), np.float32))
        if spec.has_hw:
            kwargs["hw"] = np.asarray(self.hws, dtype=np.int32).reshape(-1, 2)
        if not signals.run_alive():  # the run that holds the lock is gone: no write
            raise ShardCancelled(f"shard {task.index}: the run that started this task is gone")
        jobdir.write_notes(task.out, task.index, self.rejected, quality)
        record = writer_for(task.out, spec).write_shard(task.index, ShardBatch(**kwargs)).to_dict()
        self.x_buf, self.parts = None, {}
        t_write, c_write = time.perf_counter() - t0, time.thread_time() - c0
        return ShardResult(index=task.index, record=record, rejected=self.rejected, quality=quality,
                           seconds=time.perf_counter() - self.started, n_items=len(task.slots),
                           stats={"decode_cpu_s": self.t_decode, "encode_s": self.t_encode,
                                  "encode_cpu_s": self.c_encode,
                                  "write_s": t_write, "write_cpu_s": c_write,
                                  "t_start": self.t_start, "t_end": time.time()})


def encode_shard(task: ShardTask, on_progress: Callable[[int], None] | None = None) -> ShardResult:
    """Encode and write one whole shard. Runs in any process (the unit of work of the process
    pool and of dask): decode threads ahead, the transform in this thread."""
    if task.torch_threads:
        from scatstore.transforms._torch_backend import set_thread_openmp_threads

        # this thread only: a dask worker of a threaded LocalCluster runs tasks in several
        # threads of one process, and the process-wide setter would also change the others'
        set_thread_openmp_threads(task.torch_threads)
    enc = ShardEncoder(task, on_progress)
    for k, (_task, slot, item, variant, result) in enumerate(prepared([task], window(task))):
        if k % task.batch_size == 0 and (not signals.run_alive() or (
                task.run and jobdir.is_cancelled(task.out, task.run))):
            raise ShardCancelled(f"shard {task.index}: run {task.run} interrupted")
        enc.add(slot, item, variant, result)
    enc.close()
    return enc.write()
