"""The encode job: a source dataset → a sharded, verified store of compact tensors.

How the job is cut up (see docs/architecture.md):

- The job has ``n_slots = n_items × max(1, augment)`` slots; slot ``i`` is source item
  ``i // variants``, variant ``i % variants``. Shard ``s`` holds slots
  ``[s·shard_size, (s+1)·shard_size)``. A shard's content depends only on its slots, so the output
  bytes are the same whatever the number of workers or the scheduler.
- One task encodes and writes one whole shard. When the shard's files are on disk the task writes a
  commit marker ``OUT/.scatstore/shards/shard-NNNNNN.json`` (atomically: temp file + rename). A
  re-run keeps every shard whose marker exists and whose files still hash to the recorded sha256,
  and redoes the others: a job killed at any moment resumes to the same bytes.
- The manifest is written last, atomically, by the store's ``finalize``.

How it runs (timings: docs/benchmarks.md, "Encode pipeline"):

- In-process (``workers=1``): one pipeline over all shards. Decode threads work a window ahead,
  across shard boundaries; transform threads (as many as the caller's torch threads, each a
  single-threaded transform pipeline) take the batches of any shard as they come; a writer
  thread writes each shard once all its batches are done, while the next ones are transformed.
- ``--workers N``: a process pool (spawn), and ``--scheduler``: dask; both run
  :func:`encode_shard` per shard: decode threads ahead, the transform in the task's thread on
  cores / N torch threads, the write at the end of the task.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

JOB_DIR = ".scatstore"
JOB_FILE = "job.json"
SHARD_MARKERS = "shards"
LOCK_FILE = "lock"
CANCEL_DIR = "cancel"
REJECTED_FILE = "rejected.jsonl"
# Methods with a `measure` hook (the learned codec) decode this many samples per shard to record
# PSNR / MS-SSIM and actual vs estimated rate: a deterministic subset, so cost stays small.
MEASURE_PER_SHARD = 8
FORMATS = ("zarr", "wds", "h5")
DTYPES = ("float16", "float32", "uint8")


class EncodeError(RuntimeError):
    """A fatal problem with the job as a whole (bad arguments, unusable SRC or OUT)."""


class JobTerminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit or preemption, ``kill``): the job stops as on
    Ctrl-C, committing the shards done, instead of dying where it stands."""


class ShardCancelled(RuntimeError):
    """A shard task stopped because its run was interrupted (its shard is left for the resume)."""


@dataclass
class EncodeConfig:
    """Everything that defines an encode job (``job_params`` picks the part that must match on resume)."""

    src: Path
    out: Path
    method: str = "scat1"
    J: int = 3
    L: int = 8
    codec: str | None = None
    format: str = "zarr"
    shard_size: int = 512
    size: int = 224
    dtype: str = "float16"
    compression: str = "default"
    layout: str = "auto"
    split: str | None = None
    augment: int = 0
    seed: int = 0
    workers: int = 1
    scheduler: str | None = None
    device: str = "cpu"
    batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        self.src = Path(self.src)
        self.out = Path(self.out)
        if self.format not in FORMATS:
            raise EncodeError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise EncodeError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("shard_size", "size", "workers", "batch_size"):
            if getattr(self, name) < 1:
                raise EncodeError(f"--{name.replace('_', '-')} must be ≥ 1")
        from scatstore.stores.base import StoreError, parse_compression

        try:
            parse_compression(self.compression)
        except StoreError as exc:
            raise EncodeError(f"--compression: {exc}") from None
        if self.augment < 0:
            raise EncodeError("--augment must be ≥ 0")
        if self.method in ("scat1", "scat2") and self.size <= 2 ** self.J:
            raise EncodeError(f"--size {self.size} is too small for J={self.J}: need > {2 ** self.J}")
        if self.method == "cae" and self.size % 8:
            raise EncodeError("method 'cae' needs --size divisible by 8 (encoder stride 8)")

    @property
    def variants(self) -> int:
        return max(1, self.augment)


# --------------------------------------------------------------------------------------------
# Work units (module level and plain data, so they pickle to worker processes and dask workers)


@dataclass
class ShardTask:
    index: int
    out: str
    src_root: str
    spec: dict
    method: Any
    slots: list[int]
    items: list[Any]  # SourceItem per slot
    variants: list[int]
    size: int
    dtype: str
    keep_aspect: bool
    augment: int
    seed: int
    batch_size: int
    torch_threads: int = 0
    run: str = ""  # this run's token: names its cancel file


@dataclass
class ShardResult:
    index: int
    record: dict
    rejected: list[dict]
    seconds: float
    n_items: int = 0
    stats: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _marker_path(out: Path, index: int) -> Path:
    return out / JOB_DIR / SHARD_MARKERS / f"shard-{index:06d}.json"


def _cancel_path(out: Path | str, run: str) -> Path:
    """Created when the run ``run`` is interrupted. Shard tasks look for it between batches: a
    file in OUT is what every worker of the job can see (threads, worker processes, the workers
    of a remote dask cluster, which share OUT), and a running task can be neither killed (a
    thread) nor reached (a remote process) any other way."""
    return Path(out) / JOB_DIR / CANCEL_DIR / run


# --------------------------------------------------------------------------------------------
# Decoding: threads of this process, a window ahead of the transform


# Decoding and resizing one ~500×375 JPEG costs ~1.1 ms of CPU (docs/benchmarks.md, encode), an
# eighth or less of its transform: a decode thread per four cores (two at least) keeps well ahead
# of the transform threads of a process on all of them (in-process, or the workers of a threaded
# dask LocalCluster); more would only preempt the transform. Idle threads cost nothing: a
# worker process that transforms on fewer cores still decodes at most a window ahead.
DECODE_THREADS = max(2, -(-(os.cpu_count() or 1) // 4))
_DECODE = {"pid": None, "pool": None}
_DECODE_LOCK = threading.Lock()


def _decode_thread_init() -> None:
    # The resampler is a torch op. In a thread left at torch's default (all cores) each call
    # opens an OpenMP team of its own: 7 ms per 224² resize instead of 0.33 ms, and spinning
    # threads that fight the transform's.
    from scatstore.transforms._torch_backend import set_thread_openmp_threads

    set_thread_openmp_threads(1)


def _decode_pool() -> ThreadPoolExecutor:
    """This process's decode threads, kept across tasks (a dask or pool worker runs many)."""
    with _DECODE_LOCK:
        if _DECODE["pid"] != os.getpid():  # threads do not survive a fork: start new ones
            _DECODE["pool"] = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="scatstore-decode",
                                                 initializer=_decode_thread_init)
            _DECODE["pid"] = os.getpid()
        return _DECODE["pool"]


def _prepare_item(task: ShardTask, item, variants: list[int]) -> tuple[list, float]:
    """Decode one source item once and preprocess the given variants of it (consecutive slots).

    Returns ``([(pixels, meta, hw), ...], CPU seconds of this thread)``; raises DecodeError for
    a bad file."""
    from scatstore.sources import (decode_for_frame, decode_image_reduced, random_resized_crop,
                                   resize_center_crop, resize_keep_aspect, variant_rng)

    t0 = time.thread_time()
    path = os.path.join(task.src_root, item.path)
    if task.augment:
        # a random crop may keep 8 % of the area: always decoded at full size
        img, f = decode_image_reduced(path)
    else:
        # a JPEG ≥ 6× the frame is decoded at reduced DCT scale (docs/sources.md)
        img, f = decode_for_frame(path, task.size, keep_aspect=task.keep_aspect)
    out = []
    for variant in variants:
        meta: dict[str, Any] = {"source_key": item.key, "path": item.path}
        if task.augment:
            meta["variant"] = variant
            # Seeded by (job seed, source key, variant): never by worker or shard position.
            pixels, geom = random_resized_crop(img, task.size, variant_rng(task.seed, item.key, variant))
            hw = (task.size, task.size)
        elif task.keep_aspect:
            pixels, hw, geom = resize_keep_aspect(img, task.size)
        else:
            pixels, geom = resize_center_crop(img, task.size)
            hw = (task.size, task.size)
        if f != 1:
            geom = geom.after_source_scale(1.0 / f)  # boxes are in full-size source pixels
        if "boxes" in item.meta:
            boxes = np.asarray(item.meta["boxes"], dtype=np.float64).reshape(-1, 4)
            kept_boxes, kept = geom.apply_to_boxes(boxes)
            cats = np.asarray(item.meta.get("category_ids", []), dtype=np.int64)
            meta["image_id"] = item.meta.get("image_id")
            meta["boxes"] = np.round(np.asarray(kept_boxes, dtype=np.float64), 3).tolist()
            meta["category_ids"] = cats[np.asarray(kept, dtype=bool)].tolist() if len(cats) else []
        if task.keep_aspect:
            meta["hw"] = [int(hw[0]), int(hw[1])]
        out.append((pixels, meta, hw))
    return out, time.thread_time() - t0


def _prepared(tasks: list[ShardTask], window: int) -> Iterator[tuple]:
    """Prepared samples of ``tasks``, in slot order: ``(task, slot, item, variant, result)``, where
    result is ``(pixels, meta, hw, decode CPU seconds)`` or a DecodeError.

    One decode job per source item and task (its variants are consecutive slots and share the
    decode), submitted up to ``window`` slots ahead, across task boundaries: the next shard is
    decoded while this one is transformed and written."""
    from scatstore.sources import DecodeError

    pool = _decode_pool()

    def groups():
        for task in tasks:
            i, n = 0, len(task.slots)
            while i < n:
                j = i + 1
                while j < n and task.items[j].key == task.items[i].key:
                    j += 1
                yield task, i, j
                i = j

    pending: deque = deque()
    ahead = 0
    source = groups()
    try:
        while True:
            while ahead < window:
                nxt = next(source, None)
                if nxt is None:
                    break
                task, i, j = nxt
                pending.append((task, i, j, pool.submit(_prepare_item, task, task.items[i],
                                                        task.variants[i:j])))
                ahead += j - i
            if not pending:
                return
            task, i, j, fut = pending.popleft()
            ahead -= j - i
            try:
                results, seconds = fut.result()
            except DecodeError as exc:
                for k in range(i, j):
                    yield task, task.slots[k], task.items[k], task.variants[k], exc
                continue
            for n, k in enumerate(range(i, j)):
                # the decode time is counted once per item, on its first variant
                yield task, task.slots[k], task.items[k], task.variants[k], \
                    (*results[n], seconds if n == 0 else 0.0)
    finally:
        for *_, fut in pending:  # an error stopped the job: drop the work queued for it
            fut.cancel()


# --------------------------------------------------------------------------------------------
# Transform and storage

_DIRECT: dict = {}
_DIRECT_LOCK = threading.Lock()


def _direct_scattering(method, dtype: str, size: int):
    """A Scattering2D that writes the stored float dtype itself, or None.

    ``ScatteringMethod.encode`` returns float32 and the engine would then convert to float16 in a
    second pass over every coefficient (~1 % of the transform's time); the transform can cast
    each chunk as it writes it instead, with the same rounding (round to nearest even). The input
    convention (uint8 / 255, float32) is the method's (``params["input_scale"]``)."""
    from scatstore.transforms.methods import ScatteringMethod

    if type(method) is not ScatteringMethod or method.backend != "torch" \
            or dtype not in ("float16", "float32"):
        return None
    key = (method.J, method.L, method.max_order, str(method.device), size, dtype)
    with _DIRECT_LOCK:  # one per process, shared by the transform threads and later tasks
        S = _DIRECT.get(key)
        if S is None:
            import torch

            from scatstore.transforms.scattering import Scattering2D

            # Filters and FFT plans are cached per process by the transform, keyed by geometry.
            S = _DIRECT[key] = Scattering2D(J=method.J, shape=(size, size), L=method.L,
                                            max_order=method.max_order, backend="torch",
                                            out_dtype=getattr(torch, dtype))
    return S


_BUFFERS = threading.local()


def _batch_buffer(name: str, shape: tuple, dtype) -> np.ndarray:
    """A per-thread buffer reused batch after batch.

    A fresh 19 MB float batch per call is freed at once, glibc then hands the free top of the
    thread's heap back to the kernel, and the next batch faults every page in again: measured
    130-200 page faults per image in-process (2-14 with reused buffers), ~0.3 ms of CPU each."""
    buf = getattr(_BUFFERS, name, None)
    if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or len(buf) < shape[0]:
        buf = np.empty(shape, dtype=dtype)
        setattr(_BUFFERS, name, buf)
    return buf[:shape[0]]


def _encode_batch(task: ShardTask, method, images: np.ndarray) -> tuple[Any, dict, Any]:
    """Run the method on a uint8 batch. Returns (stored x, extra per-sample arrays, raw output
    for ``measure``)."""
    S = _direct_scattering(method, task.dtype, images.shape[-1])
    if S is not None:
        import torch

        if torch.device(method.device).type == "cpu":
            # numpy's division is bit-identical to torch's and never opens an OpenMP region
            # (whose idle workers spin ~6 ms after each, libgomp's default spin-wait)
            x = np.divide(images, np.float32(255.0), dtype=np.float32,
                          out=_batch_buffer("x", images.shape, np.float32))
            x = torch.from_numpy(x)
        else:
            x = torch.from_numpy(images).to(method.device, torch.float32).div_(255.0)
        with torch.no_grad():
            out = S(x)
        return out.cpu().numpy(), {}, None
    encoded = method.encode(images)
    x, extra = _to_storage(task, method, encoded)
    return x, extra, encoded


def _to_storage(task: ShardTask, method, encoded) -> tuple[Any, dict]:
    """Convert a method's output to the stored dtype. Returns (x, extra per-sample arrays)."""
    kind = method.output_kind
    if kind == "bytes":
        return list(encoded), {}
    if kind == "pixels":
        return np.ascontiguousarray(encoded, dtype=np.uint8), {}
    if task.dtype == "uint8":
        from scatstore.transforms.quantize import quantize_uint8

        q, qscale, qoffset = quantize_uint8(encoded)
        return q, {"qscale": qscale, "qoffset": qoffset}
    return np.ascontiguousarray(encoded, dtype=task.dtype), {}


class _ShardEncoder:
    """One shard: collects its prepared samples in slot order, cuts them into batches, has them
    transformed (by ``run``: at once in this thread, or by a pool of transform threads), places
    the results by position and builds the shard's ShardBatch.

    Batches never span shards and are cut in slot order, so what a batch holds (and thus every
    output byte) depends only on the shard, never on workers, threads or scheduling."""

    def __init__(self, task: ShardTask, on_progress: Callable[[int], None] | None,
                 run: Callable[[Callable[[], None]], None] | None = None,
                 on_complete: Callable[["_ShardEncoder"], None] | None = None):
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
            self.rejected.append({"slot": slot, "key": item.key, "path": item.path,
                                  "code": getattr(result, "code", "corrupt"), "reason": str(result)})
            if self.on_progress:
                self.on_progress(1)
            return
        pixels, meta, hw, seconds = result
        self.t_decode += seconds
        self.kept_slots.append(slot)
        self.keys.append(item.key if not task.augment else f"{item.key}_a{variant}")
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
        t0, c0 = time.perf_counter(), time.thread_time()
        # (the method's output may alias `images`, e.g. raw pixels: it is copied out below,
        # before this thread reuses the buffer)
        images = np.stack(pixels, out=_batch_buffer("images", (len(pixels), *pixels[0].shape),
                                                     pixels[0].dtype))
        x, extra, encoded = _encode_batch(self.task, self.method, images)
        quality = None
        # The samples measured (methods with a `measure` hook) are the shard's first ones, by
        # position: the same subset whichever thread runs which batch.
        take = MEASURE_PER_SHARD - offset
        if hasattr(self.method, "measure") and take > 0:
            quality = self.method.measure(images[:take], encoded[:take])
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
        """Write the (complete) shard and then its marker; returns the ShardResult."""
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
        out = Path(task.out)
        record = writer_for(out, spec).write_shard(task.index, ShardBatch(**kwargs)).to_dict()
        self.x_buf, self.parts = None, {}
        marker = {"record": record, "rejected": self.rejected, "quality": quality}
        # The marker is the shard's commit: written (atomically) only once its files are.
        _atomic_write_text(_marker_path(out, task.index), json.dumps(marker, sort_keys=True))
        t_write, c_write = time.perf_counter() - t0, time.thread_time() - c0
        return ShardResult(index=task.index, record=record, rejected=self.rejected, quality=quality,
                           seconds=time.perf_counter() - self.started, n_items=len(task.slots),
                           stats={"decode_cpu_s": self.t_decode, "encode_s": self.t_encode,
                                  "encode_cpu_s": self.c_encode,
                                  "write_s": t_write, "write_cpu_s": c_write,
                                  "t_start": self.t_start, "t_end": time.time()})


def _window(task: ShardTask) -> int:
    # two batches ahead: the next batch is ready when the transform finishes this one, without
    # holding many decoded images (150 kB each at 224²) in memory
    return max(2 * task.batch_size, 4)


def encode_shard(task: ShardTask, on_progress: Callable[[int], None] | None = None) -> ShardResult:
    """Encode and write one whole shard, then commit its marker. Runs in any process (the unit of
    work of the process pool and of dask): decode threads ahead, the transform in this thread."""
    if task.torch_threads:
        from scatstore.transforms._torch_backend import set_thread_openmp_threads

        # this thread only: a dask worker of a threaded LocalCluster runs tasks in several
        # threads of one process, and the process-wide setter would also change the others'
        set_thread_openmp_threads(task.torch_threads)
    enc = _ShardEncoder(task, on_progress)
    cancel = _cancel_path(task.out, task.run) if task.run else None
    for k, (_task, slot, item, variant, result) in enumerate(_prepared([task], _window(task))):
        if cancel is not None and k % task.batch_size == 0 and cancel.exists():
            raise ShardCancelled(f"shard {task.index}: run {task.run} interrupted")
        enc.add(slot, item, variant, result)
    enc.close()
    return enc.write()


def _leave_stop_signals_to_the_parent() -> None:
    # Worker processes of the pool: Ctrl-C reaches the whole process group, and a batch
    # scheduler sends SIGTERM to every process of the job; the parent alone handles them
    # (cancels the queued shards, lets the running ones stop at their next batch), instead of
    # each worker dying with a traceback of its own or breaking the pool under the parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _TransformThreads:
    """``n`` threads that run batch jobs, each with one OpenMP thread, so that each runs one
    single-threaded transform pipeline (the transform sizes its pipelines by the calling
    thread's torch thread count).

    Why not one thread driving all cores (the transform's own ``torch.get_num_threads()``
    pipelines): that thread converts, checks and collects between batches while the cores wait
    (~4 % of the time, plus the tail of each batch), and its 2-thread OpenMP regions leave a
    worker spinning ~6 ms after each (libgomp's spin-wait), ~0.5-0.9 ms of CPU per image taken
    from the transform. Here a thread's serial steps overlap the other threads' transforms.
    Jobs that start once no more will come (the job's last batches) run on all ``n`` OpenMP
    threads, so the end of the job keeps every core busy."""

    def __init__(self, n: int):
        import queue

        self.n = n
        self.jobs: queue.Queue = queue.Queue(maxsize=n)  # backpressure on the producer
        self.error: BaseException | None = None
        self.finishing = False
        self.lock = threading.Lock()
        self.queued = 0  # jobs submitted and not yet taken
        self.threads = [threading.Thread(target=self._loop, name=f"scatstore-transform-{i}",
                                         daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        from scatstore.transforms._torch_backend import set_thread_openmp_threads

        set_thread_openmp_threads(1)
        wide = False
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.lock:
                self.queued -= 1
                last = self.finishing and self.queued == 0
            if last and not wide:
                set_thread_openmp_threads(self.n)
                wide = True
            if self.error is None:
                try:
                    job()
                except BaseException as exc:  # handed to the producer, which re-raises it
                    self.error = exc

    def submit(self, job: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        with self.lock:
            self.queued += 1
        self.jobs.put(job)

    def finish(self) -> None:
        """No more jobs will be submitted; wait for the threads to end."""
        with self.lock:
            self.finishing = True
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error


def _encode_in_process(tasks: list[ShardTask], on_progress) -> Iterator[ShardResult]:
    """All tasks in this process, as one pipeline: decode threads work ahead across shard
    boundaries, transform threads (one per torch thread of the caller) take batches of any shard
    as they come, and a writer thread writes each shard once all its batches are done, while the
    next ones are transformed. Each shard is still written whole by one call, its marker after
    its files; shard results come back in shard order."""
    if not tasks:
        return
    import torch

    n = tasks[0].torch_threads or torch.get_num_threads()
    progress_lock = threading.Lock()

    def progress(k: int) -> None:
        if on_progress:
            with progress_lock:  # called from the transform threads
                on_progress(k)

    writes: deque = deque()
    futures: dict[int, Any] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="scatstore-write") as writer:
        def complete(enc: _ShardEncoder) -> None:
            futures[enc.task.index] = writer.submit(enc.write)

        pool = _TransformThreads(n)
        try:
            enc = None
            for task, slot, item, variant, result in _prepared(tasks, _window(tasks[0])):
                if enc is None or enc.task is not task:
                    if enc is not None:
                        enc.close()
                    enc = _ShardEncoder(task, progress, pool.submit, complete)
                    writes.append(task.index)
                enc.add(slot, item, variant, result)
                # hand back written shards in order as soon as they are done
                while writes and writes[0] in futures and futures[writes[0]].done():
                    yield futures.pop(writes.popleft()).result()
            if enc is not None:
                enc.close()
        finally:
            pool.finish()
        for index in writes:
            yield futures.pop(index).result()


# --------------------------------------------------------------------------------------------
# The driver


def job_params(cfg: EncodeConfig, method, source_fingerprint: str) -> dict:
    """The parameters that define a job: a resume must match all of them."""
    from scatstore.stores import MANIFEST_VERSION

    return {
        "manifest_version": MANIFEST_VERSION,
        "method": {"name": method.name, "params": method.params},
        "format": cfg.format, "shard_size": cfg.shard_size, "size": cfg.size,
        "dtype": _stored_dtype(cfg, method), "compression": cfg.compression, "layout": cfg.layout, "split": cfg.split,
        "augment": cfg.augment, "seed": cfg.seed, "source_fingerprint": source_fingerprint,
    }


def _stored_dtype(cfg: EncodeConfig, method) -> str:
    return {"pixels": "uint8", "bytes": "bytes"}.get(method.output_kind, cfg.dtype)


def _fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _check_out(cfg: EncodeConfig, params: dict):
    """Validate and lock OUT. Returns (whether OUT already holds part of this very job, the
    lock of this run on OUT: see ``_job_lock``)."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise EncodeError(f"OUT {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_DIR / SHARD_MARKERS).mkdir(parents=True, exist_ok=True)
        probe = out / JOB_DIR / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EncodeError(f"OUT {out} is not writable: {exc.strerror or exc}") from exc
    lock = _job_lock(out)  # before job.json: two new jobs racing for one OUT never mix
    try:
        return _check_job_file(out, params), lock
    except BaseException:
        lock.close()
        raise


def _check_job_file(out: Path, params: dict) -> bool:
    job_file = out / JOB_DIR / JOB_FILE
    if job_file.exists():
        try:
            previous = json.loads(job_file.read_text())
        except (OSError, ValueError) as exc:
            raise EncodeError(f"{job_file} is unreadable ({exc}); remove OUT or choose another") from exc
        if previous.get("fingerprint") != _fingerprint(params):
            diff = sorted(k for k in set(params) | set(previous.get("params", {}))
                          if params.get(k) != previous.get("params", {}).get(k))
            raise EncodeError(
                f"OUT {out} holds a different job's data (differs in: {', '.join(diff)}); "
                "use a new OUT or delete this one")
        return True
    others = [p.name for p in out.iterdir() if p.name != JOB_DIR]
    if others:
        raise EncodeError(f"OUT {out} is not empty and holds no scatstore job "
                          f"(found {', '.join(sorted(others)[:3])}…); choose an empty directory")
    _atomic_write_text(job_file, json.dumps({"fingerprint": _fingerprint(params), "params": params},
                                            indent=2, sort_keys=True))
    return False


def _job_lock(out: Path):
    """Hold OUT for this run: a second encode into the same OUT at the same time is refused.

    An advisory ``flock`` on ``OUT/.scatstore/lock``: the kernel drops it when the process ends
    however it ends, so a killed job never leaves OUT locked. (Two jobs would not corrupt OUT,
    since every file is written whole and renamed and the bytes are deterministic, but each
    would redo the other's shards.) On file systems without working flock (some NFS mounts)
    the lock may not hold across machines."""
    import fcntl

    f = open(out / JOB_DIR / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise EncodeError(f"OUT {out} is being written by another encode ({holder}); wait for "
                          "it to end, or stop it and re-run to resume") from None
    except OSError:
        return f  # no flock here: go on unlocked
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    return f


def _load_markers(out: Path, writer, n_shards: int) -> dict[int, dict]:
    """Completed shards whose files still hash to their recorded checksums."""
    from scatstore.stores import ShardRecord

    done = {}
    for index in range(n_shards):
        path = _marker_path(out, index)
        if not path.exists():
            continue
        try:
            marker = json.loads(path.read_text())
            if writer.check_shard(ShardRecord.from_dict(marker["record"])):
                done[index] = marker
        except (OSError, ValueError, KeyError):
            pass  # unreadable marker: the shard is redone
    return done


def _committed(out: Path, n_shards: int) -> int:
    return sum(1 for i in range(n_shards) if _marker_path(out, i).exists())


def _make_tasks(cfg, method, index, spec, todo: Iterable[int], torch_threads: int,
                run: str) -> list[ShardTask]:
    variants = cfg.variants
    tasks = []
    for s in todo:
        lo, hi = s * cfg.shard_size, min((s + 1) * cfg.shard_size, spec.n_slots)
        slots = list(range(lo, hi))
        tasks.append(ShardTask(
            index=s, out=str(cfg.out), src_root=str(index.root), spec=spec.to_dict(), method=method,
            slots=slots, items=[index.items[i // variants] for i in slots],
            variants=[i % variants for i in slots], size=cfg.size, dtype=cfg.dtype,
            keep_aspect=index.layout == "coco", augment=cfg.augment, seed=cfg.seed,
            batch_size=cfg.batch_size, torch_threads=torch_threads, run=run))
    return tasks


def _run_tasks(cfg: EncodeConfig, tasks: list[ShardTask], bar) -> Iterable[ShardResult]:
    """Run the tasks in-process, on a local process pool, or on a dask cluster."""
    if not tasks:
        return
    if cfg.scheduler:
        yield from _run_dask(cfg, tasks, bar)
    elif cfg.workers == 1:
        yield from _encode_in_process(tasks, bar.update)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent may hold torch thread pools and open file handles.
        ex = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn"),
                                 initializer=_leave_stop_signals_to_the_parent)
        try:
            futures = [ex.submit(encode_shard, t) for t in tasks]
            for fut in as_completed(futures):
                result = fut.result()
                bar.update(result.n_items)
                yield result
        except BaseException:
            _cancel_run(cfg.out, tasks[0].run)
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        ex.shutdown(wait=True)


def _cancel_run(out: Path, run: str) -> None:
    """Tell the running shard tasks of ``run`` to stop (they look between batches)."""
    path = _cancel_path(out, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def local_cluster(n_workers: int, processes: bool = False):
    """The dask LocalCluster that ``--scheduler local`` runs on: ``n_workers`` single-threaded
    workers. Start one yourself (and pass its ``scheduler_address`` as ``scheduler``) to run
    several jobs on the same warm workers.

    ``processes=False`` (what ``--scheduler local`` uses): the workers are threads of this
    process, the layout dask recommends for work that releases the GIL, which every heavy stage
    here does (libjpeg-turbo, torch's resampler, the transform's C kernels and torch ops, zstd,
    sha256). Measured on the encode benchmark (docs/benchmarks.md): the cluster is up in 0.2 s
    instead of 1.6-1.9 s (no worker processes to spawn, each importing distributed, torch and
    zarr and building its own filters), and the workers share one copy of the filters and FFT
    plans. ``processes=True``: one process per worker, each task on cores / N torch threads,
    the layout of ``--workers N`` without dask and of a real cluster's workers; these run
    without dask's ``MALLOC_TRIM_THRESHOLD_=65536`` in their environment: setting it turns off
    glibc's adaptive mmap threshold, so every allocation over 128 kB (each decoded image, each
    batch) becomes a fresh mmap whose pages fault in again (decode 2.1-2.3 instead of 1.4-1.7 ms
    CPU per image, the transform +10 %).

    Either way the statistical profiler is off (it takes the GIL to sample every thread's stack
    every 10 ms; with thread workers, this process's own threads too) and the memory and system
    monitors run less often (an idle 2-worker cluster: 9 % of a core instead of 13 %). Thread
    workers get no memory limit: their memory monitor would measure the whole process against a
    per-worker share and pause them, and encode tasks hold no dask data to spill."""
    import dask
    from distributed import LocalCluster

    settings = {"distributed.worker.profile.enabled": False,
                "distributed.worker.memory.monitor-interval": "1s",
                "distributed.admin.system-monitor.interval": "2s"}
    kwargs: dict[str, Any] = {}
    if processes:
        settings["distributed.nanny.pre-spawn-environ"] = {
            k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()
            if k != "MALLOC_TRIM_THRESHOLD_"}
    else:
        kwargs["memory_limit"] = 0
    with dask.config.set(settings):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=processes,
                            dashboard_address=":0", **kwargs)  # any free port: never a clash


class _StopRequest:
    """Set by a stop signal while dask runs the job: which exception the job's loop raises."""

    def __init__(self):
        self.exception: type[BaseException] | None = None


@contextlib.contextmanager
def _signal_handlers(handlers: dict):
    """Install ``handlers`` (signal -> function) while the block runs and restore the previous
    ones after; only in the main thread, the only one Python runs signal handlers in."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _stop_signals_as_flag():
    """While dask runs the job, Ctrl-C and SIGTERM only record the request.

    A KeyboardInterrupt raised inside one of distributed's blocking client calls breaks it
    (seen: its cancel callback failing on an unset future, logged with a traceback); the job's
    loop looks at the request between waits and raises it itself. A second signal raises at
    once. Only the main thread can take signals: elsewhere nothing is recorded."""
    stop = _StopRequest()

    def on_signal(signum, frame):
        exc = JobTerminated if signum == signal.SIGTERM else KeyboardInterrupt
        if stop.exception is not None:
            raise exc
        stop.exception = exc

    with _signal_handlers({signal.SIGINT: on_signal, signal.SIGTERM: on_signal}):
        yield stop


def _raise_job_terminated(signum, frame):
    raise JobTerminated


def _sigterm_as_interrupt():
    """SIGTERM raises JobTerminated in the main thread while the job runs (by default the
    process dies at once, and the shards in flight are redone by the resume); left alone when
    the caller has a handler of its own."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return contextlib.nullcontext()
    return _signal_handlers({signal.SIGTERM: _raise_job_terminated})


def _run_dask(cfg: EncodeConfig, tasks: list[ShardTask], bar) -> Iterable[ShardResult]:
    with _stop_signals_as_flag() as stop:
        yield from _run_dask_tasks(cfg, tasks, bar, stop)


def _run_dask_tasks(cfg: EncodeConfig, tasks: list[ShardTask], bar,
                    stop: _StopRequest) -> Iterable[ShardResult]:
    from distributed import Client, as_completed

    cluster = None
    if cfg.scheduler == "local":
        cluster = local_cluster(cfg.workers)
        client = Client(cluster)
    else:
        client = Client(cfg.scheduler)
    futures: list = []
    dask_log, dask_level = None, logging.NOTSET
    try:
        # pure=False: a task's result is a side effect on disk, never deduplicated by dask. The
        # run's own token in the key: on a shared, long-running cluster another job's (or an
        # earlier run's) shard N must never be taken for this one's.
        run = tasks[0].run
        futures = [client.submit(encode_shard, t, pure=False, key=f"encode-shard-{t.index}-{run}")
                   for t in tasks]
        pending = as_completed(futures)
        while not pending.is_empty():
            if stop.exception is not None:
                raise stop.exception
            if not pending.has_ready():
                time.sleep(0.02)
                continue
            for fut in pending.next_batch(block=False):
                result = fut.result()
                bar.update(result.n_items)
                yield result
    except BaseException:
        # Running tasks cannot be killed (thread workers) or may run on; they stop at their
        # next batch. Closing the cluster then waits for its worker threads.
        if cluster is not None:  # our own workers' notes on the tasks cancelled (or stopped): noise
            dask_log = logging.getLogger("distributed")
            dask_level = dask_log.level
            dask_log.setLevel(logging.CRITICAL)
        _cancel_run(cfg.out, tasks[0].run)
        client.cancel(futures)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        if dask_log is not None:
            dask_log.setLevel(dask_level)


def _progress_bar(cfg: EncodeConfig, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=f"encode {cfg.method}",
                disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def encode(cfg: EncodeConfig, log: Callable[[str], None] | None = None,
           stats: dict | None = None) -> dict:
    """Run (or resume) an encode job. Returns the committed manifest.

    ``stats``, when given, is filled with this run's timings (they are never stored: the output
    bytes must not depend on them): ``images`` encoded now, ``elapsed_s`` (running the shard
    tasks, start-up of workers included), ``ready_s`` (until the first task started, i.e. the
    workers' start-up), ``steady_s`` (first task start to last task end), and the sums over
    shards of ``decode_cpu_s`` (CPU of the decode threads), ``encode_s`` (time in the method),
    ``encode_cpu_s`` (CPU of the threads calling it, the transform's own helper threads not
    included), ``write_s`` and ``write_cpu_s``."""
    from scatstore.sources import discover
    from scatstore.stores import StoreSpec, read_manifest, writer_for
    from scatstore.transforms.methods import make_method

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not cfg.src.exists():
        raise EncodeError(f"SRC {cfg.src} does not exist")
    if not cfg.src.is_dir():
        raise EncodeError(f"SRC {cfg.src} is not a directory")
    try:
        index = discover(cfg.src, layout=cfg.layout, split=cfg.split)
    except (ValueError, FileNotFoundError) as exc:
        raise EncodeError(f"cannot read SRC {cfg.src}: {exc}") from exc
    if not index.items:
        raise EncodeError(f"SRC {cfg.src} holds no images (layout {index.layout})")
    try:
        method = make_method(cfg.method, J=cfg.J, L=cfg.L, device=cfg.device, codec=cfg.codec)
    except (ValueError, FileNotFoundError) as exc:
        raise EncodeError(str(exc)) from exc
    params = job_params(cfg, method, index.fingerprint())
    resuming, lock = _check_out(cfg, params)  # the lock: released below, or when the process dies
    try:
        n_slots = len(index.items) * cfg.variants
        stored_dtype = _stored_dtype(cfg, method)
        spec = StoreSpec(format=cfg.format, n_slots=n_slots, shard_size=cfg.shard_size,
                         sample_shape=method.sample_shape(cfg.size), dtype=stored_dtype,
                         quantized=stored_dtype == "uint8" and method.output_kind == "coefficients",
                         has_hw=index.layout == "coco", compression=cfg.compression)
        n_shards = -(-n_slots // cfg.shard_size)
        writer = writer_for(cfg.out, spec)
        writer.prepare()

        done = _load_markers(cfg.out, writer, n_shards) if resuming else {}
        todo = [s for s in range(n_shards) if s not in done]
        if resuming:
            log(f"resuming: {len(done)}/{n_shards} shards complete and verified, {len(todo)} to do")
        # Torch threads per task: in-process, the caller's setting (0); local worker processes share
        # this machine's cores; on a remote cluster (--scheduler ADDRESS) the workers' own setting
        # (dask starts them with OMP_NUM_THREADS=1 per worker thread).
        local = cfg.scheduler in (None, "local")
        threads = max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers > 1 and local else 0
        run = uuid.uuid4().hex[:12]
        tasks = _make_tasks(cfg, method, index, spec, todo, threads, run)

        started, wall_started = time.perf_counter(), time.time()
        done_slots = sum(len(m["record"]["slots"]) + len(m["rejected"]) for m in done.values())
        results: dict[int, dict] = dict(done)
        sums = {"decode_cpu_s": 0.0, "encode_s": 0.0, "encode_cpu_s": 0.0, "write_s": 0.0,
                "write_cpu_s": 0.0}
        t_first, t_last = float("inf"), wall_started
        try:
            with _sigterm_as_interrupt(), _progress_bar(cfg, n_slots, done_slots) as bar:
                for result in _run_tasks(cfg, tasks, bar):
                    results[result.index] = {"record": result.record, "rejected": result.rejected,
                                             "quality": result.quality}
                    for k in sums:
                        sums[k] += result.stats.get(k, 0.0)
                    t_first = min(t_first, result.stats.get("t_start", t_first))
                    t_last = max(t_last, result.stats.get("t_end", t_last))
                    bar.set_postfix(shards=f"{len(results)}/{n_shards}")
        except KeyboardInterrupt as exc:
            how = " (SIGTERM)" if isinstance(exc, JobTerminated) else ""
            log(f"interrupted{how}: {_committed(cfg.out, n_shards)}/{n_shards} shards committed in "
                f"{cfg.out}; re-run the same command to resume")
            raise
        except OSError as exc:
            # Source files that cannot be read are rejected one by one (rejected.jsonl): what
            # reaches here failed to write (a full disk, a quota, a lost mount).
            raise EncodeError(
                f"cannot write {exc.filename or cfg.out}: {exc.strerror or exc}; "
                f"{_committed(cfg.out, n_shards)}/{n_shards} shards committed; "
                "re-run the same command to resume once fixed") from exc
        finally:
            _cancel_path(cfg.out, run).unlink(missing_ok=True)
        elapsed = time.perf_counter() - started

        manifest = _commit(cfg, index, method, spec, params, results, writer)
        manifest = read_manifest(cfg.out)
        encoded_now = sum(len(r["record"]["slots"]) for i, r in results.items() if i not in done)
        rate = encoded_now / elapsed if elapsed > 0 and encoded_now else 0.0
        if stats is not None:
            t_first = min(t_first, t_last)
            stats.update(sums, images=encoded_now, elapsed_s=elapsed,
                         ready_s=max(0.0, t_first - wall_started), steady_s=max(0.0, t_last - t_first))
        log(_summary_line(cfg, manifest, rate))
        n_rejected = manifest["rejected"]
        if n_rejected and n_rejected >= 0.1 * (n_rejected + manifest["count"]):
            # a wrong SRC (or a damaged copy of it) shows here first: say so, not only in the counts
            log(f"warning: {n_rejected} of {n_rejected + manifest['count']} source files were "
                f"rejected; their reasons are in {cfg.out / REJECTED_FILE}")
        return manifest
    finally:
        lock.close()


def _commit(cfg, index, method, spec, params, results, writer) -> dict:
    from scatstore.stores import ShardRecord

    records = [ShardRecord.from_dict(results[s]["record"]) for s in sorted(results)]
    rejected = sorted((r for s in results for r in results[s]["rejected"]), key=lambda r: r["slot"])
    _atomic_write_text(cfg.out / REJECTED_FILE,
                       "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected))
    # Source bytes of the images actually stored, for an honest "vs source files" ratio.
    accepted = {r.get("source_key") for rec in records for r in rec.meta}
    item_bytes = {}
    for item in index.items:
        if item.key in accepted:
            try:
                item_bytes[item.key] = os.path.getsize(os.path.join(index.root, item.path))
            except OSError:
                pass
    count = sum(rec.count for rec in records)
    manifest = {
        "method": {"name": method.name, "params": method.params},
        "dtype": spec.dtype,
        "sample_shape": list(spec.sample_shape) if spec.sample_shape else None,
        "count": count,
        "n_slots": spec.n_slots,
        "rejected": len(rejected),
        "class_names": list(index.class_names),
        "categories": index.categories,
        "preprocess": {
            "size": cfg.size,
            "resize": ("random-resized-crop+flip" if cfg.augment else
                       "keep-aspect canvas" if index.layout == "coco" else
                       "shorter side + centre crop"),
            "augment": cfg.augment, "seed": cfg.seed, "pixel_scale": "x/255",
        },
        "source": {
            "root": str(Path(index.root).resolve()), "layout": index.layout,
            "n_items": len(index.items), "total_bytes": int(index.total_bytes),
            "accepted_bytes": int(sum(item_bytes.values())),
            "missing_annotations": len(index.missing), "fingerprint": index.fingerprint(),
        },
        "job": {"fingerprint": _fingerprint(params), "params": params},
    }
    quality = _quality_summary([results[s].get("quality") or {} for s in sorted(results)])
    if quality:
        manifest["quality"] = quality
    writer.finalize(manifest, records)
    return manifest


def _quality_summary(per_shard: list[dict]) -> dict:
    """Means over the measured subset (see MEASURE_PER_SHARD), keys documented in docs/format.md."""
    total: dict[str, float] = {}
    for q in per_shard:
        for k, v in q.items():
            total[k] = total.get(k, 0.0) + v
    n = total.get("n", 0.0)
    if not n:
        return {}
    out = {"measured_samples": int(n), "psnr_db": total["psnr_db_sum"] / n}
    if "ms_ssim_sum" in total:
        out["ms_ssim"] = total["ms_ssim_sum"] / n
    if total.get("bits_estimated_sum"):
        out["rate_actual_over_estimate"] = total["bits_actual_sum"] / total["bits_estimated_sum"]
    return out


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _summary_line(cfg: EncodeConfig, manifest: dict, rate: float) -> str:
    from scatstore.pipelines.report import report

    r = report(cfg.out, manifest=manifest)
    speed = f", {rate:.0f} img/s" if rate else ""
    ratio = f" ({r['bytes_ratio']:.3f}× the raw pixel bytes)" if r["bytes_ratio"] else ""
    return (f"encoded {r['count']:,} samples ({r['rejected']} rejected) into {r['n_shards']} "
            f"{r['format']} shards: {_human_bytes(r['bytes_stored'])}, "
            f"{_human_bytes(r['bytes_per_sample'])}/sample{ratio}{speed} → {cfg.out}")


def config_from_kwargs(**kwargs) -> EncodeConfig:
    """Build an :class:`EncodeConfig`, turning unknown keys into a clear error."""
    names = {f.name for f in dataclasses.fields(EncodeConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise EncodeError(f"unknown encode option(s): {', '.join(unknown)}")
    return EncodeConfig(**kwargs)
