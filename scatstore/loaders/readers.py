"""Bulk readers of stored samples: many samples per system call, straight into the caller's buffer.

A reader is built over an opened :class:`scatstore.stores.ScatDataset` and answers

``read(idx, x_dst, q_out) -> bytes_read``
    ``idx``: sorted, unique dataset indices; ``x_dst``: one writable byte ``memoryview`` per index
    (``sample_nbytes`` long, anywhere: the loader points them at the rows of the batches the
    samples are shuffled into, so the read *is* the shuffle, with no gather copy), or an array
    ``(len(idx), *sample_shape)`` of the stored dtype; ``q_out``: ``(len(idx), 2, *qparam_shape)``
    float32 (qscale, qoffset) for quantized stores, else ``None``. Safe to call from several threads at once on disjoint
    outputs (file reads use ``pread``/``preadv``, which release the GIL and share no position).

Fast paths (no per-sample Python beyond building the I/O vector, no extra copy):

- zarr, uncompressed (``compression="none"``: codecs ``bytes`` + ``crc32c``): the shard index is
  read once per shard file, then each run of consecutive samples of one inner chunk is one
  ``preadv`` into the destinations. zstd chunks are read whole, decompressed into a per-thread
  scratch buffer and copied out. Other codec chains fall back to zarr-python.
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

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

IOV_MAX = 1000  # os.preadv accepts at most IOV_MAX (1024 on Linux) buffers per call
BLOCK = 512


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
            raise EOFError(f"short read at offset {offset + done} (truncated file?)")
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


class BaseReader:
    """Common state: the dataset, sample geometry, per-process file descriptor cache."""

    name = "generic"

    def __init__(self, ds):
        from scatstore.stores import StoreError

        self.ds = ds
        self.spec = ds.spec
        self.StoreError = StoreError
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
                raise self.StoreError(f"shard file {path} is missing") from None
        return self._fds.get(str(path), make)

    def close(self):
        self._fds.clear()

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


# ------------------------------------------------------------------------------------------ zarr
class ZarrReader(BaseReader):
    name = "zarr"

    def __init__(self, ds):
        super().__init__(ds)
        from scatstore.stores.zarr_store import GROUP

        self.group = self.root / GROUP
        meta = json.loads((self.group / "x" / "zarr.json").read_text())
        self.chunk_samples, self.mode, self.key_fmt = self._parse(meta)
        self._index = _LRU(256)
        self._q = _LRU(8)
        self._zarr = None
        self._zlock = threading.Lock()
        self._scratch = threading.local()
        if self.mode == "zstd":
            import numcodecs

            self._zstd = numcodecs.Zstd()

    def unit_size(self) -> int:
        return self.chunk_samples

    def _parse(self, meta: dict):
        """(chunk_samples, mode in {"raw", "zstd", "zarr"}, shard key format)."""
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
            return int(ss), "zarr", None

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
                raise self.StoreError(f"{path}: truncated shard index")
            a = np.frombuffer(raw[: n * 16], dtype="<u8").reshape(n, 2)
            off, nb = a[:, 0].copy(), a[:, 1].copy()
            present = off != np.uint64(2 ** 64 - 1)
            if (present & (off + nb > np.uint64(size - ilen))).any():
                raise self.StoreError(f"{path}: shard index points outside the file")
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
            total += self._read_chunk(int(chunks[a]), slots[a:b], dst[a:b])
        if q_out is not None:
            shards = slots // ss
            for s in np.unique(shards):
                sel = shards == s
                q = self._qparams(int(s))
                q_out[sel] = q[slots[sel] - s * ss]
                total += int(sel.sum()) * q_out[0].nbytes
        return total

    def _read_chunk(self, chunk: int, slots: np.ndarray, out) -> int:
        cs, ss, nbs = self.chunk_samples, self.spec.shard_size, self.sample_nbytes
        if self.mode == "zarr":
            lo = chunk * cs
            blk = np.asarray(self._zarr_array("x")[lo: min(lo + cs, self.spec.n_slots)])
            _scatter(out, np.ascontiguousarray(blk[slots - lo]))
            return blk.nbytes
        shard = (chunk * cs) // ss
        path, off, nb = self._shard_index(shard)
        within = chunk - shard * (ss // cs)
        if path == "missing" or off[within] == np.uint64(2 ** 64 - 1):
            for d in out:  # chunk of fill values (never written)
                d[:] = bytes(len(d))
            return 0
        fd = self._fd(path)
        base = int(off[within])
        local = slots - chunk * cs
        if self.mode == "raw":
            if int(nb[within]) != cs * nbs + self._crc_chunk:
                raise self.StoreError(f"{path}: chunk {within} has {int(nb[within])} bytes, "
                                      f"expected {cs * nbs + self._crc_chunk}")
            total = 0
            for a, b in _runs(local):
                total += _preadv_all(fd, out[a:b], base + int(local[a]) * nbs)
            return total
        # zstd: read the whole compressed chunk, decompress (GIL released by numcodecs)
        n = int(nb[within])
        comp = os.pread(fd, n, base)
        if len(comp) != n:
            raise self.StoreError(f"{path}: short read of chunk {within}")
        payload = memoryview(comp)[: n - self._crc_chunk]
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.nbytes != cs * nbs:
            buf = self._scratch.buf = np.empty((cs, *self.sample_shape), dtype=self.dtype)
        self._zstd.decode(payload, out=buf.reshape(-1).view(np.uint8))
        _scatter(out, buf[local])
        return n


# ------------------------------------------------------------------------------------------- wds
class WdsReader(BaseReader):
    name = "wds"

    def __init__(self, ds):
        super().__init__(ds)
        from scatstore.stores.dataset import load_index_npy
        from scatstore.stores.wds_store import npy_bytes

        ix = load_index_npy(self.root, ds.manifest)
        self.shard = ix["shard"].astype(np.int64)
        self.pos = ix["pos"].astype(np.int64)
        self.off_x = ix["off_x_npy"].astype(np.int64)
        size_x = ix["size_x_npy"].astype(np.int64)
        hdr = npy_bytes(np.zeros(self.sample_shape, dtype=self.dtype))
        self.npy_hlen = len(hdr) - self.sample_nbytes
        self.npy_hdr = np.frombuffer(hdr[: self.npy_hlen], dtype=np.uint8)
        if len(size_x) and (size_x != len(hdr)).any():
            raise self.StoreError(f"{self.root}: index.npy member sizes do not match sample_shape "
                                  f"{self.sample_shape} {self.dtype}")
        if self.quantized:
            self.off_q = ix["off_q_npy"].astype(np.int64)
            qh = npy_bytes(np.zeros((2, *self.spec.qparam_shape), dtype=np.float32))
            self.q_nbytes = int(np.prod(self.spec.qparam_shape)) * 8
            self.q_hlen = len(qh) - self.q_nbytes
            self.q_hdr = np.frombuffer(qh[: self.q_hlen], dtype=np.uint8)
            if (ix["size_q_npy"] != len(qh)).any():
                raise self.StoreError(f"{self.root}: index.npy q member sizes are inconsistent")
        # the end of each sample's last member we read (x, or q)
        self.names = np.zeros((len(self.off_x), 100), dtype=np.uint8)
        for i, k in enumerate(ds.keys):
            nm = f"{k}.x.npy".encode()
            self.names[i, : len(nm)] = np.frombuffer(nm, dtype=np.uint8)
        if len(self.off_x):
            for s in np.unique(self.shard):
                sel = self.shard == s
                if (np.diff(self.off_x[sel]) <= 0).any():
                    raise self.StoreError(f"{self.root}: index.npy offsets of shard {s} are not increasing")
        self._junk = threading.local()

    def _junkbuf(self, n: int) -> memoryview:
        j = getattr(self._junk, "buf", None)
        if j is None or len(j) < n:
            j = self._junk.buf = memoryview(bytearray(max(n, 1 << 16)))
        return j

    def read(self, idx, x_out, q_out) -> int:
        from scatstore.stores.base import shard_name

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
            raise self.StoreError(
                f"{self.root}: sample {self.ds.keys[int(idx[k])]!r}: the tar member at the indexed "
                f"offset is not the expected '{self.ds.keys[int(idx[k])]}.x.npy' array (index and "
                "shard disagree: damaged or replaced shard)")


# -------------------------------------------------------------------------------------------- h5
class H5Reader(BaseReader):
    name = "h5"

    def __init__(self, ds):
        super().__init__(ds)
        from scatstore.stores.dataset import load_index_npy

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
        from scatstore.stores.base import shard_name
        return self.root / f"{shard_name(shard)}.h5"

    def _file(self, shard: int):
        import h5py

        if os.getpid() != self._pid:
            self._files = _LRU(16, lambda f: f.close())
            self._fds = _LRU(64, _close_fd)
            self._pid = os.getpid()
        return self._files.get(shard, lambda: h5py.File(self._path(shard), "r"))

    def _layout(self, shard: int):
        """('direct', offsets per row) for an unfiltered x, else ('h5', None)."""
        def make():
            with self._h5lock:
                d = self._file(shard)["x"]
                if d.dtype != self.dtype or tuple(d.shape[1:]) != self.sample_shape:
                    raise self.StoreError(f"{self._path(shard)}: x is {d.dtype}{d.shape}, manifest "
                                          f"says {self.dtype}{self.sample_shape}")
                n = d.shape[0]
                if d.compression is not None or d.shuffle or d.fletcher32 or d.scaleoffset \
                        or d.id.get_create_plist().get_nfilters() or n == 0:
                    return ("h5", None)
                nbs = self.sample_nbytes
                if d.chunks is None:
                    base = d.id.get_offset()
                    if base is None:
                        return ("h5", None)
                    return ("direct", base + np.arange(n, dtype=np.int64) * nbs)
                cr = d.chunks[0]
                if tuple(d.chunks[1:]) != self.sample_shape:
                    return ("h5", None)
                nch = d.id.get_num_chunks()
                offs = np.full(n, -1, dtype=np.int64)
                for c in range(nch):
                    info = d.id.get_chunk_info(c)
                    r0 = info.chunk_offset[0]
                    if info.size != cr * nbs:
                        return ("h5", None)
                    rows = np.arange(r0, min(r0 + cr, n))
                    offs[rows] = info.byte_offset + (rows - r0) * nbs
                if (offs < 0).any():
                    return ("h5", None)
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


def make_reader(ds) -> BaseReader:
    """The fastest reader for ``ds`` (an opened ScatDataset)."""
    if ds.spec.dtype == "bytes":
        return BaseReader(ds)
    fmt = ds.spec.format
    if fmt == "zarr":
        return ZarrReader(ds)
    if fmt == "wds":
        return WdsReader(ds)
    if fmt == "h5":
        return H5Reader(ds)
    return BaseReader(ds)
