"""webdataset store: ``OUT/shard-NNNNNN.tar`` (layout ``scatstore-wds-v1``, docs/format.md).

Each sample is a run of ustar members sharing the key: ``KEY.x.npy`` (array samples) or
``KEY.bits`` (bitstreams), ``KEY.q.npy`` (quantized stores: float32 (2, C, K), qscale then
qoffset), ``KEY.cls`` (ASCII integer; array samples only) and ``KEY.json``. Headers are fixed
(mtime 0, uid/gid 0, empty user/group names, mode 0644), so the bytes depend on the samples only.
Member data offsets are kept in the shard records and, at finalize, in ``OUT/index.npy``, so a
sample can be read at random with one ``pread``; its header is re-read and checked against the
expected member name first.

Reading never unpickles: ``.npy`` members are loaded with ``allow_pickle=False``, any member whose
name is not ``KEY.<known extension>`` (``.pyd``, ``.pickle``, a path with ``/`` or ``..``, a link)
is refused.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np

from .base import (ShardBatch, StoreError, StoreSpec, StoreWriter, atomic_write_bytes, check_key,
                   commit_tmp, records_arrays, sha256_file, shard_name, tmp_path)
from .dataset import ScatDataset, load_index_npy

LAYOUT = "scatstore-wds-v1"
INDEX = "index.npy"
BLOCK = 512
ALLOWED_EXTS = ("x.npy", "bits", "q.npy", "cls", "json")


def member_exts(spec: StoreSpec) -> list:
    """Member extensions of one sample, in tar order."""
    if spec.dtype == "bytes":
        # 1-4 kB samples: every member costs a 512-byte header plus padding, so the label lives
        # in the json member instead of a separate .cls (docs/format.md, "overhead")
        return ["bits", "json"]
    return ["x.npy"] + (["q.npy"] if spec.quantized else []) + ["cls", "json"]


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise StoreError(f"refusing a .npy member that is not a plain array: {e}") from None


def sample_json(key: str, slot: int, y: int, meta: dict, hw=None) -> bytes:
    d = {"key": key, "slot": int(slot), "cls": int(y), "meta": meta}
    if hw is not None:
        d["hw"] = [int(v) for v in hw]
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class WdsWriter(StoreWriter):
    layout = LAYOUT

    def _prepare_layout(self) -> None:
        pass

    def tar_path(self, index: int) -> Path:
        return self.out / f"{shard_name(index)}.tar"

    def _write_files(self, index: int, batch: ShardBatch):
        spec = self.spec
        exts = member_exts(spec)
        path = self.tar_path(index)
        tmp = tmp_path(path)
        offsets = []
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for j, key in enumerate(batch.keys):
                    slot = int(batch.slots[j])
                    y = int(batch.y[j])
                    hw = batch.hw[j] if spec.has_hw else None
                    payload = {}
                    if spec.dtype == "bytes":
                        payload["bits"] = bytes(batch.x[j])
                    else:
                        payload["x.npy"] = npy_bytes(batch.x[j])
                    if spec.quantized:
                        payload["q.npy"] = npy_bytes(np.stack([batch.qscale[j], batch.qoffset[j]]).astype(np.float32))
                    payload["cls"] = str(y).encode()
                    payload["json"] = sample_json(key, slot, y, batch.meta[j], hw)
                    row = []
                    for ext in exts:
                        data = payload[ext]
                        start = tf.offset
                        tf.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
                        row += [start + BLOCK, len(data)]
                    offsets.append(row)
            f.flush()
            os.fsync(f.fileno())
        commit_tmp(tmp, path)
        rel = path.name
        files = {rel: {"sha256": sha256_file(path), "bytes": path.stat().st_size}}
        return files, {"members": exts, "offsets": offsets}

    def _finalize_index(self, records: list):
        spec = self.spec
        exts = member_exts(spec)
        ga = records_arrays(spec, records)
        idx = build_index(ga, exts, [row for r in records for row in r.extra["offsets"]])
        info = atomic_write_bytes(self.out / INDEX, npy_bytes(idx))
        extra = {"index": INDEX, "members": exts,
                 "member_names": {e: f"KEY.{e}" for e in exts}, "compression": None}
        return {INDEX: info}, extra


def _field(ext: str) -> str:
    return ext.replace(".", "_")


def build_index(ga: dict, exts: list, offsets: list) -> np.ndarray:
    width = max([len(k) for k in ga["key"]] + [1])
    fields = [("slot", "<i8"), ("shard", "<i4"), ("pos", "<i4"), ("y", "<i8"), ("key", f"S{width}")]
    for e in exts:
        fields += [(f"off_{_field(e)}", "<i8"), (f"size_{_field(e)}", "<i8")]
    n = len(ga["slot"])
    idx = np.zeros(n, dtype=fields)
    for name in ("slot", "shard", "pos", "y"):
        idx[name] = ga[name]
    idx["key"] = [k.encode("ascii") for k in ga["key"]]
    off = np.asarray(offsets, dtype=np.int64).reshape(n, 2 * len(exts))
    for j, e in enumerate(exts):
        idx[f"off_{_field(e)}"] = off[:, 2 * j]
        idx[f"size_{_field(e)}"] = off[:, 2 * j + 1]
    return idx


# --------------------------------------------------------------------------------------- reading
def _header_name(hdr: bytes) -> str:
    name = hdr[0:100].split(b"\0", 1)[0]
    prefix = hdr[345:500].split(b"\0", 1)[0]
    full = prefix + b"/" + name if prefix else name
    return full.decode("utf-8", "replace")


def check_member_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, ext) or raise: no directories, no '..', known extensions."""
    if "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise StoreError(f"refusing tar member {name!r}: paths inside archives are not trusted")
    key, dot, ext = name.partition(".")
    if not dot or ext not in ALLOWED_EXTS:
        raise StoreError(f"refusing tar member {name!r}: unexpected extension (never unpickled)")
    check_key(key)
    return key, ext


def read_member(fd: int, off: int, size: int, expect: str) -> bytes:
    """pread one member's data at ``off``, after checking the header in front of it."""
    buf = os.pread(fd, BLOCK + size, off - BLOCK)
    if len(buf) != BLOCK + size:
        raise StoreError(f"short read of member {expect!r} (truncated shard?)")
    hdr = buf[:BLOCK]
    name = _header_name(hdr)
    if name != expect or hdr[156:157] not in (b"0", b"\0"):
        raise StoreError(f"tar header at {off - BLOCK} names {name!r}, expected {expect!r}")
    try:
        hsize = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise StoreError(f"bad tar header for {expect!r}") from None
    if hsize != size:
        raise StoreError(f"tar header of {expect!r} says {hsize} bytes, index says {size}")
    return buf[BLOCK:]


def decode_member(ext: str, data: bytes):
    if ext.endswith(".npy"):
        return load_npy(data)
    if ext == "cls":
        return int(data.decode("ascii").strip())
    if ext == "json":
        return json.loads(data)
    return bytes(data)


def iter_tar_samples(path, spec: StoreSpec | None = None):
    """Stream the samples of one shard tar as dicts ``{"__key__", ext: decoded}``, checking every
    member name (no paths, no unknown extensions, regular files only) and decoding without pickle."""
    exts = set(member_exts(spec)) if spec is not None else set(ALLOWED_EXTS)
    cur: dict | None = None
    with tarfile.open(path, mode="r:") as tf:
        for ti in tf:
            if not ti.isreg():
                raise StoreError(f"refusing tar member {ti.name!r}: not a regular file")
            key, ext = check_member_name(ti.name)
            if ext not in exts:
                raise StoreError(f"refusing tar member {ti.name!r}: not a member of this store")
            data = tf.extractfile(ti).read()
            if cur is not None and cur["__key__"] != key:
                yield cur
                cur = None
            if cur is None:
                cur = {"__key__": key}
            if ext in cur:
                raise StoreError(f"duplicate member {ti.name!r}")
            cur[ext] = decode_member(ext, data)
    if cur is not None:
        yield cur


class WdsDataset(ScatDataset):
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
        f = _field(ext)
        return read_member(self._fd(int(row["shard"])), int(row[f"off_{f}"]), int(row[f"size_{f}"]),
                           f"{self.keys[i]}.{ext}")

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
