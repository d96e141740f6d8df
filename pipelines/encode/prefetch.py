"""Decoding: threads of this process, a window ahead of the transform.

Each source item is decoded once per task and framed for each of its variants by
``scatstore.sources.prepare_item`` (the geometry lives there); this module only schedules it.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

# Decoding and resizing one ~500×375 JPEG costs ~1.1 ms of CPU (docs/benchmarks.md, encode), an
# eighth or less of its transform: a decode thread per four cores (two at least) keeps well ahead
# of the transform threads of a process on all of them (in-process, or the workers of a threaded
# dask LocalCluster); more would only preempt the transform. Idle threads cost nothing: a
# worker process that transforms on fewer cores still decodes at most a window ahead.
DECODE_THREADS = max(2, -(-(os.cpu_count() or 1) // 4))
_DECODE = {"pid": None, "pool": None}
_DECODE_LOCK = threading.Lock()


def _decode_thread_init() -> None:
    # The resampler is a torch op. In a thread left at torch's default (all cores) each call
    # opens an OpenMP team of its own: 7 ms per 224² resize instead of 0.33 ms, and spinning
    # threads that fight the transform's.
    from scatstore.transforms._torch_backend import set_thread_openmp_threads

    set_thread_openmp_threads(1)


def decode_pool() -> ThreadPoolExecutor:
    """This process's decode threads, kept across tasks (a dask or pool worker runs many)."""
    with _DECODE_LOCK:
        if _DECODE["pid"] != os.getpid():  # threads do not survive a fork: start new ones
            _DECODE["pool"] = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="scatstore-decode",
                                                 initializer=_decode_thread_init)
            _DECODE["pid"] = os.getpid()
        return _DECODE["pool"]


def _prepare(task, item, variants: list[int]) -> tuple[list, float]:
    """``([(pixels, meta, hw), ...], CPU seconds of this thread)``; raises DecodeError."""
    from scatstore.sources import prepare_item

    t0 = time.thread_time()
    out = prepare_item(os.path.join(task.src_root, item.path), item, variants, task.frame)
    return out, time.thread_time() - t0


def prepared(tasks: list, window: int) -> Iterator[tuple]:
    """Prepared samples of ``tasks``, in slot order: ``(task, slot, item, variant, result)``, where
    result is ``(pixels, meta, hw, decode CPU seconds)`` or a DecodeError.

    One decode job per source item and task (its variants are consecutive slots and share the
    decode), submitted up to ``window`` slots ahead, across task boundaries: the next shard is
    decoded while this one is transformed and written."""
    from scatstore.sources import DecodeError

    pool = decode_pool()

    def groups():
        for task in tasks:
            i, n = 0, len(task.slots)
            while i < n:
                j = i + 1
                while j < n and task.items[j].key == task.items[i].key:
                    j += 1
                yield task, i, j
                i = j

    pending: deque = deque()
    ahead = 0
    source = groups()
    try:
        while True:
            while ahead < window:
                nxt = next(source, None)
                if nxt is None:
                    break
                task, i, j = nxt
                pending.append((task, i, j, pool.submit(_prepare, task, task.items[i],
                                                        task.variants[i:j])))
                ahead += j - i
            if not pending:
                return
            task, i, j, fut = pending.popleft()
            ahead -= j - i
            try:
                results, seconds = fut.result()
            except DecodeError as exc:
                for k in range(i, j):
                    yield task, task.slots[k], task.items[k], task.variants[k], exc
                continue
            for n, k in enumerate(range(i, j)):
                # the decode time is counted once per item, on its first variant
                yield task, task.slots[k], task.items[k], task.variants[k], \
                    (*results[n], seconds if n == 0 else 0.0)
    finally:
        for *_, fut in pending:  # an error stopped the job: drop the work queued for it
            fut.cancel()
