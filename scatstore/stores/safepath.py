"""Names and paths read from a store are data, never trusted as paths.

Every key, file name or relative path that comes out of a store (sample keys, ``meta`` fields,
manifest fields such as ``store.index`` or the shard file lists, tar member names) goes through
one of these before it touches the filesystem: a safe name is one plain file-name component; a
safe relative path is a run of safe components below a root, which it cannot leave (no ``..``,
no absolute path, no backslash, no NUL, no empty or hidden component, symlinks resolved).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .errors import StoreError

NAME_MAX = 200  # bytes; below every filesystem's 255 with room for a suffix such as ".png"
_NAME_RE = re.compile(r"[A-Za-z0-9_\-+=,@~:.]+")
KEY_MAX = 90                  # ustar name field is 100 bytes: KEY + ".x.npy"
KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-+=,@~:"
_KEY_RE = re.compile(f"[{re.escape(KEY_CHARS)}]+")
_KEY_BYTES = np.zeros(256, dtype=bool)
_KEY_BYTES[np.frombuffer(KEY_CHARS.encode(), dtype=np.uint8)] = True


def check_key(key) -> str:
    """A sample key: 1..KEY_MAX characters of ``KEY_CHARS`` (no dots, slashes or spaces), so it
    is a safe file-name stem and a valid tar member prefix. ``StoreError`` otherwise."""
    if not isinstance(key, str) or not key or len(key) > KEY_MAX or not _KEY_RE.fullmatch(key):
        raise StoreError(f"invalid sample key {key!r}: keys are 1..{KEY_MAX} characters of "
                         "[A-Za-z0-9_-+=,@~:] (no dots, slashes or spaces)")
    return key


def safe_name(name, what: str = "name") -> str:
    """``name`` when it is one plain file-name component (ASCII letters, digits, ``_-+=,@~:.``,
    not starting with a dot, at most ``NAME_MAX`` bytes); else ``StoreError``."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > NAME_MAX \
            or name.startswith(".") or not _NAME_RE.fullmatch(name):
        raise StoreError(f"refusing {what} {name!r} read from the store: not a plain file name "
                         "(names read from a store are never used as paths)")
    return name


def safe_relpath(rel, what: str = "path") -> str:
    """``rel`` when it is a relative POSIX path of safe components (see :func:`safe_name`)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        raise StoreError(f"refusing {what} {rel!r} read from the store: a path outside the store")
    for part in rel.split("/"):
        try:
            safe_name(part)
        except StoreError:
            raise StoreError(f"refusing {what} {rel!r} read from the store: a path outside the "
                             "store or with an unsafe component") from None
    return rel


def inside(root, rel, what: str = "path") -> Path:
    """``root / rel`` for a safe ``rel`` whose real path (symlinks resolved) stays under ``root``
    (an object-store root has no symlinks: a safe ``rel`` is enough)."""
    from .fs import RemotePath

    if isinstance(root, RemotePath):
        return root / safe_relpath(rel, what)
    root = Path(root)
    p = root / safe_relpath(rel, what)
    real, base = os.path.realpath(p), os.path.realpath(root)
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        raise StoreError(f"refusing {what} {rel!r}: it resolves outside the store ({real})")
    return p


def check_key_array(keys: np.ndarray, where) -> None:
    """Every row of a fixed-width byte array of sample keys (``S`` dtype or uint8 rows, NUL
    padded) is a valid key (:func:`check_key`) — checked in one vectorised pass, so that a store
    whose index was edited cannot smuggle ``../x`` into a name. ``StoreError`` naming the first
    bad key otherwise."""
    a = np.ascontiguousarray(keys)
    if a.dtype.kind == "S":
        width = a.dtype.itemsize
        a = a.view(np.uint8).reshape(len(keys), width) if len(keys) else np.zeros((0, width), np.uint8)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise StoreError(f"{where}: the key index is not a byte array")
    if not len(a):
        return
    nul = a == 0
    # NUL padding only at the end: once a row has a NUL, everything after it is NUL
    after = np.maximum.accumulate(nul, axis=1)
    ok = (_KEY_BYTES[a] | nul).all(axis=1) & ~nul[:, 0] & ~(after & ~nul).any(axis=1)
    if a.shape[1] > KEY_MAX:
        ok &= nul[:, KEY_MAX:].all(axis=1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        key = bytes(a[i]).rstrip(b"\0")
        raise StoreError(f"{where}: sample key {key!r} is not a valid key (an edited index?): "
                         "refusing the store")
