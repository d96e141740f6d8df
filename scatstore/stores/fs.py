"""Where a store lives: a local directory or an object-store / HTTP URL (one place for both).

``as_path(p)`` is the only function that turns a path or URL given by a user into something the
stores use: a local path stays a plain :class:`pathlib.Path` (the OS does the I/O, exactly as
before: the fast path), a URL (``s3://``, ``gs://``, ``http(s)://``, any fsspec protocol) becomes a
:class:`RemotePath`, the subset of the ``pathlib.Path`` API that the writers and the job use, over
an fsspec filesystem. Credentials come only from the usual environment and configuration files of
the filesystem's library (``AWS_*`` variables, ``~/.aws``, ``AWS_ENDPOINT_URL``, gcloud's
application default); a ``user:secret@`` part or a signed query string in a URL is never
printed: every message, manifest field and log line shows :func:`redact` of the URL.

Object stores have no rename and no partial objects: a PUT makes the object appear whole or not
at all, so :func:`atomic_put` writes the final name directly (no temporary name), and the writers'
ordering (a shard's files, then its record, the manifest last) carries over unchanged.

Every remote call goes through :func:`call`: transient failures (HTTP 5xx / 429, throttling,
timeouts, dropped connections) are retried with exponential backoff and jitter; permanent ones
(missing object, 403) and exhausted retries become one-line ``StoreError``s naming the object.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import threading
import time
from pathlib import Path, PurePosixPath

from .errors import StoreError

_URL_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
RETRIES = int(os.environ.get("SCATSTORE_REMOTE_RETRIES", "6"))
BACKOFF_S = float(os.environ.get("SCATSTORE_REMOTE_BACKOFF", "0.2"))


def is_url(p) -> bool:
    """Whether ``p`` names a remote location (``PROTO://…``, not ``file://``)."""
    if isinstance(p, RemotePath):
        return True
    m = _URL_RE.match(str(p)) if isinstance(p, str) else None
    return bool(m) and m.group(1).lower() not in ("file", "local")


def redact(text) -> str:
    """``text`` with URL credentials removed: ``s3://key:secret@b/x`` -> ``s3://***@b/x``; query
    strings of URLs (signed URLs carry their signature there) -> ``?***``."""
    s = str(text)
    s = re.sub(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]+@", r"\1***@", s)
    return re.sub(r"(://[^\s?]*)\?[^\s'\"]*", r"\1?***", s)


def as_path(p):
    """A :class:`pathlib.Path` for a local path (``file://`` stripped), a :class:`RemotePath` for
    a URL."""
    if isinstance(p, (Path, RemotePath)):
        return p
    s = os.fspath(p)
    if not is_url(s):
        return Path(s[7:] if s.startswith("file://") else s)
    return RemotePath.from_url(s)


# ------------------------------------------------------------------------------------ filesystems
_FS: dict = {}
_FS_LOCK = threading.Lock()


def _filesystem(protocol: str, netloc_opts: tuple):
    """One fsspec filesystem per protocol (and per process: fsspec's instance cache is per
    process too). Options come from the environment only."""
    key = (protocol, netloc_opts, os.getpid())
    with _FS_LOCK:
        fs = _FS.get(key)
        if fs is None:
            import fsspec

            opts = dict(netloc_opts)
            if protocol in ("s3", "s3a"):
                # s3fs retries 5xx a few times itself; ours come on top (call())
                opts.setdefault("config_kwargs", {"retries": {"max_attempts": 2, "mode": "standard"}})
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                if endpoint:
                    opts.setdefault("endpoint_url", endpoint)
            try:
                fs = _FS[key] = fsspec.filesystem(protocol, **opts)
            except (ImportError, ValueError) as e:  # a protocol whose package is not installed
                raise StoreError(f"cannot use {protocol}:// URLs: {e}".splitlines()[0]) from None
        return fs


def _split(url: str) -> tuple[str, str, str]:
    """(protocol, path for the filesystem, redacted URL)."""
    proto = _URL_RE.match(url).group(1).lower()
    if proto in ("http", "https"):
        return proto, url.rstrip("/"), redact(url.rstrip("/"))
    rest = url[len(proto) + 3:]
    if "@" in rest.split("/", 1)[0]:
        raise StoreError(f"{redact(url)}: credentials in the URL are not used; give them through "
                         "the environment or the usual configuration files")
    return proto, rest.strip("/"), f"{proto}://{rest.strip('/')}"


# ------------------------------------------------------------------------------------ errors, retry
def _status(exc) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        v = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    m = re.search(r"\b(5\d\d|429|403|404)\b", str(exc))
    return int(m.group(1)) if m else None


def _transient(exc) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        StoreError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    st = _status(exc)
    if st is not None:
        return st >= 500 or st == 429
    name = type(exc).__name__
    return any(w in name for w in ("Timeout", "Connection", "Disconnected", "Payload", "Throttl",
                                   "SlowDown", "EndpointConnection", "ServerError"))


def _reason(exc) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such object"
    st = _status(exc)
    if isinstance(exc, PermissionError) or st == 403:
        return "access denied (403)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact(f"{type(exc).__name__}{': ' + first[:200] if first else ''}")


def call(fn, what: str, *args, **kw):
    """``fn(*args, **kw)`` with retries of transient failures; ``StoreError`` naming ``what``
    (a redacted URL) otherwise. ``FileNotFoundError`` passes through when ``kw`` has
    ``_missing_ok=True`` (callers that test for existence)."""
    missing_ok = kw.pop("_missing_ok", False)
    delay = BACKOFF_S
    for attempt in range(RETRIES + 1):
        try:
            return fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - classified below
            if missing_ok and isinstance(exc, FileNotFoundError):
                raise
            if _transient(exc) and attempt < RETRIES:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                continue
            tail = f" (after {attempt + 1} attempts)" if attempt else ""
            raise StoreError(f"cannot {what}: {_reason(exc)}{tail}") from None


# ------------------------------------------------------------------------------------ RemotePath
class _Stat:
    def __init__(self, size: int, mtime: float = 0.0):
        self.st_size, self.st_mtime = int(size), float(mtime)


class RemotePath:
    """A location in an object store, with the part of ``pathlib.Path`` the stores use.

    ``str()`` is the redacted URL. Objects only: "directories" are key prefixes, ``mkdir`` does
    nothing, ``is_dir`` is true for a prefix holding objects. Writes are single PUTs."""

    def __init__(self, protocol: str, fs_path: str, fs=None):
        self.protocol = protocol
        self.fs_path = fs_path
        self._fs = fs

    @classmethod
    def from_url(cls, url: str) -> "RemotePath":
        proto, path, _ = _split(url)
        return cls(proto, path)

    # --------------------------------------------------------------- naming
    @property
    def fs(self):
        if self._fs is None:
            self._fs = _filesystem(self.protocol, ())
        return self._fs

    @property
    def url(self) -> str:
        if self.protocol in ("http", "https"):
            return redact(self.fs_path)
        return f"{self.protocol}://{self.fs_path}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __fspath__(self):  # pragma: no cover - a RemotePath is never handed to the OS
        raise TypeError(f"{self.url} is a remote location, not a local path")

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and (self.protocol, self.fs_path) == \
            (other.protocol, other.fs_path)

    def __hash__(self) -> int:
        return hash((self.protocol, self.fs_path))

    def __reduce__(self):
        return (RemotePath, (self.protocol, self.fs_path))

    def __truediv__(self, rel) -> "RemotePath":
        rel = str(rel).strip("/")
        return RemotePath(self.protocol, f"{self.fs_path}/{rel}" if rel else self.fs_path, self._fs)

    @property
    def name(self) -> str:
        return PurePosixPath(self.fs_path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.fs_path).suffix

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.protocol, self.fs_path.rsplit("/", 1)[0], self._fs)

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        return PurePosixPath(self.fs_path).relative_to(other.fs_path)

    # --------------------------------------------------------------- queries
    def _info(self):
        try:
            return call(self.fs.info, f"read {self.url}", self.fs_path, _missing_ok=True)
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        """An object, or a prefix holding objects (one request: s3fs's ``info`` lists a prefix
        that is not an object)."""
        return self._info() is not None

    def is_file(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "file"

    def is_dir(self) -> bool:
        if self.protocol in ("http", "https"):
            return False
        try:
            return bool(call(self.fs.ls, f"list {self.url}", self.fs_path, detail=False,
                             _missing_ok=True))
        except FileNotFoundError:
            return False

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> _Stat:
        info = self._info()
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.url)
        return _Stat(info.get("size") or 0)

    def iterdir(self):
        try:
            names = call(self.fs.ls, f"list {self.url}", self.fs_path, detail=False,
                         _missing_ok=True)
        except FileNotFoundError:
            return iter(())
        base = self.fs_path.rstrip("/")
        return iter(self / n[len(base) + 1:] for n in names if n.rstrip("/") != base)

    def rglob_files(self) -> list:
        """Every object under this prefix, as paths relative to it."""
        try:
            names = call(self.fs.find, f"list {self.url}", self.fs_path)
        except StoreError:
            return []
        base = self.fs_path.rstrip("/") + "/"
        return [n[len(base):] for n in names if n.startswith(base)]

    # --------------------------------------------------------------- data
    def read_bytes(self) -> bytes:
        try:
            return call(self.fs.cat_file, f"read {self.url}", self.fs_path, _missing_ok=True)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.url) from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (one ranged GET; a server that ignores ``Range``
        and sends the whole object is answered by slicing it)."""
        data = call(self.fs.cat_file, f"read {self.url} [{start}:{end}]", self.fs_path,
                    start=start, end=end)
        if len(data) > end - start:
            data = data[start:end]
        return data

    def write_bytes(self, data) -> int:
        atomic_put(self, data)
        return len(data)

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode())

    def touch(self) -> None:
        """An empty object (a marker)."""
        atomic_put(self, b"")

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: nothing to do."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            call(self.fs.rm_file, f"delete {self.url}", self.fs_path, _missing_ok=True)
        except FileNotFoundError:
            if not missing_ok:
                raise
        self.fs.invalidate_cache(self.fs_path)

    def create_exclusive(self, data: bytes) -> bool:
        """PUT ``data`` only if no object has this name (S3 ``If-None-Match: *``); False when one
        exists. Stores without conditional writes answer with a read-check-write (documented
        race window)."""
        try:
            call(self.fs.pipe_file, f"create {self.url}", self.fs_path, bytes(data), mode="create")
            return True
        except StoreError as e:
            if "412" in str(e) or "PreconditionFailed" in str(e) or "exists" in str(e).lower():
                return False
            raise
        except (TypeError, NotImplementedError):  # pragma: no cover - protocol without mode=
            if self.is_file():
                return False
            atomic_put(self, data)
            return True


def zarr_store(path: RemotePath):
    """zarr's own remote store (``zarr.storage.FsspecStore``, read-only) at ``path``: zarr reads
    a shard's index and then only the chunks asked for, with ranged requests."""
    from zarr.storage import FsspecStore

    opts: dict = {}
    if path.protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
    url = path.fs_path if path.protocol in ("http", "https") else f"{path.protocol}://{path.fs_path}"
    try:
        return FsspecStore.from_url(url, storage_options=opts, read_only=True)
    except (ImportError, ValueError, TypeError) as e:
        raise StoreError(f"cannot open {path} with zarr: {e}".splitlines()[0]) from None


REQUEST_THREADS = 8  # requests in flight at once for a batch of independent ones (each_of)


def each_of(fn, items, remote: bool = True) -> list:
    """``[fn(x) for x in items]``; with ``remote``, the calls run concurrently (up to
    ``REQUEST_THREADS``: independent object-store requests cost a round trip each, ~5-50 ms, so
    a chain of them dominates a short job's start and end). Results come back in order; the
    first exception (in ``items`` order) is raised once every call has ended, so nothing is
    still in flight when the caller goes on (a manifest written after its files)."""
    items = list(items)
    if not remote or len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(REQUEST_THREADS, len(items)),
                            thread_name_prefix="scatstore-request") as ex:
        futs = [ex.submit(fn, x) for x in items]
    return [f.result() for f in futs]


def atomic_put(path: RemotePath, data) -> dict:
    """One PUT of ``data`` under ``path`` (objects appear whole or not at all)."""
    data = bytes(data)
    call(path.fs.pipe_file, f"write {path.url}", path.fs_path, data)
    path.fs.invalidate_cache(path.fs_path)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def sha256_stream(f, bufsize: int) -> str:
    """sha256 of what the binary file ``f`` reads to its end, ``bufsize`` bytes at a time."""
    h = hashlib.sha256()
    while True:
        b = f.read(bufsize)
        if not b:
            break
        h.update(b)
    return h.hexdigest()


def sha256_remote(path: RemotePath, bufsize: int = 8 << 20) -> str:
    """sha256 of an object, streamed (bounded memory; afresh on each attempt)."""
    def run():
        with path.fs.open(path.fs_path, "rb", block_size=bufsize) as f:
            return sha256_stream(f, bufsize)
    return call(run, f"read {path.url}")
