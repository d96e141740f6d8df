"""Bulk reader of HDF5 stores (the ``scatstore.stores.bulk`` contract)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ...base import shard_name
from ...bulk import BulkReader, _LRU, _close_fd, _preadv_all, _runs, _scatter, as_dst
from ...errors import StoreError
from ...index_npy import load_index_npy


class H5BulkReader(BulkReader):
    name = "h5"

    def __init__(self, ds):
        super().__init__(ds)

        ix = load_index_npy(self.root, ds.manifest)
        self.shard = ix["shard"].astype(np.int64)
        self.pos = ix["pos"].astype(np.int64)
        self._info = _LRU(256)
        self._files = _LRU(16, lambda f: f.close())
        self._q = _LRU(8)
        import h5py  # noqa: F401  (fail early if missing)
        self._h5lock = threading.Lock()

    def unit_size(self) -> int:
        cs = self.ds.manifest["store"].get("chunk_samples") or 1
        u = super().unit_size()
        return max(u, int(cs)) if u % int(cs) == 0 else u

    def _path(self, shard: int) -> Path:
        return self.root / f"{shard_name(shard)}.h5"

    def _file(self, shard: int):
        import h5py

        if os.getpid() != self._pid:
            self._files = _LRU(16, lambda f: f.close())
            self._fds = _LRU(64, _close_fd)
            self._pid = os.getpid()
        return self._files.get(shard, lambda: h5py.File(self._path(shard), "r"))

    def _layout(self, shard: int):
        """('direct', offsets per row) for an unfiltered x, else ('library', None): read through h5py."""
        def make():
            with self._h5lock:
                d = self._file(shard)["x"]
                if d.dtype != self.dtype or tuple(d.shape[1:]) != self.sample_shape:
                    raise StoreError(f"{self._path(shard)}: x is {d.dtype}{d.shape}, manifest "
                                          f"says {self.dtype}{self.sample_shape}")
                n = d.shape[0]
                if d.compression is not None or d.shuffle or d.fletcher32 or d.scaleoffset \
                        or d.id.get_create_plist().get_nfilters() or n == 0:
                    return ("library", None)
                nbs = self.sample_nbytes
                if d.chunks is None:
                    base = d.id.get_offset()
                    if base is None:
                        return ("library", None)
                    return ("direct", base + np.arange(n, dtype=np.int64) * nbs)
                cr = d.chunks[0]
                if tuple(d.chunks[1:]) != self.sample_shape:
                    return ("library", None)
                nch = d.id.get_num_chunks()
                offs = np.full(n, -1, dtype=np.int64)
                for c in range(nch):
                    info = d.id.get_chunk_info(c)
                    r0 = info.chunk_offset[0]
                    if info.size != cr * nbs:
                        return ("library", None)
                    rows = np.arange(r0, min(r0 + cr, n))
                    offs[rows] = info.byte_offset + (rows - r0) * nbs
                if (offs < 0).any():
                    return ("library", None)
                return ("direct", offs)
        return self._info.get(shard, make)

    def _qparams(self, shard: int):
        def make():
            with self._h5lock:
                f = self._file(shard)
                return np.stack([np.asarray(f["qscale"][...], np.float32),
                                 np.asarray(f["qoffset"][...], np.float32)], axis=1)
        return self._q.get(shard, make)

    def read(self, idx, x_out, q_out) -> int:
        nbs = self.sample_nbytes
        shards, pos = self.shard[idx], self.pos[idx]
        total = 0
        dst = as_dst(x_out, len(idx))
        for s in np.unique(shards):
            s = int(s)
            sel = np.flatnonzero(shards == s)
            p = pos[sel]
            kind, offs = self._layout(s)
            if kind == "direct":
                fd = self._fd(self._path(s))
                for a, b in _runs(p):
                    # rows a..b of this shard; contiguous in the file only within a chunk:
                    # merge rows whose offsets are contiguous
                    o = offs[p[a:b]]
                    cut = np.flatnonzero(np.diff(o) != nbs) + 1
                    for ra, rb in zip(np.concatenate([[0], cut]).tolist(),
                                      np.concatenate([cut, [b - a]]).tolist()):
                        bufs = [dst[int(k)] for k in sel[a + ra:a + rb]]
                        total += _preadv_all(fd, bufs, int(o[ra]))
            else:
                with self._h5lock:
                    d = self._file(s)["x"]
                    for a, b in _runs(p):
                        blk = np.empty((b - a, *self.sample_shape), dtype=self.dtype)
                        d.read_direct(blk, np.s_[int(p[a]):int(p[b - 1]) + 1])
                        _scatter([dst[int(k)] for k in sel[a:b]], blk)
                        total += (b - a) * nbs
            if q_out is not None:
                q = self._qparams(s)
                q_out[sel] = q[p]
                total += len(sel) * q_out[0].nbytes
        return total
