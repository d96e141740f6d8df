"""Stop signals of an encode run, and worker processes that never outlive it.

- The run: SIGTERM (a batch scheduler's time limit or preemption) raises :class:`JobTerminated`
  like Ctrl-C raises KeyboardInterrupt, so the shards done are committed (:func:`sigterm_as_interrupt`);
  on dask both only record the request (:func:`stop_signals_as_flag`).
- Pool workers (:func:`worker_init`): leave both signals to the parent, and die with it. A worker
  holds no lock on OUT; if the run that holds it is killed (``kill -9``), its workers must stop
  before they commit another shard: on Linux the kernel sends them SIGKILL when the parent dies
  (``prctl(PR_SET_PDEATHSIG)``); everywhere a watch thread compares ``os.getppid()`` with the
  parent's pid and ends the process, and :func:`run_alive` is checked again just before a
  shard is written.
- Dask tasks (:func:`run_alive`): when the run dies or stops, the scheduler cancels its tasks;
  one already running sees that between batches and before its write, and stops.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class JobTerminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit or preemption, ``kill``): the job stops as on
    Ctrl-C, committing the shards done, instead of dying where it stands."""


class StopRequest:
    """Set by a stop signal while dask runs the job: which exception the job's loop raises."""

    def __init__(self):
        self.exception: type[BaseException] | None = None


@contextlib.contextmanager
def signal_handlers(handlers: dict):
    """Install ``handlers`` (signal -> function) while the block runs and restore the previous
    ones after; only in the main thread, the only one Python runs signal handlers in."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stop_signals_as_flag():
    """While dask runs the job, Ctrl-C and SIGTERM only record the request.

    A KeyboardInterrupt raised inside one of distributed's blocking client calls breaks it
    (seen: its cancel callback failing on an unset future, logged with a traceback); the job's
    loop looks at the request between waits and raises it itself. A second signal raises at
    once. Only the main thread can take signals: elsewhere nothing is recorded."""
    stop = StopRequest()

    def on_signal(signum, frame):
        exc = JobTerminated if signum == signal.SIGTERM else KeyboardInterrupt
        if stop.exception is not None:
            raise exc
        stop.exception = exc

    with signal_handlers({signal.SIGINT: on_signal, signal.SIGTERM: on_signal}):
        yield stop


def _raise_job_terminated(signum, frame):
    raise JobTerminated


def sigterm_as_interrupt():
    """SIGTERM raises JobTerminated in the main thread while the job runs (by default the
    process dies at once, and the shards in flight are redone by the resume); left alone when
    the caller has a handler of its own."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return contextlib.nullcontext()
    return signal_handlers({signal.SIGTERM: _raise_job_terminated})


# ------------------------------------------------------------------------------ pool workers

_PARENT = {"pid": None}
PARENT_POLL_S = 0.2


def _set_pdeathsig() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the watch thread remains
        pass


def parent_alive() -> bool:
    """In a pool worker: whether the run that started it still lives (always True elsewhere)."""
    return _PARENT["pid"] is None or os.getppid() == _PARENT["pid"]


def _dask_task_wanted() -> bool:
    """In a dask task: False once the scheduler cancelled it. A run that dies (its client's
    connection closes) or stops has its tasks cancelled; a task already running cannot be
    killed, so it asks here. True outside dask, or when the state cannot be read."""
    if "distributed" not in sys.modules:
        return True
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        key = getattr(thread_state, "key", None)
        ts = get_worker().state.tasks.get(key) if key is not None else None
    except (ValueError, AttributeError, ImportError):  # not in a dask task
        return True
    return ts is None or ts.state != "cancelled"


def run_alive() -> bool:
    """Whether the run that this shard task belongs to still holds OUT: checked between batches
    and just before a shard is written, in every executor."""
    return parent_alive() and _dask_task_wanted()


def _watch_parent() -> None:
    import time

    while True:
        time.sleep(PARENT_POLL_S)
        if not parent_alive():
            os._exit(1)  # the run is gone, and with it the lock on OUT: write nothing more


def worker_init(parent_pid: int) -> None:
    """Initializer of the pool's worker processes.

    Ctrl-C reaches the whole process group and a batch scheduler sends SIGTERM to every process
    of the job: the parent alone handles them (cancels the queued shards, lets the running ones
    stop at their next batch), instead of each worker dying with a traceback of its own. And the
    worker dies with the parent (module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _PARENT["pid"] = parent_pid
    _set_pdeathsig()
    if not parent_alive():  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, name="scatstore-parent-watch", daemon=True).start()
