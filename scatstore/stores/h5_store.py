"""HDF5 store: ``OUT/shard-NNNNNN.h5``, one chunked, compressed file per shard (layout
``scatstore-h5-v1``, docs/format.md).

Datasets of a shard file (``n`` = samples in the shard): ``x`` (n, *sample_shape) chunked per
``chunk_samples`` samples (default 1), ``slot`` int64, ``y`` int64, ``key`` and ``meta`` (UTF-8
variable-length strings, meta as JSON), ``qscale``/``qoffset`` float32 (n, C, K), ``hw`` int32
(n, 2); bitstream stores hold ``bits`` uint8 (total,) and ``bits_offsets`` int64 (n+1,) instead of
``x``. Object times are not tracked, so the file bytes depend on the samples only.
"""
from __future__ import annotations

import io
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .base import (ShardBatch, StoreError, StoreSpec, StoreWriter, atomic_write_bytes,
                   parse_compression, records_arrays, shard_name)
from .dataset import ScatDataset, load_index_npy
from .wds_store import build_index, npy_bytes

LAYOUT = "scatstore-h5-v1"
INDEX = "index.npy"


def h5_filter(spec: StoreSpec) -> dict:
    """create_dataset keyword arguments for the payload: gzip level 1 + shuffle by default."""
    name, level = parse_compression(spec.compression)
    if name in ("default", "zstd"):  # zstd needs an HDF5 plugin: the built-in default instead
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 1 if level is None else level, "shuffle": True}
    if name == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {}


def h5_chunk_samples(spec: StoreSpec) -> int:
    return spec.chunk_samples or 1


class H5Writer(StoreWriter):
    layout = LAYOUT

    def _prepare_layout(self) -> None:
        pass

    def h5_path(self, index: int) -> Path:
        return self.out / f"{shard_name(index)}.h5"

    def _write_files(self, index: int, batch: ShardBatch):
        import h5py

        spec = self.spec
        n = len(batch)
        path = self.h5_path(index)
        buf = io.BytesIO()
        filt = h5_filter(spec)
        extra: dict = {}
        strdt = h5py.string_dtype("utf-8")

        def ds(f, name, data, chunk_rows=None, compress=True):
            data = np.asarray(data)
            kw = dict(track_times=False)
            if chunk_rows and len(data) > 0:
                kw["chunks"] = (min(chunk_rows, len(data)), *data.shape[1:])
                if compress:
                    kw.update(filt)
            return f.create_dataset(name, data=data, **kw)

        # Built in memory, then written by plain file I/O: a failed write (a full disk) is then an
        # ordinary OSError, where HDF5 writing to disk itself leaves its objects in a state that
        # crashes the interpreter at exit (seen: a segfault after "file too large").
        with h5py.File(buf, "w", libver="earliest", track_order=False) as f:
            f.attrs["scatstore_layout"] = LAYOUT
            f.attrs["shard"] = int(index)
            f.attrs["spec"] = json.dumps(spec.to_dict(), sort_keys=True)
            if spec.dtype == "bytes":
                lens = np.asarray([len(b) for b in batch.x], dtype=np.int64)
                off = np.zeros(n + 1, dtype=np.int64)
                off[1:] = np.cumsum(lens)
                ds(f, "bits", np.frombuffer(b"".join(bytes(b) for b in batch.x), dtype=np.uint8))
                ds(f, "bits_offsets", off)
                extra["lengths"] = lens.tolist()
            else:
                ds(f, "x", batch.x, h5_chunk_samples(spec))
            ds(f, "slot", np.asarray(batch.slots, dtype=np.int64))
            ds(f, "y", np.asarray(batch.y, dtype=np.int64))
            f.create_dataset("key", data=np.asarray(list(batch.keys), dtype=object), dtype=strdt,
                             track_times=False)
            mj = [json.dumps(m, sort_keys=True, separators=(",", ":")) for m in batch.meta]
            f.create_dataset("meta", data=np.asarray(mj, dtype=object), dtype=strdt, track_times=False)
            if spec.quantized:
                ds(f, "qscale", batch.qscale.astype(np.float32), n)
                ds(f, "qoffset", batch.qoffset.astype(np.float32), n)
            if spec.has_hw:
                ds(f, "hw", np.asarray(batch.hw, dtype=np.int32))
        files = {path.name: atomic_write_bytes(path, buf.getbuffer())}
        return files, extra

    def _finalize_index(self, records: list):
        ga = records_arrays(self.spec, records)
        idx = build_index(ga, [], [[] for _ in ga["slot"]])
        info = atomic_write_bytes(self.out / INDEX, npy_bytes(idx))
        f = h5_filter(self.spec)
        extra = {"index": INDEX, "chunk_samples": h5_chunk_samples(self.spec),
                 "compression": {k: v for k, v in f.items()} or None}
        return {INDEX: info}, extra


class H5Dataset(ScatDataset):
    MAX_OPEN = 32

    def _load_index(self):
        ix = load_index_npy(self.root, self.manifest)
        self._ix = ix
        self.slots = ix["slot"].astype(np.int64)
        self.labels = ix["y"].astype(np.int64)
        self.keys = [k.decode("ascii") for k in ix["key"]]

    def _file(self, shard: int):
        import h5py

        h = self._handles()
        files = h.setdefault("files", _FileCache())  # per thread: a thread closes only its own
        f = files.get(shard)
        if f is None:
            p = self.root / f"{shard_name(shard)}.h5"
            if not p.exists():
                raise StoreError(f"shard file {p} is missing")
            f = h5py.File(p, "r")
            files.put(shard, f, self.MAX_OPEN)
        return f

    def _read(self, idx: np.ndarray):
        spec = self.spec
        xs, qs, qo, hws = [], [], [], []
        for i in idx:
            row = self._ix[int(i)]
            f = self._file(int(row["shard"]))
            p = int(row["pos"])
            k = f["key"][p]
            if (k.decode() if isinstance(k, bytes) else str(k)) != self.keys[int(i)]:
                raise StoreError(f"shard {int(row['shard'])} position {p} does not hold {self.keys[int(i)]!r}")
            if spec.dtype == "bytes":
                a, b = f["bits_offsets"][p:p + 2]
                xs.append(f["bits"][int(a):int(b)].tobytes())
            else:
                xs.append(f["x"][p])
            if spec.quantized:
                qs.append(f["qscale"][p])
                qo.append(f["qoffset"][p])
            if spec.has_hw:
                hws.append(f["hw"][p])
        x = xs if spec.dtype == "bytes" else (np.stack(xs) if xs else
                                              np.zeros((0, *spec.sample_shape), spec.dtype))
        if spec.quantized:
            qs_a = np.stack(qs) if qs else np.zeros((0, *spec.qparam_shape), np.float32)
            qo_a = np.stack(qo) if qo else np.zeros((0, *spec.qparam_shape), np.float32)
        else:
            qs_a = qo_a = None
        hw = np.asarray(hws, dtype=np.int32).reshape(-1, 2) if spec.has_hw else None
        return x, qs_a, qo_a, hw

    def _meta(self, i: int) -> dict:
        row = self._ix[i]
        m = self._file(int(row["shard"]))["meta"][int(row["pos"])]
        return json.loads(m.decode() if isinstance(m, bytes) else m)

    def close(self):
        h = self._h
        if "files" in h and self._pid == os.getpid():
            h["files"].close()
        self._h = {}


class _FileCache(threading.local):
    def __init__(self):
        self.d: OrderedDict = OrderedDict()

    def get(self, k):
        f = self.d.get(k)
        if f is not None:
            self.d.move_to_end(k)
        return f

    def put(self, k, f, cap):
        self.d[k] = f
        while len(self.d) > cap:
            _, old = self.d.popitem(last=False)
            old.close()

    def close(self):
        for f in self.d.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
        self.d.clear()


__all__ = ["H5Writer", "H5Dataset", "LAYOUT", "StoreError"]
