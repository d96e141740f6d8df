"""Bulk readers of stored samples: many samples per system call, straight into the caller's buffer.

This module holds the contract and the machinery the formats' bulk readers share; each format's
own reader lives next to its writer (``scatstore/stores/formats/NAME/bulk.py``) and is found
through the registry (``scatstore.loaders.readers.make_reader``). A reader is built over an
opened :class:`scatstore.stores.ScatDataset` and answers

``read(idx, x_dst, q_out) -> bytes_read``
    ``idx``: sorted, unique dataset indices; ``x_dst``: one writable byte ``memoryview`` per index
    (``sample_nbytes`` long, anywhere: the loader points them at the rows of the batches the
    samples are shuffled into, so the read *is* the shuffle, with no gather copy), or an array
    ``(len(idx), *sample_shape)`` of the stored dtype; ``q_out``: ``(len(idx), 2, *qparam_shape)``
    float32 (qscale, qoffset) for quantized stores, else ``None``. Safe to call from several threads at once on disjoint
    outputs (file reads use ``pread``/``preadv``, which release the GIL and share no position).

Optional, for float16 stores: ``converts`` (True when the reader can) and
``read_f32(idx, dst_addrs, gather) -> bytes_read``: each sample lands converted to float32 at the
address ``dst_addrs[k]`` (int64; ``2 * sample_nbytes`` writable bytes the caller keeps alive),
straight from the mapped file or the decoded chunk, by ``gather(base, src_offsets, dst_addrs,
elems)`` (the loader passes its C kernel, :func:`scatstore.loaders.convert.gather_f16_to_f32`:
stores import nothing from loaders). zarr's reader has it (uncompressed and zstd chunks).

Fast paths (no per-sample Python beyond building the I/O vector, no extra copy):

- zarr, uncompressed (``compression="none"``: codecs ``bytes`` + ``crc32c``): the shard index is
  read once per shard file, then each run of consecutive samples of one inner chunk is one
  ``preadv`` into the destinations. zstd chunks are decompressed from a read-only map of the
  shard file into a per-thread scratch buffer and copied out. Other codec chains fall back to
  zarr-python.
- webdataset: the member offsets of ``index.npy`` give every byte's place, so a run of consecutive
  samples of a shard is one ``preadv`` whose vector scatters the 512-byte tar headers and ``.npy``
  headers into small check buffers, the array payloads into the destinations (and ``q_out``) and the
  rest (``.cls``, ``.json``, padding) into a junk buffer. The tar member names and ``.npy``
  headers are then compared with the expected ones in one vectorised test: names inside the tar
  file are checked, never used as paths, and nothing is unpickled.
- HDF5, unfiltered ``x``: chunk file offsets come from ``get_chunk_info`` (once per shard file),
  then ``preadv`` as above. Filtered (gzip/lzf) datasets are read through h5py (which serialises
  all calls under its global lock: slow, see docs/loading.md).
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import StoreError

log = logging.getLogger("scatstore.stores")

IOV_MAX = 1000  # os.preadv accepts at most IOV_MAX (1024 on Linux) buffers per call


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """Split positions of ``values`` into maximal runs of consecutive integers: [(start, stop)]."""
    n = len(values)
    if n == 0:
        return []
    brk = np.flatnonzero(np.diff(values) != 1) + 1
    starts = np.concatenate([[0], brk])
    stops = np.concatenate([brk, [n]])
    return list(zip(starts.tolist(), stops.tolist()))


def _preadv_all(fd: int, bufs: list, offset: int) -> int:
    """``os.preadv`` until every buffer is full (short reads resumed); returns bytes read."""
    total = sum(len(b) for b in bufs)
    done = 0
    while bufs:
        n = os.preadv(fd, bufs[:IOV_MAX], offset + done)
        if n <= 0:
            raise StoreError(f"short read at offset {offset + done} (truncated file?)")
        done += n
        # drop the filled buffers, trim a partly filled one
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs = bufs[1:]
        if n:
            bufs = [bufs[0][n:], *bufs[1:]]
    return total


class _LRU:
    """A small thread-safe LRU of per-shard objects (indices, file descriptors, qparams)."""

    def __init__(self, cap: int, close=None):
        self.cap, self.close = cap, close
        self.d: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key, make):
        with self.lock:
            v = self.d.get(key)
            if v is not None:
                self.d.move_to_end(key)
                return v
        v = make()
        with self.lock:
            old = self.d.get(key)
            if old is not None:  # another thread made it meanwhile
                if self.close:
                    self.close(v)
                return old
            self.d[key] = v
            while len(self.d) > self.cap:
                _, ov = self.d.popitem(last=False)
                if self.close:
                    self.close(ov)
        return v

    def clear(self):
        with self.lock:
            if self.close:
                for v in self.d.values():
                    self.close(v)
            self.d.clear()


def _close_fd(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def as_dst(x_dst, n: int) -> list:
    """Per-sample byte memoryviews from an array ``(n, ...)`` (or a list of them, unchanged)."""
    if isinstance(x_dst, list):
        return x_dst
    flat = np.ascontiguousarray(x_dst).reshape(n, -1).view(np.uint8) if n else None
    if n and not np.shares_memory(flat, x_dst):
        raise ValueError("x_dst must be C-contiguous")
    return [memoryview(flat[k]).cast("B") for k in range(n)]


def _scatter(dst: list, src: np.ndarray) -> None:
    """Copy rows of ``src`` (n, ...) into the per-sample destinations."""
    flat = src.reshape(len(src), -1).view(np.uint8)
    for k, d in enumerate(dst):
        d[:] = memoryview(flat[k]).cast("B")


class DamagedChunk(Exception):
    """Raised inside a reader for a chunk that fails its check; ``read`` turns it into a
    ``StoreError`` or, with ``skip_damaged``, into skipped samples."""


class BulkReader:
    """Common state: the dataset, sample geometry, per-process file descriptor cache; ``read`` of
    the base class goes through the dataset's own ``get_batch`` (any store, bitstreams too).

    Damaged data (a chunk whose crc32c does not match, an undecodable chunk) raises a
    ``StoreError`` naming the shard file; with ``skip_damaged=True`` the samples of the damaged
    chunk are zero-filled instead, their dataset indices added to ``damaged`` (for the loader to
    drop them from its batches), and one warning is logged per chunk."""

    name = "generic"
    converts = False  # no converting read (``read_f32``) unless a format's reader has one

    def __init__(self, ds, skip_damaged: bool = False):
        self.skip_damaged = bool(skip_damaged)
        self.damaged: set = set()
        self.damaged_chunks = 0
        self._dlock = threading.Lock()
        self.ds = ds
        self.spec = ds.spec
        self.root = Path(ds.root)
        self.slots = np.asarray(ds.slots, dtype=np.int64)
        self.quantized = bool(self.spec.quantized)
        self.sample_shape = tuple(self.spec.sample_shape) if self.spec.sample_shape else None
        self.dtype = np.dtype(self.spec.dtype) if self.spec.dtype != "bytes" else None
        self.sample_nbytes = self.spec.sample_nbytes
        self._pid = os.getpid()
        self._fds = _LRU(64, _close_fd)

    # units: groups of consecutive slots read together (shuffled as a whole)
    def unit_size(self) -> int:
        ss = self.spec.shard_size
        if not self.sample_nbytes:
            return ss
        for d in range(1, ss + 1):
            if ss % d == 0 and d * self.sample_nbytes >= (1 << 20):
                return d
        return ss

    def _fd(self, path: Path) -> int:
        if os.getpid() != self._pid:  # forked: never share the parent's descriptors
            self._fds = _LRU(64, _close_fd)
            self._pid = os.getpid()

        def make():
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise StoreError(f"shard file {path} is missing") from None
        return self._fds.get(str(path), make)

    def close(self):
        self._fds.clear()

    def damaged_read(self, idx, out, why: str) -> None:
        """A damaged chunk holding the dataset indices ``idx`` (its outputs ``out``): raise, or
        zero-fill and record them (``skip_damaged``)."""
        if not self.skip_damaged:
            raise StoreError(why)
        for d in out:
            d[:] = bytes(len(d))
        with self._dlock:
            new = [int(i) for i in np.asarray(idx).reshape(-1) if int(i) not in self.damaged]
            self.damaged.update(new)
            if new:
                self.damaged_chunks += 1
        if new:
            log.warning("%s: skipping its %d samples (skip_damaged)", why, len(new))

    def read(self, idx: np.ndarray, x_out, q_out) -> int:  # generic: the dataset's own reader
        b = self.ds.get_batch(idx)
        _scatter(as_dst(x_out, len(idx)), np.ascontiguousarray(b["x"]))
        if q_out is not None:
            q_out[:, 0] = b["qscale"]
            q_out[:, 1] = b["qoffset"]
        n = len(idx) * (self.sample_nbytes or 0)
        if q_out is not None:
            n += q_out.nbytes
        return n
