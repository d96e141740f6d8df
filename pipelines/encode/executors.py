"""Where the shard tasks run. Every executor has the signature

    run(cfg, tasks, progress) -> Iterator[ShardResult]

(``progress(n)``: n more slots done) and is picked from :data:`EXECUTORS` by :func:`executor_for`:

- ``in-process`` (``workers=1``): one pipeline over all shards. Decode threads work a window
  ahead, across shard boundaries; transform threads (as many as the caller's torch threads, each
  a single-threaded transform pipeline) take the batches of any shard as they come; a writer
  thread writes each shard once all its batches are done, while the next ones are transformed.
- ``processes`` (``--workers N``): a spawn process pool running :func:`encode_shard` per shard;
  the workers die with the run (``signals.worker_init``).
- ``dask`` (``--scheduler``): one dask task per shard on a LocalCluster or a running cluster.

On an exception (Ctrl-C, SIGTERM, an error) each cancels the run (``jobdir.cancel_run``): shard
tasks still running stop at their next batch.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import jobdir, signals
from .prefetch import prepared
from .shards import ShardEncoder, ShardResult, ShardTask, encode_shard, window


class TransformThreads:
    """``n`` threads that run batch jobs, each with one OpenMP thread, so that each runs one
    single-threaded transform pipeline (the transform sizes its pipelines by the calling
    thread's torch thread count).

    Why not one thread driving all cores (the transform's own ``torch.get_num_threads()``
    pipelines): that thread converts, checks and collects between batches while the cores wait
    (~4 % of the time, plus the tail of each batch), and its 2-thread OpenMP regions leave a
    worker spinning ~6 ms after each (libgomp's spin-wait), ~0.5-0.9 ms of CPU per image taken
    from the transform. Here a thread's serial steps overlap the other threads' transforms.
    Jobs that start once no more will come (the job's last batches) run on all ``n`` OpenMP
    threads, so the end of the job keeps every core busy."""

    def __init__(self, n: int):
        import queue

        self.n = n
        self.jobs: queue.Queue = queue.Queue(maxsize=n)  # backpressure on the producer
        self.error: BaseException | None = None
        self.finishing = False
        self.lock = threading.Lock()
        self.queued = 0  # jobs submitted and not yet taken
        self.threads = [threading.Thread(target=self._loop, name=f"scatstore-transform-{i}",
                                         daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        from scatstore.transforms._torch_backend import set_thread_openmp_threads

        set_thread_openmp_threads(1)
        wide = False
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.lock:
                self.queued -= 1
                last = self.finishing and self.queued == 0
            if last and not wide:
                set_thread_openmp_threads(self.n)
                wide = True
            if self.error is None:
                try:
                    job()
                except BaseException as exc:  # handed to the producer, which re-raises it
                    self.error = exc

    def submit(self, job: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        with self.lock:
            self.queued += 1
        self.jobs.put(job)

    def finish(self) -> None:
        """No more jobs will be submitted; wait for the threads to end."""
        with self.lock:
            self.finishing = True
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error


def run_in_process(cfg, tasks: list[ShardTask], progress: Callable[[int], None]
                   ) -> Iterator[ShardResult]:
    """All tasks in this process, as one pipeline (module docstring). Each shard is still
    written whole by one call; shard results come back in shard order."""
    import torch

    n = tasks[0].torch_threads or torch.get_num_threads()
    progress_lock = threading.Lock()

    def on_progress(k: int) -> None:
        with progress_lock:  # called from the transform threads
            progress(k)

    writes: deque = deque()
    futures: dict[int, Any] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="scatstore-write") as writer:
        def complete(enc: ShardEncoder) -> None:
            futures[enc.task.index] = writer.submit(enc.write)

        pool = TransformThreads(n)
        try:
            enc = None
            for task, slot, item, variant, result in prepared(tasks, window(tasks[0])):
                if enc is None or enc.task is not task:
                    if enc is not None:
                        enc.close()
                    enc = ShardEncoder(task, on_progress, pool.submit, complete)
                    writes.append(task.index)
                enc.add(slot, item, variant, result)
                # hand back written shards in order as soon as they are done
                while writes and writes[0] in futures and futures[writes[0]].done():
                    yield futures.pop(writes.popleft()).result()
            if enc is not None:
                enc.close()
        finally:
            pool.finish()
        for index in writes:
            yield futures.pop(index).result()


def run_process_pool(cfg, tasks: list[ShardTask], progress: Callable[[int], None]
                     ) -> Iterator[ShardResult]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent may hold torch thread pools and open file handles.
    ex = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn"),
                             initializer=signals.worker_init, initargs=(os.getpid(),))
    try:
        futures = [ex.submit(encode_shard, t) for t in tasks]
        for fut in as_completed(futures):
            result = fut.result()
            progress(result.n_items)
            yield result
    except BaseException:
        jobdir.cancel_run(cfg.out, tasks[0].run)
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def run_dask(cfg, tasks: list[ShardTask], progress: Callable[[int], None]
             ) -> Iterator[ShardResult]:
    with signals.stop_signals_as_flag() as stop:
        yield from _run_dask_tasks(cfg, tasks, progress, stop)


def _run_dask_tasks(cfg, tasks: list[ShardTask], progress, stop: signals.StopRequest
                    ) -> Iterator[ShardResult]:
    from distributed import Client, as_completed

    cluster = None
    if cfg.scheduler == "local":
        cluster = local_cluster(cfg.workers)
        client = Client(cluster)
    else:
        try:
            client = Client(cfg.scheduler, timeout=30)
        except (OSError, ValueError, TypeError) as exc:
            from .options import EncodeError

            raise EncodeError(f"cannot reach the dask scheduler {cfg.scheduler!r}: {exc}") from None
    futures: list = []
    dask_log, dask_level = None, logging.NOTSET
    try:
        # pure=False: a task's result is a side effect on disk, never deduplicated by dask. The
        # run's own token in the key: on a shared, long-running cluster another job's (or an
        # earlier run's) shard N must never be taken for this one's.
        run = tasks[0].run
        futures = [client.submit(encode_shard, t, pure=False, key=f"encode-shard-{t.index}-{run}")
                   for t in tasks]
        pending = as_completed(futures)
        while not pending.is_empty():
            if stop.exception is not None:
                raise stop.exception
            if not pending.has_ready():
                time.sleep(0.02)
                continue
            for fut in pending.next_batch(block=False):
                result = fut.result()
                progress(result.n_items)
                yield result
    except BaseException:
        # Running tasks cannot be killed (thread workers) or may run on; they stop at their
        # next batch. Closing the cluster then waits for its worker threads.
        if cluster is not None:  # our own workers' notes on the tasks cancelled (or stopped): noise
            dask_log = logging.getLogger("distributed")
            dask_level = dask_log.level
            dask_log.setLevel(logging.CRITICAL)
        jobdir.cancel_run(cfg.out, tasks[0].run)
        client.cancel(futures)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        if dask_log is not None:
            dask_log.setLevel(dask_level)


EXECUTORS: dict[str, Callable[..., Iterator[ShardResult]]] = {
    "in-process": run_in_process,
    "processes": run_process_pool,
    "dask": run_dask,
}


def executor_for(cfg) -> str:
    if cfg.scheduler:
        return "dask"
    return "in-process" if cfg.workers == 1 else "processes"


def torch_threads_per_task(cfg) -> int:
    """In-process, the caller's setting (0); local worker processes share this machine's cores;
    on a remote cluster (--scheduler ADDRESS) the workers' own setting (dask starts them with
    OMP_NUM_THREADS=1 per worker thread)."""
    local = cfg.scheduler in (None, "local")
    return max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers > 1 and local else 0


def local_cluster(n_workers: int, processes: bool = False):
    """The dask LocalCluster that ``--scheduler local`` runs on: ``n_workers`` single-threaded
    workers. Start one yourself (and pass its ``scheduler_address`` as ``scheduler``) to run
    several jobs on the same warm workers.

    ``processes=False`` (what ``--scheduler local`` uses): the workers are threads of this
    process, the layout dask recommends for work that releases the GIL, which every heavy stage
    here does (libjpeg-turbo, torch's resampler, the transform's C kernels and torch ops, zstd,
    sha256). Measured on the encode benchmark (docs/benchmarks.md): the cluster is up in 0.2 s
    instead of 1.6-1.9 s (no worker processes to spawn, each importing distributed, torch and
    zarr and building its own filters), and the workers share one copy of the filters and FFT
    plans. ``processes=True``: one process per worker, each task on cores / N torch threads,
    the layout of ``--workers N`` without dask and of a real cluster's workers; these run
    without dask's ``MALLOC_TRIM_THRESHOLD_=65536`` in their environment: setting it turns off
    glibc's adaptive mmap threshold, so every allocation over 128 kB (each decoded image, each
    batch) becomes a fresh mmap whose pages fault in again (decode 2.1-2.3 instead of 1.4-1.7 ms
    CPU per image, the transform +10 %).

    Either way the statistical profiler is off (it takes the GIL to sample every thread's stack
    every 10 ms; with thread workers, this process's own threads too) and the memory and system
    monitors run less often (an idle 2-worker cluster: 9 % of a core instead of 13 %). Thread
    workers get no memory limit: their memory monitor would measure the whole process against a
    per-worker share and pause them, and encode tasks hold no dask data to spill."""
    import dask
    from distributed import LocalCluster

    settings = {"distributed.worker.profile.enabled": False,
                "distributed.worker.memory.monitor-interval": "1s",
                "distributed.admin.system-monitor.interval": "2s"}
    kwargs: dict[str, Any] = {}
    if processes:
        settings["distributed.nanny.pre-spawn-environ"] = {
            k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()
            if k != "MALLOC_TRIM_THRESHOLD_"}
    else:
        kwargs["memory_limit"] = 0
    with dask.config.set(settings):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=processes,
                            dashboard_address=":0", **kwargs)  # any free port: never a clash
