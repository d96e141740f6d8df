"""File primitives of the stores: atomic writes (temporary name, fsync, rename), hashing, JSON
bytes, and the removal of temporary files left by killed writers."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from .fs import RemotePath, atomic_put, sha256_remote, sha256_stream

TMP_PREFIX = ".tmp-"          # temporary names; removed by StoreWriter.prepare()


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    if isinstance(path, RemotePath):
        return sha256_remote(path)
    with open(path, "rb", buffering=0) as f:
        return sha256_stream(f, bufsize)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")


def commit_tmp(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and rename it onto ``path`` (atomic on POSIX), then fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> dict:
    """Write ``data`` to ``path`` through a temporary name; return ``{"sha256", "bytes"}``.
    An object-store ``path`` is written with one PUT (objects appear whole or not at all)."""
    if isinstance(path, RemotePath):
        return atomic_put(path, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


class _Sink:
    """What :func:`atomic_writer` yields: ``file`` to write into; ``info`` (``{"sha256",
    "bytes"}`` of what was committed) once the block has ended."""

    def __init__(self, file):
        self.file, self.info = file, None


@contextlib.contextmanager
def atomic_writer(path):
    """A sink whose ``file`` receives ``path``'s content, committed whole at the end of the block
    (temporary name, fsync, rename; an object-store path: built in memory, then one PUT). An
    exception inside the block commits nothing."""
    if isinstance(path, RemotePath):
        sink = _Sink(io.BytesIO())
        yield sink
        sink.info = atomic_put(path, sink.file.getbuffer())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        sink = _Sink(f)
        yield sink
        f.flush()
        os.fsync(f.fileno())
    commit_tmp(tmp, path)
    sink.info = {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def remove_tmp_files(root: Path) -> int:
    """Remove leftovers of killed writers (names starting with ``.tmp-``) under ``root``."""
    n = 0
    if isinstance(root, RemotePath):  # objects are never written under temporary names
        return 0
    if not root.exists():
        return 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.startswith(TMP_PREFIX):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    n += 1
                except FileNotFoundError:
                    pass
    return n
