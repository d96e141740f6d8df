"""Map-style reader of zarr stores (``ScatDataset`` over ``OUT/data.zarr``, written by ``writer.py``)."""
from __future__ import annotations

import itertools
import json
import os
import threading

import numpy as np

from ...dataset import ScatDataset
from ...errors import StoreError
from ...safepath import check_key_array
from .writer import GROUP


def _offsets(arr, total, name: str) -> np.ndarray:
    """An offsets array: starts at 0, never decreases, ends at ``total`` (when known)."""
    off = np.asarray(arr[:], dtype=np.int64)
    if len(off) and (off[0] != 0 or (np.diff(off) < 0).any() or
                     (total is not None and off[-1] != total)):
        raise StoreError(f"{name} are not increasing offsets into {total} bytes (damaged store)")
    return off


class _ChunkCache(threading.local):
    def __init__(self):
        self.blocks: dict = {}


class ZarrDataset(ScatDataset):
    def _load_index(self):
        import zarr

        g = zarr.open_group(str(self.root / GROUP), mode="r")
        n = self.spec.n_slots
        valid = np.asarray(self._global(g, "valid", n)[:], dtype=bool)
        self.slots = np.flatnonzero(valid).astype(np.int64)
        self.labels = np.asarray(self._global(g, "y", n)[:], dtype=np.int64)[self.slots]
        kb = np.asarray(self._global(g, "key", n)[:])[self.slots]
        check_key_array(kb, self.root / GROUP / "key")
        self.keys = [bytes(r).rstrip(b"\0").decode("ascii") for r in kb]
        self._meta_off = _offsets(self._global(g, "meta_offsets", n + 1),
                                  self._global(g, "meta_json", None).shape[0], "meta_offsets")
        if self.spec.dtype == "bytes":
            self._bits_off = _offsets(self._global(g, "bits_offsets", n + 1), None, "bits_offsets")

    def _global(self, g, name: str, rows):
        """A global array whose row count is the expected one and whose chunk files all exist:
        a zarr.json claiming 2^36 rows would otherwise read as fill values into a huge allocation."""
        arr = g[name]
        if rows is not None and (arr.ndim < 1 or arr.shape[0] != rows):
            raise StoreError(f"{self.root / GROUP / name}: {arr.shape} rows, the manifest says {rows}")
        n_chunks = -(-arr.shape[0] // arr.chunks[0]) if arr.shape[0] else 0
        cdir = self.root / GROUP / name / "c"
        have = sum(1 for _ in itertools.islice(os.scandir(cdir), n_chunks)) if cdir.is_dir() else 0
        if have < n_chunks:
            raise StoreError(f"{self.root / GROUP / name}: {arr.shape[0]} rows need {n_chunks} chunk "
                             f"files, {have} exist (damaged or edited store)")
        return arr

    range_reads = True  # a remote sample of an uncached shard: zarr's ranged reads (FsspecStore)

    def _group(self, remote: bool = False):
        """Per-process handles: the group in the store directory (a remote store's mirror), or
        with ``remote`` the group over zarr's own remote store (shard index + chunk, ranged)."""
        h = self._handles()
        key = "rgroup" if remote else "group"
        if key not in h:
            import zarr
            if remote:
                from ...fs import zarr_store

                h[key] = zarr.open_group(store=zarr_store(self.cache.remote / GROUP), mode="r")
            else:
                h[key] = zarr.open_group(str(self.root / GROUP), mode="r")
            h.setdefault("cache", _ChunkCache())
            h["rbits" if remote else "bits"] = {}
            h["rarrays" if remote else "arrays"] = {}
        return h

    def _array(self, name: str, remote: bool = False):
        h = self._group(remote)
        arrays = h["rarrays" if remote else "arrays"]
        arr = arrays.get(name)
        if arr is None:  # opening an array reads its zarr.json: do it once per process
            arr = arrays[name] = h["rgroup" if remote else "group"][name]
        return arr

    def _rows(self, name: str, slots: np.ndarray, remote: bool = False) -> np.ndarray:
        """Rows of a slot-indexed array, reading whole inner chunks through a per-thread cache."""
        h = self._group(remote)
        arr = self._array(name, remote)
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
        remote = self.cache is not None and not all(
            self.cache.has_shard(int(s)) for s in np.unique(self._shard_of[idx]))
        if spec.dtype == "bytes":
            x = self._read_bits(slots, remote)
        else:
            x = self._rows("x", slots, remote)
        q = (self._rows("qscale", slots, remote), self._rows("qoffset", slots, remote)) \
            if spec.quantized else (None, None)
        hw = self._rows("hw", slots, remote) if spec.has_hw else None
        return x, q[0], q[1], hw

    def _read_bits(self, slots: np.ndarray, remote: bool = False) -> list:
        """Bitstreams of ``slots``: one zarr read per shard of the byte span its samples cover
        (a sorted batch of one shard, the loader's windows, reads its chunks once)."""
        spec = self.spec
        h = self._group(remote)
        bits, group = h["rbits" if remote else "bits"], h["rgroup" if remote else "group"]
        xs: list = [b""] * len(slots)
        shards = slots // spec.shard_size
        for sh in np.unique(shards).tolist():
            arr = bits.get(sh)
            if arr is None:
                arr = bits[sh] = group[f"bits/{sh:06d}"]
            pos = np.flatnonzero(shards == sh)
            base = self._bits_off[sh * spec.shard_size]
            a = self._bits_off[slots[pos]] - base
            b = self._bits_off[slots[pos] + 1] - base
            if (a < 0).any() or (b < a).any() or (b > arr.shape[0]).any():
                raise StoreError(f"shard {sh}: bits_offsets lie outside its {arr.shape[0]} bytes "
                                 "of bitstreams")
            lo, hi = int(a.min()), int(b.max())
            span = np.asarray(arr[lo:hi]) if hi > lo else np.zeros(0, np.uint8)
            for k, i0, i1 in zip(pos.tolist(), (a - lo).tolist(), (b - lo).tolist()):
                xs[k] = span[i0:i1].tobytes()
        return xs

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
