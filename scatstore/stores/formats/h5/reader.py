"""Map-style reader of HDF5 stores (h5py, one open file per shard and thread)."""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict

import numpy as np

from ...base import shard_name
from ...dataset import ScatDataset
from ...errors import StoreError
from ...index_npy import load_index_npy


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
