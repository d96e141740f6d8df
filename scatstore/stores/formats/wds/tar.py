"""The tar members of a webdataset store: which names a sample's members have, and reading them
with every name checked (no paths, no unknown extensions, regular files only) and nothing
unpickled. Used by the map-style reader, the bulk reader and the verifier alike."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

from ...base import StoreSpec, check_key
from ...errors import StoreError

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


def load_npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise StoreError(f"refusing a .npy member that is not a plain array: {e}") from None


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
    """pread one member's data at ``off``, after checking the header in front of it (offsets and
    sizes come from the index: checked against the file's size before anything is allocated)."""
    return read_member_at(lambda start, n: os.pread(fd, n, start), os.fstat(fd).st_size, off, size,
                          expect)


def read_member_at(pread, file_size: int, off: int, size: int, expect: str) -> bytes:
    """:func:`read_member` over ``pread(start, n) -> bytes`` of a file of ``file_size`` bytes (an
    object store's ranged GET: one request for the header and the data)."""
    if off < BLOCK or size < 0 or off + size > file_size:
        raise StoreError(f"member {expect!r}: index offset {off} / size {size} lie outside the "
                         "shard file (damaged index or truncated shard)")
    buf = pread(off - BLOCK, BLOCK + size)
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
