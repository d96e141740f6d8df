"""The local cache of a remote store: shard objects fetched ahead, kept on local disk.

A store at a URL is read through a *mirror*: a directory of the cache (``cache_dir``, default
``$SCATSTORE_CACHE_DIR`` or ``~/.cache/scatstore``) laid out exactly like the store, so that the
readers of every format (maps, ``preadv``, h5py, zarr-python) read local files as they do for a
local store. ``open`` fetches the manifest and the store's global files (indexes, zarr
metadata: small); a shard's files are fetched when the shard is first needed, or ahead of that
(:meth:`ShardCache.prefetch`, background threads).

Safety when several processes share one cache directory (DataLoader workers, several jobs):
every object is downloaded to a temporary name in the mirror and renamed onto its name once its
size matches the manifest (a reader never sees a partial file), under a per-file ``flock`` (one
process downloads, the others wait and then find it). A mirror whose ``manifest.json`` differs
from the store's (the store was rewritten) is emptied first.

Size limit (``cache_bytes``): after each fetch, shard files are evicted least recently used
first (a use sets the file's mtime, so the order holds across processes), never those of the
shards in use (the loader's current and next windows) and never one used in the last
``EVICT_MIN_AGE_S`` seconds (another process may just have found it). Global
files are never evicted. Memory stays bounded: objects stream to disk in blocks.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path

from .errors import StoreError
from .files import json_bytes
from .fs import RemotePath, call
from .safepath import safe_relpath

EVICT_MIN_AGE_S = 30.0
PART_BYTES = 8 << 20   # a larger object is fetched as concurrent ranged GETs of this size
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCATSTORE_CACHE_DIR") or Path.home() / ".cache" / "scatstore")


class ShardCache:
    """The mirror of the store at ``remote`` (see the module docstring)."""

    def __init__(self, remote: RemotePath, manifest: dict, cache_dir=None,
                 cache_bytes: int | None = None, threads: int = 8):
        self.remote = remote
        self.manifest = manifest
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        tag = hashlib.sha256(f"{remote.protocol}://{remote.fs_path}".encode()).hexdigest()[:16]
        self.root = base / tag
        self.cache_bytes = int(cache_bytes) if cache_bytes else None
        self.threads = max(1, int(threads))
        store = manifest["store"]
        self.shard_files: dict[int, dict] = {}
        self.shard_of: dict[str, int] = {}
        for sh in store.get("shards", []):
            files = {safe_relpath(rel, "shard file"): int(info["bytes"])
                     for rel, info in sh.get("files", {}).items()}
            self.shard_files[int(sh["index"])] = files
            for rel in files:
                self.shard_of[rel] = int(sh["index"])
        self.global_files = {safe_relpath(rel, "store file"): int(info["bytes"])
                             for rel, info in store.get("global_files", {}).items()}
        self._init_runtime()

    def _init_runtime(self):
        self._pool: ThreadPoolExecutor | None = None
        self._parts: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}
        self._lru: OrderedDict = OrderedDict()  # shard -> None, least recently used first
        self._protect: set = set()
        # with no size limit (nothing is ever evicted): the shards this process has seen whole
        # in the mirror, which prefetch, ensure and has_shard then skip without a stat per
        # file (every step of a warm epoch asked for all the shards still ahead: ~20k stats
        # per warm cae epoch, about a quarter of its time)
        self._have: set = set()
        self.fetched_bytes = 0

    def __getstate__(self):
        d = {k: v for k, v in self.__dict__.items()
             if k not in ("_pool", "_parts", "_lock", "_inflight", "_lru", "_protect", "_pid",
                          "_have")}
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._init_runtime()

    @property
    def where(self) -> str:
        return str(self.remote)

    # ---------------------------------------------------------------- setup
    def open(self) -> None:
        """Make the mirror current: the manifest, then every global file (concurrently)."""
        self.root.mkdir(parents=True, exist_ok=True)
        mine = self.root / MANIFEST
        want = json_bytes(self.manifest)
        try:
            same = mine.read_bytes() == want
        except OSError:
            same = False
        if not same:
            self._clear()
            _atomic_local(mine, want)
        futs = [self._submit(rel, size) for rel, size in sorted(self.global_files.items())]
        for f in futs:
            f.result()

    def _clear(self) -> None:
        self._have.clear()
        for dirpath, _, names in os.walk(self.root):
            for n in names:
                if not n.endswith(".lock"):
                    try:
                        os.unlink(os.path.join(dirpath, n))
                    except FileNotFoundError:
                        pass

    # ---------------------------------------------------------------- shards
    def has_shard(self, shard: int) -> bool:
        if int(shard) in self._have:  # (only ever filled without a size limit)
            return True
        whole = all(_size_is(self.root / rel, size)
                    for rel, size in self.shard_files.get(int(shard), {}).items())
        if whole and self.cache_bytes is None:
            self._have.add(int(shard))
        return whole

    def prefetch(self, shards) -> None:
        """Start fetching these shards (in this order) in the background."""
        for s in shards:
            if int(s) in self._have:
                continue
            for rel, size in self.shard_files.get(int(s), {}).items():
                self._submit(rel, size)

    def ensure(self, shards, protect=None) -> None:
        """Return once every file of these shards is in the mirror (fetching what is not)."""
        shards = [int(s) for s in shards]
        if protect is not None:
            self._protect = {int(s) for s in protect} | set(shards)
        futs = [self._submit(rel, size) for s in shards if s not in self._have
                for rel, size in self.shard_files.get(s, {}).items()]
        for f in futs:
            f.result()
        if self.cache_bytes is None:
            self._have.update(shards)
        if self.cache_bytes:  # last use, for every process sharing the cache (eviction order)
            for s in shards:
                for rel in self.shard_files.get(s, {}):
                    try:
                        os.utime(self.root / rel)
                    except OSError:
                        pass
        with self._lock:
            for s in shards:
                self._lru.pop(s, None)
                self._lru[s] = None

    def on_ready(self, shards, fn) -> None:
        """Call ``fn(None)`` once every file of these shards is in the mirror (fetching what is
        not, behind the fetches already queued), or ``fn(exc)`` with the first failure: at once
        when all are there, else in the fetch thread that completes the last one."""
        futs = [self._submit(rel, size) for s in shards
                for rel, size in self.shard_files.get(int(s), {}).items()]
        left = [len(futs)]
        lock = threading.Lock()
        if not futs:
            fn(None)
            return

        def done(f: Future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:  # (a fetch cancelled by close() counts as failed)
                errs = [CancelledError(f"fetch of {self.where} cancelled") if g.cancelled()
                        else g.exception() for g in futs]
                fn(next((e for e in errs if e is not None), None))
        for f in futs:
            f.add_done_callback(done)

    def _submit(self, rel: str, size: int) -> Future:
        path = self.root / rel
        if _size_is(path, size):
            f: Future = Future()
            f.set_result(path)
            return f
        with self._lock:
            if os.getpid() != self._pid:  # forked: our own threads and in-flight set
                self._pool, self._parts, self._inflight, self._pid = None, None, {}, os.getpid()
            f = self._inflight.get(rel)
            if f is not None:
                return f
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="scatstore-fetch")
            f = self._inflight[rel] = self._pool.submit(self._fetch, rel, size)
        return f

    def _fetch(self, rel: str, size: int) -> Path:
        import fcntl

        path = self.root / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lockdir = self.root / ".locks"
            lockdir.mkdir(exist_ok=True)
            lockname = hashlib.sha1(rel.encode()).hexdigest()[:20] + ".lock"
            with open(lockdir / lockname, "a+") as lk:
                fcntl.flock(lk, fcntl.LOCK_EX)  # one process downloads; the others wait here
                if not _size_is(path, size):
                    src = self.remote / rel
                    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
                    try:
                        self._download(src, tmp, size)
                        got = tmp.stat().st_size
                        if got != size:
                            raise StoreError(f"cannot read {src}: {got} bytes, the manifest says "
                                             f"{size} (the store changed or the object is damaged)")
                        os.replace(tmp, path)
                    finally:
                        tmp.unlink(missing_ok=True)
                    with self._lock:
                        self.fetched_bytes += size
            if self.cache_bytes and rel in self.shard_of:
                self._evict()
            return path
        finally:
            with self._lock:
                self._inflight.pop(rel, None)

    def _download(self, src: RemotePath, tmp: Path, size: int) -> None:
        """``src`` into the local file ``tmp``: small objects in one GET, larger ones as ranged
        GETs of ``PART_BYTES`` fetched concurrently and written at their offsets (memory: the
        parts in flight). Parts are queued first-come first-served, so the objects asked for
        first complete first (the loader reads a shard while the next ones arrive)."""
        if size <= 2 * PART_BYTES:
            call(src.fs.get_file, f"read {src}", src.fs_path, str(tmp))
            return
        with self._lock:
            if self._parts is None:
                self._parts = ThreadPoolExecutor(self.threads, thread_name_prefix="scatstore-part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            def part(a: int):
                b = min(a + PART_BYTES, size)
                data = src.read_range(a, b)
                if len(data) != b - a:
                    raise StoreError(f"cannot read {src}: short read at {a} ({len(data)} of "
                                     f"{b - a} bytes; the object changed?)")
                os.pwrite(fd, data, a)
            futs = [self._parts.submit(part, a) for a in range(0, size, PART_BYTES)]
            for f in futs:
                f.result()
        finally:
            os.close(fd)

    def _evict(self) -> None:
        total, entries = 0, []
        for s, files in self.shard_files.items():
            for rel in files:
                try:
                    st = os.stat(self.root / rel)
                except FileNotFoundError:
                    continue
                total += st.st_size
                entries.append((s, rel, st))
        if total <= self.cache_bytes:
            return
        with self._lock:
            protect = set(self._protect) | {self.shard_of.get(r) for r in self._inflight}
        now = time.time()
        entries.sort(key=lambda e: e[2].st_mtime)  # least recently used first (any process)
        for s, rel, st in entries:
            if total <= self.cache_bytes:
                break
            if s in protect or now - st.st_mtime < EVICT_MIN_AGE_S:
                continue
            try:
                os.unlink(self.root / rel)
                total -= st.st_size
            except FileNotFoundError:
                pass

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a store object, from the mirror when it holds the file, else
        one ranged request (random access without fetching the whole shard)."""
        p = self.root / rel
        size = self.shard_files.get(self.shard_of.get(rel, -1), {}).get(rel)
        if size is not None and _size_is(p, size):
            with open(p, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        return (self.remote / rel).read_range(start, end)

    def close(self) -> None:
        for name in ("_pool", "_parts"):
            pool = getattr(self, name)
            setattr(self, name, None)
            if pool is not None and os.getpid() == self._pid:
                pool.shutdown(wait=True, cancel_futures=True)


def _size_is(path: Path, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


def _atomic_local(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
