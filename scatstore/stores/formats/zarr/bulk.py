"""Bulk reader of zarr stores (the ``scatstore.stores.bulk`` contract; fast paths in its docstring)."""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import threading

import numpy as np

import google_crc32c

from ...bulk import BulkReader, DamagedChunk, _LRU, _preadv_all, _runs, _scatter, as_dst
from ...errors import StoreError
from .writer import GROUP


def _unmap(m) -> None:
    """Drop a cached map: closed when nothing uses it, else freed with its last user (a numpy
    view or a decoding thread)."""
    try:
        m[0].close()
    except (BufferError, TypeError):
        pass


class ZarrBulkReader(BulkReader):
    name = "zarr"

    def __init__(self, ds, skip_damaged: bool = False):
        super().__init__(ds, skip_damaged)
        self.group = self.root / GROUP
        meta = json.loads((self.group / "x" / "zarr.json").read_text())
        self.chunk_samples, self.mode, self.key_fmt = self._parse(meta)
        self._index = _LRU(256)
        # Uncompressed chunks whose crc32c passed, (shard, chunk): later reads of them skip the
        # check (an extra pass over the data that halves the raw read rate; benchmarks/crc_check.py),
        # as the shard indexes above are read once per reader too. Compressed chunks are always
        # checked: there the check is ~3 % of the decompression.
        self._verified: set = set()
        self._q = _LRU(8)
        self._zarr = None
        self._zlock = threading.Lock()
        self._scratch = threading.local()
        self._maps, self._maps_pid = _LRU(64, _unmap), os.getpid()
        if self.mode == "zstd":
            import numcodecs

            self._zstd = numcodecs.Zstd()

    def unit_size(self) -> int:
        return self.chunk_samples

    def _parse(self, meta: dict):
        """(chunk_samples, mode, shard key format); mode "raw" | "zstd" | "library" (zarr-python)."""
        ss = self.spec.shard_size
        try:
            codecs = meta["codecs"]
            assert len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
            cfg = codecs[0]["configuration"]
            inner = cfg["chunk_shape"]
            assert list(meta["chunk_grid"]["configuration"]["chunk_shape"]) == [ss, *self.sample_shape]
            assert list(inner[1:]) == list(self.sample_shape) and ss % inner[0] == 0
            assert cfg.get("index_location", "end") == "end"
            idx_codecs = [c["name"] for c in cfg["index_codecs"]]
            assert idx_codecs in (["bytes"], ["bytes", "crc32c"])
            assert cfg["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
            names = [c["name"] for c in cfg["codecs"]]
            assert names[0] == "bytes"
            endian = cfg["codecs"][0].get("configuration", {}).get("endian", "little")
            assert endian == "little" or self.dtype.itemsize == 1
            rest = names[1:]
            self._crc_index = 4 if idx_codecs[-1] == "crc32c" else 0
            self._crc_chunk = 4 if rest and rest[-1] == "crc32c" else 0
            if self._crc_chunk:
                rest = rest[:-1]
            if rest == []:
                mode = "raw"
            elif rest == ["zstd"]:
                mode = "zstd"
            else:
                raise AssertionError
            enc = meta.get("chunk_key_encoding", {"name": "default"})
            sep = enc.get("configuration", {}).get("separator", "/")
            prefix = "c" + sep if enc["name"] == "default" else ""
            nd = 1 + len(self.sample_shape)
            key_fmt = prefix + sep.join(["{}"] + ["0"] * (nd - 1))
            return int(inner[0]), mode, key_fmt
        except (AssertionError, KeyError, IndexError, TypeError):
            return int(ss), "library", None

    def _shard_index(self, shard: int):
        """(offsets, nbytes) uint64 arrays of the inner chunks of one shard file, or None."""
        def make():
            path = self.group / "x" / self.key_fmt.format(shard)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                return ("missing", None, None)
            n = self.spec.shard_size // self.chunk_samples
            ilen = n * 16 + self._crc_index
            fd = self._fd(path)
            raw = os.pread(fd, ilen, size - ilen)
            if len(raw) != ilen:
                raise StoreError(f"{path}: truncated shard index")
            a = np.frombuffer(raw[: n * 16], dtype="<u8").reshape(n, 2)
            off, nb = a[:, 0].copy(), a[:, 1].copy()
            present = off != np.uint64(2 ** 64 - 1)
            if (present & (off + nb > np.uint64(size - ilen))).any():
                raise StoreError(f"{path}: shard index points outside the file")
            return (path, off, nb)
        return self._index.get(shard, make)

    def _zarr_array(self, name: str):
        with self._zlock:
            if self._zarr is None:
                import zarr
                self._zarr = zarr.open_group(str(self.group), mode="r")
            return self._zarr[name]

    def _qparams(self, shard: int):
        def make():
            lo, hi = self.spec.shard_range(shard)
            qs = np.asarray(self._zarr_array("qscale")[lo:hi], dtype=np.float32)
            qo = np.asarray(self._zarr_array("qoffset")[lo:hi], dtype=np.float32)
            return np.stack([qs, qo], axis=1)
        return self._q.get(shard, make)

    def read(self, idx, x_out, q_out) -> int:
        slots = self.slots[idx]
        ss, cs = self.spec.shard_size, self.chunk_samples
        total = 0
        chunks = slots // cs
        brk = np.flatnonzero(np.diff(chunks) != 0) + 1
        starts = np.concatenate([[0], brk]).tolist()
        stops = np.concatenate([brk, [len(slots)]]).tolist()
        dst = as_dst(x_out, len(idx))
        for a, b in zip(starts, stops):
            try:
                total += self._read_chunk(int(chunks[a]), slots[a:b], dst[a:b])
            except DamagedChunk as e:
                self.damaged_read(idx[a:b], dst[a:b], str(e))
        if q_out is not None:
            shards = slots // ss
            for s in np.unique(shards):
                sel = shards == s
                try:
                    q = self._qparams(int(s))
                except ValueError as e:  # zarr-python's checksum mismatch
                    self.damaged_read(idx[sel], [], f"{self.group}/qscale|qoffset of shard "
                                      f"{int(s):06d}: {e}")
                    q_out[sel] = 0
                    continue
                q_out[sel] = q[slots[sel] - s * ss]
                total += int(sel.sum()) * q_out[0].nbytes
        return total

    # ------------------------------------------------------------------ converting read
    @property
    def converts(self) -> bool:
        """float16 stores whose chunks this reader decodes itself can be read straight into
        float32 rows (:meth:`read_f32`)."""
        return self.dtype == np.float16 and self.mode in ("raw", "zstd")

    def read_f32(self, idx, dst_addrs, gather) -> int:
        """Like :meth:`read`, but each sample is handed, where it lies (the mapped shard file
        when uncompressed, the decoded chunk for zstd), to ``gather(base, src_offsets,
        dst_addrs, elems)`` which writes it to the address ``dst_addrs[k]`` the caller owns:
        one pass, no staging copy. The loader passes
        :func:`scatstore.loaders.convert.gather_f16_to_f32` (float32 rows, ``2 *
        sample_nbytes`` bytes each) or ``gather_f16_copy`` (float16 rows, mapped copy)."""
        slots = self.slots[idx]
        cs = self.chunk_samples
        chunks = slots // cs
        brk = np.flatnonzero(np.diff(chunks) != 0) + 1
        starts = np.concatenate([[0], brk]).tolist()
        stops = np.concatenate([brk, [len(slots)]]).tolist()
        dst_addrs = np.asarray(dst_addrs, dtype=np.int64)
        elems = self.sample_nbytes // 2
        total = 0
        for a, b in zip(starts, stops):
            try:
                total += self._read_chunk(int(chunks[a]), slots[a:b], None, gather=gather,
                                          addrs=dst_addrs[a:b], elems=elems)
            except DamagedChunk as e:
                self.damaged_read(idx[a:b], [], str(e))
                for addr in dst_addrs[a:b].tolist():  # float32 zeros, as the plain read gives
                    ctypes.memset(addr, 0, elems * 4)
        return total

    def _check_crc(self, path, shard: int, within: int, bufs: list, stored) -> None:
        crc = 0
        for b in bufs:
            crc = google_crc32c.extend(crc, np.frombuffer(b, dtype=np.uint8))
        if np.uint32(crc).tobytes() != bytes(stored):
            raise DamagedChunk(f"shard {shard:06d} is damaged: {path}: inner chunk {within} fails "
                               "its crc32c check")

    def _read_chunk(self, chunk: int, slots: np.ndarray, out, gather=None, addrs=None,
                    elems=0) -> int:
        cs, ss, nbs = self.chunk_samples, self.spec.shard_size, self.sample_nbytes
        if self.mode == "library":
            lo = chunk * cs
            try:
                blk = np.asarray(self._zarr_array("x")[lo: min(lo + cs, self.spec.n_slots)])
            except (ValueError, RuntimeError) as e:  # checksum mismatch, undecodable chunk
                raise DamagedChunk(f"{self.group}/x chunk {chunk}: {e}") from None
            _scatter(out, np.ascontiguousarray(blk[slots - lo]))
            return blk.nbytes
        shard = (chunk * cs) // ss
        path, off, nb = self._shard_index(shard)
        within = chunk - shard * (ss // cs)
        if path == "missing" or off[within] == np.uint64(2 ** 64 - 1):
            if out is None:  # converting read: float32 zeros (all bits zero)
                for a in addrs.tolist():
                    ctypes.memset(a, 0, elems * 4)
                return 0
            for d in out:  # chunk of fill values (never written)
                d[:] = bytes(len(d))
            return 0
        fd = self._fd(path)
        base = int(off[within])
        local = slots - chunk * cs
        crc = self._crc_chunk
        if self.mode == "raw":
            if int(nb[within]) != cs * nbs + crc:
                raise DamagedChunk(f"{path}: chunk {within} has {int(nb[within])} bytes, "
                                   f"expected {cs * nbs + crc}")
            if crc and (shard, within) in self._verified:
                crc = 0  # checked on its first read by this reader (see _verified)
            if out is None:  # converting read from the mapped file
                m = self._map(path, with_address=True)
                if m is not None and base + cs * nbs + self._crc_chunk <= len(m[0]):
                    if crc:
                        with memoryview(m[0]) as mv:
                            self._check_crc(path, shard, within, [mv[base: base + cs * nbs]],
                                            mv[base + cs * nbs: base + cs * nbs + crc])
                        self._verified.add((shard, within))
                    gather(m[1] + base, local * nbs, addrs, elems)
                    return len(local) * nbs
                return self._read_f32_staged(chunk, slots, addrs, elems, gather)
            if crc and len(local) == cs:  # the whole chunk, in order: check it in the outputs
                total = _preadv_all(fd, list(out), base)
                stored = os.pread(fd, crc, base + cs * nbs)
                self._check_crc(path, shard, within, out, stored)
                self._verified.add((shard, within))
                return total + crc
            if crc:  # part of a chunk: read it whole once, check, copy the rows out
                buf = self._chunk_scratch(cs * nbs + crc)
                _preadv_all(fd, [buf], base)
                self._check_crc(path, shard, within, [buf[: cs * nbs]], buf[cs * nbs:])
                self._verified.add((shard, within))
                rows = np.frombuffer(buf, dtype=np.uint8, count=cs * nbs).reshape(cs, nbs)
                _scatter(out, rows[local])
                return len(buf)
            total = 0
            for a, b in _runs(local):
                total += _preadv_all(fd, out[a:b], base + int(local[a]) * nbs)
            return total
        # zstd: check the compressed chunk's crc32c and decompress it straight from the mapped
        # shard file (no read copy; GIL released by numcodecs) into a per-thread scratch buffer,
        # then copy each wanted sample from it to its destination (no gathered intermediate)
        n = int(nb[within])
        if n < crc:
            raise DamagedChunk(f"{path}: chunk {within} is shorter than its checksum")
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.nbytes != cs * nbs:
            buf = self._scratch.buf = np.empty(cs * nbs, dtype=np.uint8)
        mm = self._map(path)
        try:
            if mm is None or base + n > len(mm):
                comp = os.pread(fd, n, base)
                if len(comp) != n:
                    raise DamagedChunk(f"{path}: short read of chunk {within}")
                payload = memoryview(comp)[: n - crc]
                if crc:
                    self._check_crc(path, shard, within, [payload], comp[n - crc:])
                self._zstd.decode(payload, out=buf)
            else:
                with memoryview(mm) as mv:
                    payload = mv[base: base + n - crc]
                    if crc:
                        self._check_crc(path, shard, within, [payload],
                                        mv[base + n - crc: base + n])
                    self._zstd.decode(payload, out=buf)
        except RuntimeError as e:  # a checksum-less store: zstd's own frame check
            raise DamagedChunk(f"{path}: chunk {within}: {e}") from None
        if out is None:  # converting read from the decoded chunk
            gather(buf.ctypes.data, local * nbs, addrs, elems)
            return n
        src = memoryview(buf)
        for d, k in zip(out, local.tolist()):
            d[:] = src[k * nbs:(k + 1) * nbs]
        return n

    def _chunk_scratch(self, n: int) -> memoryview:
        b = getattr(self._scratch, "chunk", None)
        if b is None or len(b) != n:
            b = self._scratch.chunk = memoryview(bytearray(n))
        return b

    def _read_f32_staged(self, chunk, slots, addrs, elems, gather) -> int:
        """Converting read through a float16 staging buffer (a shard that cannot be mapped)."""
        tmp = np.empty((len(slots), self.sample_nbytes), dtype=np.uint8)
        n = self._read_chunk(chunk, slots, as_dst(tmp, len(slots)))
        gather(tmp.ctypes.data, np.arange(len(slots)) * self.sample_nbytes,
                                  addrs, elems)
        return n

    def _map(self, path, with_address: bool = False):
        """A read-only map of a shard file (shards never change once committed), or None; with
        ``with_address``, ``(map, address)`` (the address stays valid while the pair lives)."""
        if os.getpid() != self._maps_pid:  # forked: maps of our own
            self._maps, self._maps_pid = _LRU(64, _unmap), os.getpid()

        def make():
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # empty file, or a filesystem without mmap
                return None
            view = np.frombuffer(mm, dtype=np.uint8)  # keeps the map alive while cached
            return (mm, int(view.ctypes.data), view)
        m = self._maps.get(str(path), make)
        if m is None:
            return None
        return (m[0], m[1]) if with_address else m[0]

    def close(self):
        super().close()
        self._maps.clear()
