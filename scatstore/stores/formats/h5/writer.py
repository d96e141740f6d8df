"""HDF5 store writer: ``OUT/shard-NNNNNN.h5``, one chunked, compressed file per shard (layout
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
from pathlib import Path

import numpy as np

from ...base import ShardBatch, StoreSpec, StoreWriter, parse_compression, records_arrays, shard_name
from ...files import atomic_write_bytes
from ...index_npy import build_index, npy_bytes

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
