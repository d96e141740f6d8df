"""The streaming loader: shuffled, sharded batches of stored coefficients on a torch device.

``loader(path, batch_size, ...)`` returns a :class:`StoreLoader`. Iterating it yields ``(x, y)``:
``x`` float32 ``(B, C·K, h, w)`` (scattering, codes dequantized) or ``(B, 3, S, S)`` (raw pixels,
normalised like the JPEG baseline), ``y`` int64 ``(B,)``, both on ``device``. Calling it with an
epoch, ``loader(epoch)``, returns that epoch's iterable (the training engine's *batches factory*
contract); plain iteration runs ``loader.epoch`` and then advances it.

How an epoch is planned (a pure function of ``seed``, ``epoch``, ``rank``, ``world_size`` and the
store, computed before any data is read, so that a run can resume at any step without reading
the batches it skips; the pure functions are in :mod:`scatstore.loaders.partition`, steps 1-2
give the world-independent global order, 3-4 split it, and a checkpoint taken with another world
or batch size resumes on the rest of the epoch: ``load_state_dict``, docs/loading.md):

1. **Variants.** An augmented store (``encode --augment K``) holds K variants per source image in
   consecutive slots. Each epoch keeps one variant per source, drawn from a hash of
   ``(seed, epoch, crc32(source key))``: an epoch has ``n_images`` samples, not ``n_images·K``,
   and every rank, worker count and resume point agrees on the draw.
2. **Unit order.** Samples are grouped into *units* of consecutive slots read together (a zarr
   inner chunk; ~1 MiB runs for webdataset and HDF5). With ``shuffle`` the units are permuted
   (``rng(seed, epoch)``), otherwise kept in slot order.
3. **Ranks.** The unit-ordered sample list is cut into ``world_size`` contiguous blocks (sizes
   differ by at most one), so ranks read disjoint units, apart from at most one shared unit at
   each cut. Every rank then gets the same number of samples: ``drop_last`` trims all ranks to a
   whole number of batches of the smallest block; otherwise the shorter blocks are padded by
   wrapping around to their own first samples (at most one repeated sample per rank), and the last
   batch may be short but has the same size on every rank. Equal batch counts: no rank waits for
   another at epoch end.
4. **Buffer shuffle.** The rank's list is cut into windows of ``buffer_size`` samples (~128 MB by
   default); with ``shuffle`` each window is permuted (``rng(seed, epoch, rank, window)``). A
   window is read with bulk reads (``scatstore.loaders.readers``) into a reusable buffer, and
   batches are gathered from it with one ``index_select``.

A URL (``s3://``, ``gs://``, ``https://``) is read through a local cache of its shard objects,
fetched ahead of the plan in background threads (:mod:`scatstore.stores.cache`).

Work is done by threads, not processes: ``num_workers`` reader threads (file reads, zstd and
numpy/torch copies release the GIL) fill the next window while one assembler thread gathers,
converts and (for CUDA) stages batches in pinned memory, ``prefetch`` batches ahead. On CUDA
the stored dtype (float16, or uint8 codes with their scales) is copied with ``non_blocking=True``
and converted / dequantized on the device. On the CPU, float16 zarr samples are read *converted*
(the reader's ``read_f32``: one pass from the mapped shard file or the decoded zstd chunk into
the float32 rows of the output batch); other conversions (uint8 codes, pixels, float16 from
webdataset / HDF5) run after the read, in pieces on the assembler and ``num_workers - 1``
conversion threads, with the C kernels of :mod:`scatstore.loaders.convert` (torch without a
compiler). Output buffers are recycled (a buffer is reused only once nothing outside the loader
refers to it).

Optional augmentation, applied per batch on the device with a generator seeded by
``(seed, epoch, rank, step)``: ``flip=True`` (coefficient-space horizontal flip of half the
samples, :mod:`scatstore.transforms.flip`) and ``crop_cells=c`` (random crop of whole coefficient
cells, output ``h - c``; centred when ``shuffle`` is off).
"""
from __future__ import annotations

import ctypes
import os
import queue
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import convert as _cv
from . import partition

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BUFFER_BYTES = 128 << 20

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _seed(*parts: int) -> int:
    h = np.uint64(0x5CA7)
    for p in parts:
        h = _mix(np.uint64(h) ^ np.uint64(int(p) & 0xFFFFFFFFFFFFFFFF))
    return int(h) & 0x7FFFFFFFFFFFFFFF


def _storage_count(t: torch.Tensor) -> int | None:
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except Exception:  # noqa: BLE001 - private API: without it buffers are never recycled
        return None


class _Pool:
    """Recycles large tensors whose storage nobody else holds any more (fresh 60 MB allocations
    cost more than the copy into them: page faults)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.items: list[tuple[torch.Tensor, int | None]] = []
        self.allocated = 0
        self.lock = threading.Lock()

    def get(self, shape, dtype, pin: bool = False) -> torch.Tensor:
        shape = tuple(shape)
        with self.lock:
            for i, (t, base) in enumerate(self.items):
                if base is not None and tuple(t.shape) == shape and t.dtype == dtype \
                        and _storage_count(t) == base:
                    return t
            t = torch.empty(shape, dtype=dtype, pin_memory=pin)
            self.allocated += 1
            base = _storage_count(t)
            self.items.append((t, base))
            if len(self.items) > self.cap:
                self.items.pop(0)
            return t


def pd_unique(a: np.ndarray) -> np.ndarray:
    """The distinct values of ``a`` in order of first appearance (fetch order)."""
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)]


def _serial_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (with dtype conversion) in pieces that torch runs without its intra-op
    thread pool: the loader's threads already keep the cores busy, and OpenMP workers spinning
    beside them cost more than they bring (measured: 2-4x slower on 2 cores)."""
    _cv._torch_pieces(dst, src, lambda d, s: d.copy_(s))


@dataclass
class EpochPlan:
    """This rank's sample order for one epoch and its windows."""

    order: np.ndarray          # dataset indices, length = n_batches·B (or less, last batch short)
    windows: np.ndarray        # window start positions in ``order`` (plus the end)
    n_batches: int


class StoreLoader:
    """See the module docstring. Build it with :func:`loader`."""

    def __init__(self, path, batch_size: int, shuffle: bool = True, seed: int = 0,
                 num_workers: int | None = None, drop_last: bool | None = None,
                 device: str | torch.device = "cpu", *, dtype: torch.dtype | None = torch.float32,
                 rank: int | None = None, world_size: int | None = None, epoch: int = 0,
                 start_step: int = 0, buffer_size: int | None = None, prefetch: int = 2,
                 variants: str = "draw", flip: bool = False, flip_align: str = "interp",
                 crop_cells: int = 0, normalize_pixels: bool = True, codec=None,
                 skip_damaged: bool = False, cache_dir=None, cache_bytes: int | None = None,
                 fetch_threads: int = 8, fetch_ahead: int = 2):
        from scatstore.stores import open_dataset
        from scatstore.stores.fs import as_path

        from .readers import make_reader

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if variants not in ("draw", "all"):
            raise ValueError("variants must be 'draw' (one per image per epoch) or 'all'")
        self.path = as_path(path)  # a local Path, or a RemotePath (s3://…, https://…)
        self.dataset = open_dataset(self.path, raw=True, cache_dir=cache_dir,
                                    cache_bytes=cache_bytes, fetch_threads=fetch_threads)
        self.fetch_ahead = max(0, int(fetch_ahead))
        self.manifest = self.dataset.manifest
        self.spec = self.dataset.spec
        self.reader = make_reader(self.dataset, skip_damaged=skip_damaged)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_workers = max(1, int(num_workers if num_workers is not None else
                                      min(2, os.cpu_count() or 1)))
        self.drop_last = self.shuffle if drop_last is None else bool(drop_last)
        self.device = torch.device(device)
        self.dtype = dtype
        if rank is None or world_size is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank() if rank is None else rank
                world_size = torch.distributed.get_world_size() if world_size is None else world_size
            else:
                rank, world_size = rank or 0, world_size or 1
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} / world_size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start_step = int(epoch), int(start_step)
        self._segments: dict = {}  # epoch -> done [world_size, batch_size, steps, buffer_size]
        self.prefetch = max(1, int(prefetch))
        self.variants = variants
        self.flip, self.flip_align, self.crop_cells = bool(flip), flip_align, int(crop_cells)
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._step = self.start_step
        self.slots = np.asarray(self.dataset.slots, dtype=np.int64)
        self.labels = np.asarray(self.dataset.labels, dtype=np.int64)
        self.class_names = list(self.manifest.get("class_names") or [])
        self.num_classes = len(self.class_names)
        method = self.manifest.get("method") or {}
        self.method = method.get("name")
        self.method_params = method.get("params") or {}
        self.is_bytes = self.spec.dtype == "bytes"
        self.is_pixels = self.method == "raw" or (self.spec.dtype == "uint8" and not self.spec.quantized)
        self.normalize_pixels = normalize_pixels
        self.quant_scheme = (self.manifest.get("quantization") or {}).get("scheme", self.spec.quant_scheme)
        if self.flip and self.method not in ("scat1", "scat2"):
            raise ValueError(f"flip=True needs a scattering store (method scat1/scat2), not "
                             f"{self.method!r}")
        shape = self.spec.sample_shape
        self.sample_nbytes = self.spec.sample_nbytes or 0
        self.coef_codec = self.dataset.coef_codec  # dtype tc: decoded by _iter_tc
        if self.coef_codec is not None:
            C, K, h, w = self.coef_codec.shape
            self.out_shape = (C * K, h, w)
            # shuffle windows in stored bytes: ~128 MB of blobs, not of 4 kB placeholders
            per = self.manifest["store"].get("payload_bytes", 0) // max(1, len(self.dataset))
            self.sample_nbytes = max(int(per), 1)
        elif self.is_bytes:
            self._codec = codec
            self._init_codec()
            self.out_shape = tuple(self._codec.latent_shape(
                int((self.manifest.get("preprocess") or {}).get("size", 224))))
        else:
            self.out_shape = (int(np.prod(shape[:-2])), *shape[-2:]) if len(shape) >= 3 else tuple(shape)
        self.in_channels = self.out_shape[0]
        self.input_size = self.out_shape[-1] - self.crop_cells
        if buffer_size is None:
            per = max(self.sample_nbytes, 4096)
            buffer_size = max(self.batch_size, DEFAULT_BUFFER_BYTES // per)
        self.buffer_size = max(1, int(buffer_size))
        self.unit_size = self.reader.unit_size()
        self._init_variants()
        self._win_pool: list = []
        # buffers alive at once: two windows of batches, the queue, the consumer's batch
        cap = 2 * max(1, self.buffer_size // self.batch_size) + self.prefetch + 4
        self._out_pool = _Pool(cap)
        self._pin_pool = _Pool(cap)

    # ------------------------------------------------------------------ setup
    def _init_codec(self):
        if self.method != "cae":
            raise ValueError(f"bitstream store with method {self.method!r}: no decoder known")
        if self._codec is None:
            from scatstore.codecs import load_codec

            p = self.method_params.get("codec_path")
            if not p or not Path(p).exists():
                raise FileNotFoundError(
                    f"{self.path}: the codec recorded in the manifest ({p!r}) is not there; pass "
                    "codec=load_codec(PATH) to the loader")
            self._codec = load_codec(p)
        check = getattr(self._codec, "check_compatible", None)
        if check is not None:
            check(self.manifest)

    def _init_variants(self):
        pre = self.manifest.get("preprocess") or {}
        K = max(1, int(pre.get("augment") or 0))
        self.n_variants = K
        self._groups = None
        if K <= 1 or self.variants == "all" or len(self.slots) == 0:
            return
        src = self.slots // K
        starts = np.flatnonzero(np.concatenate([[True], np.diff(src) != 0]))
        crc = np.empty(len(starts), dtype=np.uint64)
        keys = self.dataset.keys
        for g, s in enumerate(starts.tolist()):
            k = keys[s]
            suffix = f"_a{int(self.slots[s]) % K}"
            sk = k[: -len(suffix)] if k.endswith(suffix) else f"#{int(src[s])}"
            crc[g] = zlib.crc32(sk.encode("utf-8"))
        counts = np.diff(np.concatenate([starts, [len(src)]]))
        self._groups = (starts, counts, crc)

    # ------------------------------------------------------------------ planning
    def selected(self, epoch: int) -> np.ndarray:
        """Sorted dataset indices used in ``epoch`` (one variant per source image when augmented)."""
        n = len(self.slots)
        if self._groups is None:
            return np.arange(n, dtype=np.int64)
        starts, counts, crc = self._groups
        h = _mix(_mix(np.uint64(_seed(self.seed, epoch)) ^ crc))
        pick = (h % counts.astype(np.uint64)).astype(np.int64)
        return starts.astype(np.int64) + pick

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's plan of ``epoch`` (:mod:`scatstore.loaders.partition`); for the epoch of
        a checkpoint taken with another world size or batch size, the plan of its remainder."""
        sel = self.selected(epoch)
        order = partition.global_order(sel, self.slots, self.unit_size, self.seed, epoch,
                                       self.shuffle)
        segments = self._segments.get(int(epoch), [])
        if segments:
            order = partition.remaining(order, segments, self.drop_last, self.seed, epoch,
                                        self.shuffle)
        p = partition.rank_plan(order, self.rank, self.world_size, self.batch_size,
                                self.drop_last, self.buffer_size, self.seed, epoch, self.shuffle,
                                segment=len(segments))
        return EpochPlan(order=p.order, windows=p.windows, n_batches=p.n_batches)

    # ------------------------------------------------------------------ public API
    def __call__(self, epoch: int, start_step: int = 0) -> "LoaderEpoch":
        return LoaderEpoch(self, int(epoch), int(start_step))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ep = LoaderEpoch(self, self.epoch, self.start_step, track=True)
        yield from ep
        self.epoch += 1
        self.start_step = 0
        self._step = 0

    def __len__(self) -> int:
        return self.plan(self.epoch).n_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_step, self._step = int(epoch), 0, 0

    def state_dict(self) -> dict:
        """Where plain iteration stands: resume with :meth:`load_state_dict` (the next epoch /
        step is produced without reading the batches before it). ``segments``: the earlier
        parts of this epoch run with other world or batch sizes (the resume rule,
        :mod:`scatstore.loaders.partition`)."""
        return {"epoch": self.epoch, "step": self._step, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "buffer_size": self.buffer_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last,
                "segments": [list(s) for s in self._segments.get(self.epoch, [])]}

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` stands. The same world size, batch size and buffer: at its
        step. Others (more or fewer ranks, another batch size): the samples consumed so far in
        that epoch are left out and the rest of the epoch is re-split over this loader's ranks
        (no sample seen twice or skipped). Seed and shuffle must match."""
        for k in ("seed", "shuffle", "drop_last"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"state_dict has {k}={state[k]}, the loader {getattr(self, k)}")
        epoch, step = int(state["epoch"]), int(state["step"])
        segments = partition.check_segments(state.get("segments"))
        here = [int(state.get("world_size", self.world_size)),
                int(state.get("batch_size", self.batch_size)),
                step, int(state.get("buffer_size", self.buffer_size))]
        if here[0] != self.world_size or here[1] != self.batch_size or here[3] != self.buffer_size:
            if step:
                segments.append(here)
            step = 0
        self._segments = {epoch: segments} if segments else {}
        self.epoch, self.start_step = epoch, step
        self._step = self.start_step

    def _add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_read += int(n)

    def close(self) -> None:
        self.reader.close()
        self.dataset.close()

    def __repr__(self) -> str:
        return (f"StoreLoader({str(self.path)!r}, n={len(self.slots)}, batch_size={self.batch_size}, "
                f"format={self.spec.format}, dtype={self.spec.dtype}, rank={self.rank}/"
                f"{self.world_size}, shuffle={self.shuffle})")

    # ------------------------------------------------------------------ batch finishing
    def _convert(self, x: torch.Tensor, q: torch.Tensor | None, out: torch.Tensor | None):
        """Stored-dtype batch (CPU, or already on the device) -> model values. On the CPU with an
        output buffer, the conversion kernels of :mod:`scatstore.loaders.convert` write into
        ``out``; on a GPU (``out`` None) torch converts on the device."""
        cpu_f32 = out is not None and out.dtype == torch.float32 and x.device.type == "cpu"
        if self.spec.quantized:
            from scatstore.transforms.quantize import dequantize_uint8

            qs, qo = q[:, 0], q[:, 1]
            if cpu_f32:
                _cv.dequantize_into(x, out.view(x.shape), qs, qo, self.quant_scheme)
                return out
            xf = dequantize_uint8(x, qs, qo, scheme=self.quant_scheme)
            if self.dtype is not None and self.dtype != torch.float32:
                xf = xf.to(self.dtype)
            if out is not None:
                _serial_copy(out, xf)
                return out
            return xf
        if self.is_pixels:
            norm = self.normalize_pixels and x.shape[1] == 3
            if cpu_f32 and x.dtype == torch.uint8:
                _cv.normalize_pixels_into(x, out.view(x.shape), IMAGENET_MEAN if norm else None,
                                          IMAGENET_STD if norm else None)
                return out
            xf = out if out is not None else torch.empty(x.shape, dtype=self.dtype or torch.float32,
                                                         device=x.device)
            xf = xf.view(x.shape)
            xf.copy_(x)
            xf.mul_(1.0 / 255.0)
            if norm:
                mean = torch.tensor(IMAGENET_MEAN, dtype=xf.dtype, device=xf.device).view(1, 3, 1, 1)
                std = torch.tensor(IMAGENET_STD, dtype=xf.dtype, device=xf.device).view(1, 3, 1, 1)
                xf.sub_(mean).div_(std)
            return xf
        want = self.dtype or x.dtype
        if x.dtype == want:
            return x
        if out is None:
            return x.to(want)
        if cpu_f32 and x.dtype == torch.float16:
            _cv.f16_to_f32(x.contiguous(), out.view(x.shape))
        else:
            _serial_copy(out, x)
        return out

    def _convert_split(self, x: torch.Tensor, q: torch.Tensor | None, out: torch.Tensor,
                       pool: ThreadPoolExecutor | None) -> torch.Tensor:
        """:meth:`_convert` of a CPU batch in pieces of whole samples: one piece on this
        thread, the others on ``pool`` (the kernels release the GIL)."""
        n = int(x.shape[0])
        k = 1 if pool is None else min(n, pool._max_workers + 1)
        if k <= 1:
            return self._convert(x, q, out)
        o = out.view(n, -1)
        cuts = np.linspace(0, n, k + 1).astype(int).tolist()
        futs = [pool.submit(self._convert, x[c0:c1], q[c0:c1] if q is not None else None, o[c0:c1])
                for c0, c1 in zip(cuts[1:-1], cuts[2:])]
        self._convert(x[:cuts[1]], q[:cuts[1]] if q is not None else None, o[:cuts[1]])
        for f in futs:
            f.result()
        return out

    def _finish(self, x: torch.Tensor, q: torch.Tensor | None, y: torch.Tensor, epoch: int,
                step: int, out: torch.Tensor | None, converted: bool = False):
        """Stored-dtype batch (on CPU, or already on the device) -> model input on the device
        (``converted``: ``x`` holds model values already)."""
        B = x.shape[0]
        xf = x if converted else self._convert(x, q, out)
        xf = xf.reshape(B, *self.out_shape)
        if self.flip or self.crop_cells:
            g = torch.Generator().manual_seed(_seed(self.seed, epoch, self.rank, step, 0xF11B))
            if self.flip:
                from scatstore.transforms.flip import random_flip

                p = self.method_params
                xf = random_flip(xf, int(p.get("J", 3)), int(p.get("L", 8)), int(p.get("max_order", 1)),
                                 generator=g, align=self.flip_align,
                                 size=(self.manifest.get("preprocess") or {}).get("size"))
            if self.crop_cells:
                from scatstore.transforms.flip import crop_cells

                xf = crop_cells(xf, self.crop_cells, generator=g, random=self.shuffle)
        return xf, y


class LoaderEpoch:
    """One epoch of one rank: iterable of ``(x, y)`` with ``len`` and ``bytes_read``."""

    def __init__(self, owner: StoreLoader, epoch: int, start_step: int = 0, track: bool = False):
        self.owner, self.epoch, self.start_step, self.track = owner, epoch, start_step, track
        self.plan = owner.plan(epoch)
        if not 0 <= start_step <= self.plan.n_batches:
            raise ValueError(f"start_step {start_step} outside 0..{self.plan.n_batches}")

    def __len__(self) -> int:
        return self.plan.n_batches - self.start_step

    @property
    def bytes_read(self) -> int:
        return self.owner.bytes_read

    def batch_indices(self, step: int) -> np.ndarray:
        """Dataset indices of batch ``step`` (no reading)."""
        B = self.owner.batch_size
        return self.plan.order[step * B:(step + 1) * B]

    def __iter__(self):
        o = self.owner
        if len(self) <= 0:
            return
        if o.coef_codec is not None:
            yield from self._iter_tc()
            return
        if o.is_bytes:
            yield from self._iter_bytes()
            return
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=o.prefetch)
        th = threading.Thread(target=self._assemble, args=(q, stop), daemon=True,
                              name="scatstore-assembler")
        th.start()
        cuda = o.device.type == "cuda"
        try:
            step = self.start_step
            while True:
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item[0] == "stage":
                    _, x, qp, y, ev, st = item
                    x = x.to(o.device, non_blocking=True)
                    qp = qp.to(o.device, non_blocking=True) if qp is not None else None
                    y = y.to(o.device, non_blocking=True)
                    ev.record()
                    del item
                    xf, yy = o._finish(x, qp, y, self.epoch, st, None)
                else:
                    _, xf, yy, st = item
                    del item
                step += 1
                if o.reader.damaged:  # skip_damaged: drop the samples of damaged chunks
                    xf, yy = self._drop_damaged(xf, yy, st)
                    if not len(yy):
                        continue
                if self.track:
                    o._step = step
                yield xf, yy
        finally:
            stop.set()
            while th.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                th.join(timeout=0.05)

    def _drop_damaged(self, xf, yy, st: int):
        rows = self.plan.order[st * self.owner.batch_size: st * self.owner.batch_size + len(yy)]
        keep = ~np.isin(rows, np.fromiter(self.owner.reader.damaged, dtype=np.int64))
        if keep.all():
            return xf, yy
        k = torch.from_numpy(keep).to(yy.device)
        return xf[k], yy[k]

    # ------------------------------------------------------------------ assembler thread
    def _assemble(self, q: queue.Queue, stop: threading.Event):
        o = self.owner
        try:
            self._assemble_inner(q, stop)
            q.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            if not stop.is_set():
                q.put(e)

    def _assemble_inner(self, q: queue.Queue, stop: threading.Event):
        """Windows are read straight into the batches' buffers (the reads scatter each sample to
        its shuffled row), then the batches are finished in order."""
        o = self.owner
        plan, B = self.plan, o.batch_size
        order, wins = plan.order, plan.windows
        T = len(order)
        p0 = self.start_step * B
        first_w = int(np.searchsorted(wins, p0, side="right") - 1)
        n_w = len(wins) - 1
        cuda = o.device.type == "cuda"
        pin = cuda and torch.cuda.is_available()
        xdt = {"float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}[o.spec.dtype]
        shape = tuple(o.spec.sample_shape)
        direct = not cuda and not (o.spec.quantized or o.is_pixels) and xdt == self._out_dtype()
        # converting read: float16 samples land as float32 in the output rows, one pass from the
        # mapped file / decoded chunk (readers that can: ``converts``; vector kernel built)
        fused = (not cuda and not direct and xdt == torch.float16
                 and self._out_dtype() == torch.float32 and getattr(o.reader, "converts", False)
                 and _cv.can_gather())
        # float16 kept: the same read through the map with a plain copy (page-cache pages
        # touched through the map instead of preadv into the rows: several times faster per
        # thread on the AVX2 machine of issue 11)
        mapped_copy = (direct and xdt == torch.float16 and getattr(o.reader, "converts", False)
                       and _cv.can_copy())
        gather = _cv.gather_f16_to_f32 if fused else _cv.gather_f16_copy
        row_nbytes = o.sample_nbytes * (2 if fused else 1)  # one output row (mapped reads)
        pool = ThreadPoolExecutor(max_workers=o.num_workers, thread_name_prefix="scatstore-read")
        # conversion helpers beside the assembler (which converts one piece itself); separate
        # from the readers, whose queue holds the next window's reads
        conv = ThreadPoolExecutor(max_workers=o.num_workers - 1, thread_name_prefix="scatstore-conv") \
            if o.num_workers > 1 and not (direct or fused or cuda) else None
        loaded: dict = {}
        cache = o.dataset.cache
        shard_of = o.dataset._shard_of

        def fetching(w, u):
            """The submit function of window ``w``'s reads (dataset indices ``u``; it returns a
            future): local stores read at once; a remote one first has the shards of each piece
            in its cache, while the shards of later windows are fetched in the background (all
            of the epoch's with an unlimited cache, else ``fetch_ahead`` windows), in the order
            they are needed."""
            if cache is None:
                return pool.submit
            mine = np.unique(shard_of[u])
            last = n_w if cache.cache_bytes is None else min(n_w, w + 1 + o.fetch_ahead)
            later = [np.unique(shard_of[order[int(wins[v]):int(wins[v + 1])]])
                     for v in range(w + 1, last)]
            ahead = pd_unique(np.concatenate(later)) if later else np.zeros(0, np.int64)
            cache.prefetch(mine.tolist())
            cache.prefetch(ahead.tolist())
            protect = set(mine.tolist()) | set(ahead.tolist())

            def run(fn, uu, *a):
                cache.ensure(np.unique(shard_of[uu]).tolist(), protect=protect)
                return fn(uu, *a)

            def piece(fn, uu, *a):
                """The read of ``uu`` handed to the readers once its shards are cached: the
                readers take pieces (of this window and the next) in the order their shards
                arrive instead of waiting in turn for each."""
                out: Future = Future()

                def done(f):
                    if f.exception() is not None:
                        out.set_exception(f.exception())
                    else:
                        out.set_result(f.result())

                def go(err):
                    if err is not None:
                        out.set_exception(err)
                        return
                    try:
                        pool.submit(run, fn, uu, *a).add_done_callback(done)
                    except RuntimeError as e:  # the readers are shut down: the epoch ended
                        out.set_exception(e)
                cache.on_ready(np.unique(shard_of[uu]).tolist(), go)
                return out
            return piece

        def submit(w):
            a, b = max(int(wins[w]), p0), int(wins[w + 1])
            seg = order[a:b]
            u, first, inv = np.unique(seg, return_index=True, return_inverse=True)
            batches = []  # (step, x staging/out tensor, rows)
            mapped = fused or mapped_copy
            # per-sample destinations: row addresses (mapped reads: no per-sample Python) or
            # byte memoryviews (the readers' plain ``read``)
            addr = np.empty(len(seg), dtype=np.int64) if mapped else None
            dst = None if mapped else [None] * len(seg)
            for st in range(a // B, -(-b // B)):
                ba, bb = st * B, min((st + 1) * B, T)
                n = bb - ba
                if direct:
                    xt = self._out_buffer(n).view(n, *shape)
                elif fused:
                    xt = self._out_buffer(n).view(n, -1)
                else:
                    xt = o._pin_pool.get((n, *shape), xdt, pin=pin)
                    ev = getattr(xt, "_scatstore_event", None)
                    if ev is not None:
                        ev.synchronize()  # the last copy out of this pinned buffer is done
                if mapped:
                    row = xt[0].numel() * xt.element_size() if n else 0
                    addr[ba - a: ba - a + n] = xt.data_ptr() + np.arange(n, dtype=np.int64) * row
                else:
                    flat = xt.numpy().reshape(n, -1).view(np.uint8)
                    for r in range(n):
                        dst[ba - a + r] = memoryview(flat[r]).cast("B")
                batches.append((st, xt, ba - a, n))
            qb = np.empty((len(u), 2, *o.spec.qparam_shape), dtype=np.float32) \
                if o.spec.quantized else None
            nu = len(u)
            n_pieces = max(1, min(2 * o.num_workers, nu // max(1, o.unit_size)))
            cuts = np.linspace(0, nu, n_pieces + 1).astype(int)
            if cache is not None:  # remote: pieces within one shard, read as each one arrives
                cuts = np.union1d(cuts, np.flatnonzero(np.diff(shard_of[u])) + 1)
            run = fetching(w, u)
            if mapped:
                uaddr = addr[first]
                futs = [run(o.reader.read_f32, u[c0:c1], uaddr[c0:c1], gather)
                        for c0, c1 in zip(cuts[:-1], cuts[1:]) if c1 > c0]
            else:
                udst = [dst[i] for i in first.tolist()]
                futs = [run(o.reader.read, u[c0:c1], udst[c0:c1],
                                    qb[c0:c1] if qb is not None else None)
                        for c0, c1 in zip(cuts[:-1], cuts[1:]) if c1 > c0]
            dup = np.setdiff1d(np.arange(len(seg)), first) if len(first) < len(seg) else None
            loaded[w] = dict(a=a, inv=inv, first=first, dst=dst, addr=addr, dup=dup, qb=qb,
                             futs=futs, batches=batches)

        def wait(w):
            d = loaded.pop(w)
            for f in d["futs"]:
                o._add_bytes(f.result())
            if d["dup"] is not None:  # wrap-around padding: a sample twice in one window
                for i in d["dup"].tolist():
                    j = int(d["first"][d["inv"][i]])
                    if d["addr"] is not None:
                        ctypes.memmove(int(d["addr"][i]), int(d["addr"][j]), row_nbytes)
                    else:
                        d["dst"][i][:] = d["dst"][j]
            return d

        try:
            if first_w < n_w:
                submit(first_w)
            for w in range(first_w, n_w):
                if w + 1 < n_w:
                    submit(w + 1)  # read ahead while this window's batches are finished
                d = wait(w)
                for st, xt, off, n in d["batches"]:
                    if stop.is_set():
                        return
                    a = st * B
                    y = torch.from_numpy(o.labels[order[a:a + n]])
                    qs = None
                    if d["qb"] is not None:
                        qs = o._pin_pool.get((n, 2, *o.spec.qparam_shape), torch.float32, pin=pin)
                        np.take(d["qb"], d["inv"][off:off + n], axis=0, out=qs.numpy())
                    if cuda:
                        ev = getattr(xt, "_scatstore_event", None)
                        if ev is None:
                            ev = xt._scatstore_event = torch.cuda.Event()
                        q.put(("stage", xt, qs, y, ev, st))
                        continue
                    # CPU: finish here, off the consumer's thread, into a recycled output buffer
                    if direct or fused:
                        xf, yy = o._finish(xt, None, y, self.epoch, st, None, converted=fused)
                    else:
                        out = o._convert_split(xt, qs, self._out_buffer(n), conv)
                        xf, yy = o._finish(out, None, y, self.epoch, st, None, converted=True)
                        del out
                    del xt, qs
                    q.put(("done", xf, yy, st))
                del d
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if conv is not None:
                conv.shutdown(wait=True, cancel_futures=True)

    def _out_dtype(self):
        o = self.owner
        if o.spec.quantized or o.is_pixels:
            return None  # always converted
        return o.dtype or {"float16": torch.float16, "float32": torch.float32}[o.spec.dtype]

    def _out_buffer(self, n: int):
        o = self.owner
        dt = o.dtype or (torch.float32 if (o.spec.quantized or o.is_pixels) else
                         {"float16": torch.float16, "float32": torch.float32}[o.spec.dtype])
        return o._out_pool.get((n, *o.out_shape), dt)

    # ------------------------------------------------------------------ transform-coded
    def _iter_tc(self):
        """``dtype tc`` stores: each window's blobs are read in slot order (one read per shard
        span) on a reader thread, the next window while this one is decoded; every batch is
        decoded by the codec on ``num_workers`` threads (blosc and the reconstruction kernel
        run without the GIL), one batch ahead on a helper thread.
        On CUDA only the entropy stage runs on the CPU: the int8 codes go to the device and
        are reconstructed there.
        Damage (a chunk failing its crc32c, a blob failing the codec's checks) is found per
        sample (:meth:`_tc_damage`): with ``skip_damaged`` a damaged sample decodes as zeros,
        is recorded in ``loader.reader.damaged`` and left out of its batch after ``_finish``
        (as on the other paths), so the healthy samples are those of an intact store."""
        from scatstore.stores.errors import DamagedDataError, StoreError
        from scatstore.transforms.coefcodec import CorruptCoefficientsError

        o = self.owner
        codec, B, plan = o.coef_codec, o.batch_size, self.plan
        order, wins = plan.order, plan.windows
        T = len(order)
        cuda = o.device.type == "cuda"
        want = o.dtype or torch.float32
        out_dt = "float16" if want == torch.float16 else "float32"

        def window_blobs(w):
            a, b = int(wins[w]), int(wins[w + 1])
            self._prefetch_from(a)  # remote: this window's shards and the next ones
            u, inv = np.unique(order[a:b], return_inverse=True)
            try:
                blobs = o.dataset.get_batch(u)["x"]
            except DamagedDataError:
                blobs = self._tc_read_damaged(u)
            o._add_bytes(sum(len(x) for x in blobs if x is not None))
            return a, [blobs[i] for i in inv.tolist()]

        def decode(blobs):
            if cuda:
                q = codec.decode_codes(blobs, threads=o.num_workers)
                return codec.reconstruct(q, dtype=out_dt, device=o.device)
            # into a recycled batch buffer (no page faults of a fresh 60 MB output)
            x = o._out_pool.get((len(blobs), *o.out_shape), getattr(torch, out_dt))
            codec.decode(blobs, dtype=out_dt, threads=o.num_workers, out=x.numpy())
            return x.reshape(len(blobs), *codec.shape)

        def batch(step, a, blobs):
            lo, hi = step * B - a, min((step + 1) * B, T) - a
            mine = blobs[lo:hi]
            ok = [b is not None for b in mine]
            x = err = None
            if all(ok):
                try:
                    x = decode(mine)
                except CorruptCoefficientsError as e:
                    err = e  # which samples: below
            if x is None:
                bad = codec.check([b if b is not None else b"" for b in mine])
                if not bad:  # the codec refused a blob that its checks pass
                    raise StoreError(f"{o.path}: {err}")
                rows = order[step * B:step * B + len(mine)]
                self._tc_damage([(int(rows[r]), why) for r, why in sorted(bad.items()) if ok[r]],
                                blobs=True)
                good = [r for r in range(len(mine)) if r not in bad]
                x = torch.zeros((len(mine), *codec.shape), device=o.device,
                                dtype=torch.float16 if out_dt == "float16" else torch.float32)
                if good:
                    x[torch.as_tensor(good, device=o.device)] = decode([mine[r] for r in good])
            if x.dtype != want:
                x = x.to(want)
            return x.reshape(hi - lo, *o.out_shape)

        n_w = len(wins) - 1
        with ThreadPoolExecutor(1, thread_name_prefix="scatstore-tc-read") as rd, \
                ThreadPoolExecutor(1, thread_name_prefix="scatstore-tc") as ex:
            reads: dict = {}

            def window(w):  # this window's blobs; the next one is read meanwhile
                for k in [k for k in reads if k < w]:
                    del reads[k]
                for k in (w, w + 1):
                    if k < n_w and k not in reads:
                        reads[k] = rd.submit(window_blobs, k)
                return reads[w].result()

            pending = None
            for step in range(self.start_step, plan.n_batches):
                a, blobs = window(int(np.searchsorted(wins, step * B, side="right") - 1))
                fut = ex.submit(batch, step, a, blobs)
                if pending is not None and (out := self._tc_finish(*pending)) is not None:
                    yield out
                pending = (step, fut)
            if pending is not None and (out := self._tc_finish(*pending)) is not None:
                yield out

    def _tc_finish(self, step, fut):
        """Batch ``step`` of :meth:`_iter_tc`, finished; ``None`` when all its samples are
        damaged (``skip_damaged``)."""
        o = self.owner
        x = fut.result()
        idx = self.batch_indices(step)
        y = torch.from_numpy(o.labels[idx]).to(o.device)
        xf, yy = o._finish(x, None, y, self.epoch, step, None, converted=True)
        if self.track:
            o._step = step + 1
        if o.reader.damaged:
            xf, yy = self._drop_damaged(xf, yy, step)
            if not len(yy):
                return None
        return xf, yy

    def _tc_read_damaged(self, u: np.ndarray) -> list:
        """The blobs of dataset indices ``u`` when a read of them met damaged bytes: shard by
        shard, and sample by sample in a shard that fails, so that exactly the samples whose
        bytes are damaged are found (``None`` in their place; :meth:`_tc_damage`)."""
        from scatstore.stores.errors import DamagedDataError

        ds = self.owner.dataset
        blobs: list = [None] * len(u)
        damaged = []
        sh = ds._shard_of[u]
        for s in np.unique(sh).tolist():
            pos = np.flatnonzero(sh == s)
            try:
                got = ds.get_batch(u[pos])["x"]
            except DamagedDataError:
                got = []
                for p in pos.tolist():
                    try:
                        got.append(ds.get_batch(u[p:p + 1])["x"][0])
                    except DamagedDataError as e:
                        got.append(None)
                        damaged.append((int(u[p]), str(e)))
            for p, b in zip(pos.tolist(), got):
                blobs[p] = b
        self._tc_damage(damaged)
        return blobs

    def _tc_damage(self, items: list, blobs: bool = False) -> None:
        """Damaged samples ``[(dataset index, reason)]`` of a tc store (``blobs``: reasons of
        the codec's blob checks, else of damaged stored bytes, which name their file): without
        ``skip_damaged`` a one-line ``StoreError`` naming the store, the (first) sample and its
        shard; with it, recorded in ``loader.reader.damaged`` with one warning per damaged
        chunk (the samples that share a reason) or blob."""
        from scatstore.stores.errors import StoreError

        if not items:
            return
        o = self.owner
        ds = o.dataset

        def where(i):
            return (f"{o.path}: sample {ds.keys[i]!r} (index {i}) of shard "
                    f"{int(ds._shard_of[i]):06d}")
        if not o.reader.skip_damaged:
            i, why = items[0]
            raise StoreError(f"{where(i)} is damaged: {why}")
        by_reason: dict = {}
        for i, why in items:
            if blobs:  # a blob's own check: one line per sample
                why = f"{where(i)}: {why}"
            by_reason.setdefault(why, []).append(i)
        for why, idx in by_reason.items():
            o.reader.damaged_read(idx, [], why)

    def _prefetch_from(self, pos: int) -> None:
        """A remote store: fetch in the background the shards of this rank's samples from
        position ``pos`` on, in the order they are needed: all of them with an unlimited cache,
        else the next ``fetch_ahead`` buffers' worth."""
        o = self.owner
        cache = o.dataset.cache
        if cache is None:
            return
        end = None if cache.cache_bytes is None else pos + max(1, o.fetch_ahead) * o.buffer_size
        cache.prefetch(pd_unique(o.dataset._shard_of[self.plan.order[pos:end]]).tolist())

    # ------------------------------------------------------------------ bitstreams
    def _iter_bytes(self):
        o = self.owner
        codec = o._codec
        for step in range(self.start_step, self.plan.n_batches):
            idx = self.batch_indices(step)
            self._prefetch_from((step + 1) * o.batch_size)
            b = o.dataset.get_batch(idx)
            blobs = b["x"]
            o._add_bytes(sum(len(x) for x in blobs))
            sym = codec.decode_symbols(blobs)
            x = codec.dequantize(sym, device=o.device)
            if o.dtype is not None and x.dtype != o.dtype:
                x = x.to(o.dtype)
            y = torch.from_numpy(o.labels[idx]).to(o.device)
            if self.track:
                o._step = step + 1
            yield x, y


def loader(path, batch_size: int, shuffle: bool = True, seed: int = 0,
           num_workers: int | None = None, drop_last: bool | None = None,
           device: str | torch.device = "cpu", **kw) -> StoreLoader:
    """A streaming loader over the store at ``path`` (see :mod:`scatstore.loaders.stream`).

    ``num_workers``: reader threads (default ``min(2, cpus)``). ``drop_last``: default ``shuffle``.
    Keyword options: ``dtype`` (output dtype, default float32; ``None`` keeps float16 as stored),
    ``rank``/``world_size`` (default: from ``torch.distributed`` when initialised), ``epoch``,
    ``start_step`` (resume), ``buffer_size`` (samples per shuffle window), ``prefetch`` (batches),
    ``variants`` (``"draw"``: one augment variant per image per epoch; ``"all"``), ``flip``,
    ``flip_align``, ``crop_cells``, ``normalize_pixels``, ``codec`` (a loaded codec for ``cae``
    stores), ``skip_damaged`` (a chunk failing its crc32c check is counted, logged and its
    samples left out of their batches, instead of raising ``StoreError``; the count is
    ``loader.reader.damaged``). A URL (``s3://…``, ``https://…``) is streamed through a local
    cache: ``cache_dir`` (default ``$SCATSTORE_CACHE_DIR`` or ``~/.cache/scatstore``),
    ``cache_bytes`` (size limit of cached shard files; default none), ``fetch_threads``
    (concurrent downloads, 8), ``fetch_ahead`` (windows whose shards are fetched ahead, 2).
    """
    return StoreLoader(path, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers,
                       drop_last=drop_last, device=device, **kw)
