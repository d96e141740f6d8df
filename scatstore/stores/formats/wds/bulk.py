"""Bulk reader of webdataset stores (the ``scatstore.stores.bulk`` contract)."""
from __future__ import annotations

import threading

import numpy as np

from ...base import shard_name
from ...bulk import IOV_MAX, BulkReader, _preadv_all, as_dst
from ...errors import StoreError
from ...index_npy import load_index_npy, npy_bytes
from .tar import BLOCK


class WdsBulkReader(BulkReader):
    name = "wds"

    def __init__(self, ds):
        super().__init__(ds)
        ix = load_index_npy(self.root, ds.manifest)
        self.shard = ix["shard"].astype(np.int64)
        self.pos = ix["pos"].astype(np.int64)
        self.off_x = ix["off_x_npy"].astype(np.int64)
        size_x = ix["size_x_npy"].astype(np.int64)
        hdr = npy_bytes(np.zeros(self.sample_shape, dtype=self.dtype))
        self.npy_hlen = len(hdr) - self.sample_nbytes
        self.npy_hdr = np.frombuffer(hdr[: self.npy_hlen], dtype=np.uint8)
        if len(size_x) and (size_x != len(hdr)).any():
            raise StoreError(f"{self.root}: index.npy member sizes do not match sample_shape "
                                  f"{self.sample_shape} {self.dtype}")
        if self.quantized:
            self.off_q = ix["off_q_npy"].astype(np.int64)
            qh = npy_bytes(np.zeros((2, *self.spec.qparam_shape), dtype=np.float32))
            self.q_nbytes = int(np.prod(self.spec.qparam_shape)) * 8
            self.q_hlen = len(qh) - self.q_nbytes
            self.q_hdr = np.frombuffer(qh[: self.q_hlen], dtype=np.uint8)
            if (ix["size_q_npy"] != len(qh)).any():
                raise StoreError(f"{self.root}: index.npy q member sizes are inconsistent")
        # the end of each sample's last member we read (x, or q)
        self.names = np.zeros((len(self.off_x), 100), dtype=np.uint8)
        for i, k in enumerate(ds.keys):
            nm = f"{k}.x.npy".encode()
            self.names[i, : len(nm)] = np.frombuffer(nm, dtype=np.uint8)
        if len(self.off_x):
            for s in np.unique(self.shard):
                sel = self.shard == s
                if (np.diff(self.off_x[sel]) <= 0).any():
                    raise StoreError(f"{self.root}: index.npy offsets of shard {s} are not increasing")
        self._junk = threading.local()

    def _junkbuf(self, n: int) -> memoryview:
        j = getattr(self._junk, "buf", None)
        if j is None or len(j) < n:
            j = self._junk.buf = memoryview(bytearray(max(n, 1 << 16)))
        return j

    def read(self, idx, x_out, q_out) -> int:
        nbs = self.sample_nbytes
        dst = as_dst(x_out, len(idx))
        qmv = memoryview(q_out.reshape(len(idx), -1).view(np.uint8)).cast("B") \
            if q_out is not None and len(idx) else None
        hdrs = np.empty((len(idx), BLOCK), dtype=np.uint8)
        nph = np.empty((len(idx), self.npy_hlen), dtype=np.uint8)
        qh = np.empty((len(idx), self.q_hlen), dtype=np.uint8) if self.quantized else None
        hmv, nmv = memoryview(hdrs).cast("B"), memoryview(nph).cast("B")
        qhmv = memoryview(qh).cast("B") if qh is not None else None
        total = 0
        shards = self.shard[idx]
        pos = self.pos[idx]
        # runs: same shard and consecutive positions
        brk = np.flatnonzero((np.diff(shards) != 0) | (np.diff(pos) != 1)) + 1
        starts = np.concatenate([[0], brk]).astype(int).tolist() if len(idx) else []
        stops = np.concatenate([brk, [len(idx)]]).astype(int).tolist() if len(idx) else []
        per = 5 if self.quantized else 3  # iovecs per sample (+1 gap)
        for a0, b0 in zip(starts, stops):
            fd = self._fd(self.root / f"{shard_name(int(shards[a0]))}.tar")
            step = max(1, IOV_MAX // (per + 2))
            for a in range(a0, b0, step):
                b = min(b0, a + step)
                bufs = []
                start = int(self.off_x[idx[a]]) - BLOCK
                cur = start
                for k in range(a, b):
                    i = int(idx[k])
                    ox = int(self.off_x[i])
                    if ox - BLOCK > cur:
                        bufs.append(self._junkbuf(ox - BLOCK - cur)[: ox - BLOCK - cur])
                    bufs.append(hmv[k * BLOCK:(k + 1) * BLOCK])
                    bufs.append(nmv[k * self.npy_hlen:(k + 1) * self.npy_hlen])
                    bufs.append(dst[k])
                    cur = ox + self.npy_hlen + nbs
                    if self.quantized:
                        oq = int(self.off_q[i])
                        bufs.append(self._junkbuf(oq - cur)[: oq - cur])
                        bufs.append(qhmv[k * self.q_hlen:(k + 1) * self.q_hlen])
                        bufs.append(qmv[k * self.q_nbytes:(k + 1) * self.q_nbytes])
                        cur = oq + self.q_hlen + self.q_nbytes
                # junk gaps share one scratch buffer: the vector may name it several times
                total += _preadv_all(fd, bufs, start)
        if len(idx):
            self._check(idx, hdrs, nph, qh)
        return total

    def _check(self, idx, hdrs, nph, qh):
        bad = (hdrs[:, :100] != self.names[idx]).any(axis=1)
        bad |= ~np.isin(hdrs[:, 156], (ord("0"), 0))
        bad |= (nph != self.npy_hdr).any(axis=1)
        if qh is not None:
            bad |= (qh != self.q_hdr).any(axis=1)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise StoreError(
                f"{self.root}: sample {self.ds.keys[int(idx[k])]!r}: the tar member at the indexed "
                f"offset is not the expected '{self.ds.keys[int(idx[k])]}.x.npy' array (index and "
                "shard disagree: damaged or replaced shard)")
