"""The job directory ``OUT/.scatstore/``: the only module that reads or writes it.

- ``lock``: an advisory ``flock`` held by the run (see :func:`lock_out`); in an object store
  (``s3://…``) a lock *object* ``lock.json`` created with a conditional PUT, refreshed by a
  heartbeat and expiring with its holder (:class:`ObjectLock`).
- ``job.json``: the job's parameters and their fingerprint; a re-run must match them.
- ``shards/shard-NNNNNN.json``: a shard's *notes* (its rejected source files and quality sums),
  written just before the store commits the shard. The commit itself is the store's record
  (``_store/shard-NNNNNN.json``, ``StoreWriter.write_shard``): a shard is done when that record
  loads, its files hash to it (``check_shard``) and its notes are readable. Job directories of
  earlier versions kept a copy of the record in the notes: it is ignored, they resume as they are.
- ``coefficient_codec.json``: the fitted coefficient codec of a ``dtype tc`` job, written once
  before any shard (a resumed job reuses it, never refits: ``tcfit``).
- ``cancel/RUN``: created when the run ``RUN`` is interrupted; shard tasks look for it between
  batches (a file in OUT is what every worker of the job sees: threads, worker processes, the
  workers of a remote dask cluster sharing OUT).

Every file is written through ``scatstore.stores.base.atomic_write_bytes`` (temporary name
``.tmp-NAME-PID``, removed by the writer's ``prepare`` if a killed run left it); the
``.NAME.tmp-PID`` leftovers of earlier versions' own writer are removed when OUT is opened.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

from scatstore.stores.fs import RemotePath, as_path, each_of

from .options import EncodeError

JOB_DIR = ".scatstore"
JOB_FILE = "job.json"
SHARD_NOTES = "shards"
LOCK_FILE = "lock"
LOCK_OBJECT = "lock.json"
CANCEL_DIR = "cancel"
# an object-store lock not refreshed for this long is stale (its holder died without deleting it)
LOCK_TTL_S = float(os.environ.get("SCATSTORE_LOCK_TTL", "60"))
CODEC_FILE = "coefficient_codec.json"


def fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _write_text(path: Path, text: str) -> None:
    from scatstore.stores.base import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def notes_path(out: Path | str, index: int) -> Path:
    return as_path(out) / JOB_DIR / SHARD_NOTES / f"shard-{index:06d}.json"


def write_notes(out: Path | str, index: int, rejected: list[dict], quality: dict) -> None:
    """A shard's rejected files and quality sums, written before the store commits the shard."""
    _write_text(notes_path(out, index),
                json.dumps({"rejected": rejected, "quality": quality}, sort_keys=True))


def read_notes(out: Path | str, index: int) -> dict | None:
    try:
        notes = json.loads(notes_path(out, index).read_text())
        if not isinstance(notes.get("rejected"), list):
            return None
        return {"rejected": notes["rejected"], "quality": notes.get("quality") or {}}
    except (OSError, ValueError, AttributeError):
        return None


def codec_record_path(out: Path | str) -> Path:
    return as_path(out) / JOB_DIR / CODEC_FILE


def write_codec_record(out: Path | str, record: dict) -> None:
    _write_text(codec_record_path(out), json.dumps(record, sort_keys=True))


def read_codec_record(out: Path | str) -> dict | None:
    """The job's coefficient-codec record, or None when none was written yet; an unreadable
    one is an error (refitting could change the bytes of committed shards)."""
    p = codec_record_path(out)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise EncodeError(f"{p} is unreadable ({exc}); delete OUT to start over") from None


def cancel_path(out: Path | str, run: str) -> Path:
    return as_path(out) / JOB_DIR / CANCEL_DIR / run


def cancel_run(out: Path | str, run: str) -> None:
    """Tell the running shard tasks of ``run`` to stop (they look between batches)."""
    path = cancel_path(out, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


_CANCEL_SEEN: dict = {}
CANCEL_POLL_S = 1.0  # an object store is asked at most this often (a request costs ~10-50 ms)


def is_cancelled(out: Path | str, run: str) -> bool:
    path = cancel_path(out, run)
    if not isinstance(path, RemotePath):
        return path.exists()
    now = time.monotonic()
    last = _CANCEL_SEEN.get(str(path))
    if last is not None and (last[1] or now - last[0] < CANCEL_POLL_S):
        return last[1]
    found = path.exists()
    _CANCEL_SEEN[str(path)] = (now, found)
    return found


def clear_cancel(out: Path | str, run: str) -> None:
    cancel_path(out, run).unlink(missing_ok=True)


def open_out(out: Path, params: dict):
    """Create, probe and lock OUT, then check or write ``job.json``. Returns (whether OUT already
    holds part of this very job, the lock: hold it while the run writes; ``close()`` releases).

    Everything that can be checked without OUT is checked before this is called."""
    if isinstance(out, RemotePath):
        if out.is_file():
            raise EncodeError(f"OUT {out} is an object, not a prefix")
        lock = ObjectLock.acquire(out / JOB_DIR / LOCK_OBJECT, out)
        try:
            return _check_job_file(out, params), lock
        except BaseException:
            lock.close()
            raise
    if out.exists() and not out.is_dir():
        raise EncodeError(f"OUT {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_DIR / SHARD_NOTES).mkdir(parents=True, exist_ok=True)
        probe = out / JOB_DIR / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EncodeError(f"OUT {out} is not writable: {exc.strerror or exc}") from exc
    lock = lock_out(out)  # before job.json: two new jobs racing for one OUT never mix
    try:
        _remove_old_temporaries(out)
        return _check_job_file(out, params), lock
    except BaseException:
        lock.close()
        raise


# Temporary names of the engine's own atomic writer before it used the stores' one
# (``.NAME.tmp-PID``): a job dir of that version killed mid-write may hold some.
_OLD_TMP = re.compile(r"^\..+\.tmp-\d+$")


def _remove_old_temporaries(out: Path) -> None:
    if not (out / JOB_DIR / JOB_FILE).exists():  # not (yet) a job's OUT: touch nothing
        return
    for d in (out, out / JOB_DIR, out / JOB_DIR / SHARD_NOTES):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            if _OLD_TMP.match(name):
                (d / name).unlink(missing_ok=True)


def _check_job_file(out: Path, params: dict) -> bool:
    job_file = out / JOB_DIR / JOB_FILE
    if job_file.exists():
        try:
            previous = json.loads(job_file.read_text())
        except (OSError, ValueError) as exc:
            raise EncodeError(f"{job_file} is unreadable ({exc}); remove OUT or choose another") from exc
        if previous.get("fingerprint") != fingerprint(params):
            diff = sorted(k for k in set(params) | set(previous.get("params", {}))
                          if params.get(k) != previous.get("params", {}).get(k))
            raise EncodeError(
                f"OUT {out} holds a different job's data (differs in: {', '.join(diff)}); "
                "use a new OUT or delete this one")
        return True
    others = [p.name for p in out.iterdir() if p.name not in (JOB_DIR, f"{JOB_DIR}/")]
    if others:
        raise EncodeError(f"OUT {out} is not empty and holds no scatstore job "
                          f"(found {', '.join(sorted(others)[:3])}…); choose an empty directory")
    _write_text(job_file, json.dumps({"fingerprint": fingerprint(params), "params": params},
                                     indent=2, sort_keys=True))
    return False


def lock_out(out: Path):
    """Hold OUT for this run: a second encode into the same OUT at the same time is refused.

    An advisory ``flock`` on ``OUT/.scatstore/lock``: the kernel drops it when the process ends
    however it ends, so a killed job never leaves OUT locked. Worker processes never hold it:
    they die with the run that does (``signals.watch_parent``). On file systems without working
    flock (some NFS mounts) the lock may not hold across machines."""
    import fcntl

    f = open(out / JOB_DIR / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise EncodeError(f"OUT {out} is being written by another encode ({holder}); wait for "
                          "it to end, or stop it and re-run to resume") from None
    except OSError:
        return f  # no flock here: go on unlocked
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    return f


class ObjectLock:
    """The lock of an OUT in an object store: the object ``OUT/.scatstore/lock.json`` holding
    ``{token, pid, host, since, expires}``.

    Taken with a conditional PUT (``If-None-Match: *``: of two jobs racing, exactly one creates
    it). A heartbeat thread rewrites it every ``LOCK_TTL_S / 4`` s with a later ``expires``; the
    holder deletes it when the run ends. A job killed with SIGKILL cannot delete it: the next job
    takes it over once ``expires`` has passed, or at once when the lock names a process of this
    very host that no longer exists. ``SCATSTORE_LOCK_TTL`` sets the TTL (60 s)."""

    lost = False  # set when another job holds the lock now (see _beat)

    def __init__(self, path: RemotePath, token: str):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="scatstore-lock")
        self._thread.start()

    @staticmethod
    def _body(token: str) -> bytes:
        now = time.time()
        return json.dumps({"token": token, "pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "expires": now + LOCK_TTL_S}).encode()

    @classmethod
    def acquire(cls, path: RemotePath, out) -> "ObjectLock":
        token = os.urandom(8).hex()
        for _ in range(3):
            if path.create_exclusive(cls._body(token)):
                return cls(path, token)
            try:
                held = json.loads(path.read_text())
            except (OSError, ValueError):
                held = {}
            if not cls._stale(held):
                raise EncodeError(
                    f"OUT {out} is being written by another encode (pid {held.get('pid')} on "
                    f"{held.get('host')}, since {held.get('since')}); wait for it to end, or stop "
                    f"it and re-run to resume (a killed job's lock expires {LOCK_TTL_S:.0f} s "
                    "after its last heartbeat)")
            path.unlink(missing_ok=True)  # stale: its holder is gone
        raise EncodeError(f"OUT {out}: could not take the lock {path}; retry")

    @staticmethod
    def _stale(held: dict) -> bool:
        if not isinstance(held, dict) or "expires" not in held:
            return True
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        try:
            return float(held["expires"]) < time.time()
        except (TypeError, ValueError):
            return True

    def _beat(self):
        while not self._stop.wait(LOCK_TTL_S / 4):
            try:
                held = json.loads(self.path.read_text())
                if held.get("token") != self.token:
                    # another job took the prefix over (this one was stopped past the TTL):
                    # never overwrite its lock; the shard writes that follow are that job's
                    # to check (its resume re-hashes every shard)
                    self.lost = True
                    return
                self.path.write_bytes(self._body(self.token))
            except Exception:  # noqa: BLE001 - a missed beat; the next one retries
                pass

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            held = json.loads(self.path.read_text())
            if held.get("token") == self.token:
                self.path.unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 - gone already, or unreachable: it expires
            pass


def load_done(out: Path, writer, n_shards: int) -> dict[int, dict]:
    """Committed shards whose files still hash to their records: index -> {record, rejected,
    quality}. In an object store the shards are checked concurrently, by their objects' sizes
    (``StoreWriter.check_shard``: nothing is downloaded)."""
    def check(index):
        notes = read_notes(out, index)
        if notes is None:
            return None
        record = writer.load_record(index)
        if record is not None and writer.check_shard(record):
            return {"record": record.to_dict(), **notes}
        return None
    found = each_of(check, range(n_shards), isinstance(as_path(out), RemotePath))
    return {i: d for i, d in enumerate(found) if d is not None}


def count_committed(out: Path, writer, n_shards: int) -> int:
    return sum(1 for i in range(n_shards)
               if writer.load_record(i) is not None and notes_path(out, i).exists())
