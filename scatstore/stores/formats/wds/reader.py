"""Map-style reader of webdataset stores: one ``pread`` per member at the offsets of ``index.npy``,
its tar header checked first."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from ...base import shard_name
from ...dataset import ScatDataset
from ...errors import StoreError
from ...index_npy import member_field, load_index_npy
from .tar import iter_tar_samples, load_npy, member_exts, read_member, read_member_at


class WdsDataset(ScatDataset):
    range_reads = True  # a remote sample is one ranged GET of its members (index.npy offsets)

    def _load_index(self):
        self._index_arr = load_index_npy(self.root, self.manifest)
        ix = self._index_arr
        self.slots = ix["slot"].astype(np.int64)
        self.labels = ix["y"].astype(np.int64)
        self.keys = [k.decode("ascii") for k in ix["key"]]
        self._exts = member_exts(self.spec)

    def _fd(self, shard: int) -> int:
        h = self._handles()
        fds = h.setdefault("fds", _FdCache())
        return fds.get(self.root / f"{shard_name(shard)}.tar")

    def _member(self, i: int, ext: str) -> bytes:
        row = self._index_arr[i]
        f = member_field(ext)
        shard, off, size = int(row["shard"]), int(row[f"off_{f}"]), int(row[f"size_{f}"])
        if self.cache is not None and not self.cache.has_shard(shard):
            # a remote shard not in the cache: one ranged GET of the member and its header
            rel = f"{shard_name(shard)}.tar"
            n = self.cache.shard_files.get(shard, {}).get(rel, 0)
            return read_member_at(lambda a, k: self.cache.read_range(rel, a, a + k), n, off, size,
                                  f"{self.keys[i]}.{ext}")
        return read_member(self._fd(shard), off, size, f"{self.keys[i]}.{ext}")

    def _read(self, idx: np.ndarray):
        spec = self.spec
        xs, qs, qo, hws = [], [], [], []
        for i in idx:
            i = int(i)
            if spec.dtype == "bytes":
                xs.append(self._member(i, "bits"))
            else:
                a = load_npy(self._member(i, "x.npy"))
                if a.shape != spec.sample_shape or a.dtype != np.dtype(spec.dtype):
                    raise StoreError(f"sample {self.keys[i]}: stored {a.dtype}{a.shape}, manifest says "
                                     f"{spec.dtype}{spec.sample_shape}")
                xs.append(a)
            if spec.quantized:
                q = load_npy(self._member(i, "q.npy"))
                qs.append(q[0])
                qo.append(q[1])
            if spec.has_hw:
                hws.append(json.loads(self._member(i, "json")).get("hw"))
        return self._stack(xs, qs, qo, hws)

    def _meta(self, i: int) -> dict:
        d = json.loads(self._member(i, "json"))
        if d.get("key") != self.keys[i]:
            raise StoreError(f"json member of {self.keys[i]!r} names key {d.get('key')!r}")
        return d.get("meta", {})

    def iter_shard(self, shard: int):
        """Stream one shard tar sequentially (checked member names, no pickle)."""
        spec = self.spec
        for s in iter_tar_samples(self.root / f"{shard_name(shard)}.tar", spec):
            j = s["json"]
            meta = dict(j.get("meta", {}))
            meta["key"], meta["slot"] = s["__key__"], j["slot"]
            if "hw" in j:
                meta["hw"] = j["hw"]
            if spec.dtype == "bytes":
                x = s["bits"]
                if self.coef_codec is not None and not self.raw:  # tc: decoded, as ds[i] is
                    x = self.decode_tc([x])[0]
            elif spec.quantized:
                q = s["q.npy"]
                x = s["x.npy"]
                if self.raw:
                    meta["qscale"], meta["qoffset"] = q[0], q[1]
                else:
                    x = self.dequantize(x[None], q[:1], q[1:2])[0]
            else:
                x = s["x.npy"]
                if not self.raw and x.dtype.kind == "f":
                    x = x.astype(np.float32)
            yield x, int(j["cls"]), meta


class _FdCache(threading.local):
    """Read-only file descriptors for pread, one cache per thread (a thread only ever closes its
    own descriptors; pread has no shared file position)."""

    def __init__(self, cap: int = 64):
        self.cap = cap
        self.fds: dict = {}

    def get(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is None:
            if len(self.fds) >= self.cap:
                old_path, old_fd = next(iter(self.fds.items()))
                del self.fds[old_path]
                os.close(old_fd)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise StoreError(f"shard file {path} is missing") from None
            self.fds[path] = fd
        return fd

    def close(self):  # closes the calling thread's descriptors
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}
