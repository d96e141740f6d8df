"""Map-style reader of zarr stores (``ScatDataset`` over ``OUT/data.zarr``, written by ``writer.py``)."""
from __future__ import annotations

import json
import threading

import numpy as np

from ...dataset import ScatDataset
from .writer import GROUP


class _ChunkCache(threading.local):
    def __init__(self):
        self.blocks: dict = {}


class ZarrDataset(ScatDataset):
    def _load_index(self):
        import zarr

        g = zarr.open_group(str(self.root / GROUP), mode="r")
        valid = np.asarray(g["valid"][:], dtype=bool)
        self.slots = np.flatnonzero(valid).astype(np.int64)
        self.labels = np.asarray(g["y"][:], dtype=np.int64)[self.slots]
        kb = np.asarray(g["key"][:])[self.slots]
        self.keys = [bytes(r).rstrip(b"\0").decode("ascii") for r in kb]
        self._meta_off = np.asarray(g["meta_offsets"][:], dtype=np.int64)
        if self.spec.dtype == "bytes":
            self._bits_off = np.asarray(g["bits_offsets"][:], dtype=np.int64)

    def _group(self):
        h = self._handles()
        if "group" not in h:
            import zarr
            h["group"] = zarr.open_group(str(self.root / GROUP), mode="r")
            h["cache"] = _ChunkCache()
            h["bits"] = {}
            h["arrays"] = {}
        return h

    def _array(self, name: str):
        h = self._group()
        arr = h["arrays"].get(name)
        if arr is None:  # opening an array reads its zarr.json: do it once per process
            arr = h["arrays"][name] = h["group"][name]
        return arr

    def _rows(self, name: str, slots: np.ndarray) -> np.ndarray:
        """Rows of a slot-indexed array, reading whole inner chunks through a per-thread cache."""
        h = self._group()
        arr = self._array(name)
        c = arr.chunks[0]
        out = np.empty((len(slots), *arr.shape[1:]), dtype=arr.dtype)
        cache = h["cache"].blocks
        for ci in np.unique(slots // c):
            ck = (name, int(ci))
            blk = cache.get(ck)
            if blk is None:
                blk = arr[int(ci) * c: min((int(ci) + 1) * c, arr.shape[0])]
                for old in [k for k in cache if k[0] == name]:
                    del cache[old]
                cache[ck] = blk
            sel = (slots // c) == ci
            out[sel] = blk[slots[sel] - ci * c]
        return out

    def _read(self, idx: np.ndarray):
        slots = self.slots[idx]
        spec = self.spec
        if spec.dtype == "bytes":
            h = self._group()
            xs = []
            for s in slots:
                sh = int(s) // spec.shard_size
                arr = h["bits"].get(sh)
                if arr is None:
                    arr = h["bits"][sh] = h["group"][f"bits/{sh:06d}"]
                base = self._bits_off[sh * spec.shard_size]
                a, b = self._bits_off[s] - base, self._bits_off[s + 1] - base
                xs.append(bytes(np.asarray(arr[a:b])) if b > a else b"")
            x = xs
        else:
            x = self._rows("x", slots)
        q = (self._rows("qscale", slots), self._rows("qoffset", slots)) if spec.quantized else (None, None)
        hw = self._rows("hw", slots) if spec.has_hw else None
        return x, q[0], q[1], hw

    def _meta(self, i: int) -> dict:
        s = int(self.slots[i])
        a, b = int(self._meta_off[s]), int(self._meta_off[s + 1])
        if b <= a:
            return {}
        arr = self._array("meta_json")
        c = arr.chunks[0]
        parts = []
        for ci in range(a // c, (b - 1) // c + 1):
            blk = self._rows_1d(arr, "meta_json", ci, c)
            lo = max(a, ci * c) - ci * c
            hi = min(b, (ci + 1) * c) - ci * c
            parts.append(blk[lo:hi].tobytes())
        return json.loads(b"".join(parts))

    def _rows_1d(self, arr, name, ci, c):
        cache = self._group()["cache"].blocks
        ck = (name, ci)
        blk = cache.get(ck)
        if blk is None:
            blk = np.asarray(arr[ci * c: min((ci + 1) * c, arr.shape[0])])
            for old in [k for k in cache if k[0] == name]:
                del cache[old]
            cache[ck] = blk
        return blk
