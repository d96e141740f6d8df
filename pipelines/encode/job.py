"""The encode driver: check everything, take OUT, run the shard tasks, commit the manifest.

Order (docs/architecture.md, "Encode"): options (``options.check_config``, in ``EncodeConfig``)
-> SRC discovery -> the method and its parameters (``make_method``, ``method.validate``) -> the
store spec -> only then OUT is created, locked and its job file checked or written
(``jobdir.open_out``) -> committed shards are kept -> the executor runs the rest -> manifest.
"""
from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable

from . import executors, jobdir, manifest as manifest_mod, signals, tcfit
from .options import EncodeConfig, EncodeError, OptionError, config_warnings
from .shards import make_tasks
from .summary import summary_lines


def _discover(cfg: EncodeConfig):
    from scatstore.sources import discover

    if not cfg.src.exists():
        raise EncodeError(f"SRC {cfg.src} does not exist")
    if not cfg.src.is_dir():
        raise EncodeError(f"SRC {cfg.src} is not a directory")
    try:
        index = discover(cfg.src, layout=cfg.layout, split=cfg.split)
    except (ValueError, OSError) as exc:
        raise EncodeError(f"cannot read SRC {cfg.src}: {exc}") from exc
    if not index.items:
        raise EncodeError(f"SRC {cfg.src} holds no images (layout {index.layout})")
    return index


def _method(cfg: EncodeConfig):
    from scatstore.transforms.methods import make_method

    kwargs = {"device": cfg.device}
    if cfg.method in ("scat1", "scat2"):
        kwargs.update(J=cfg.value("J"), L=cfg.value("L"))
    if cfg.method == "cae":
        kwargs["codec"] = cfg.codec
    try:
        method = make_method(cfg.method, **kwargs)
    except (ValueError, OSError) as exc:
        raise EncodeError(str(exc)) from exc
    try:
        method.validate(cfg.size)
    except ValueError as exc:
        raise OptionError("size", str(exc)) from None
    return method


def _spec(cfg: EncodeConfig, index, method):
    from scatstore.stores import StoreError, StoreSpec

    dtype = manifest_mod.stored_dtype(cfg, method)
    try:
        return StoreSpec(format=cfg.format, n_slots=len(index.items) * cfg.variants,
                         shard_size=cfg.shard_size,
                         sample_shape=None if dtype == "bytes" else method.sample_shape(cfg.size),
                         dtype=dtype,
                         quantized=dtype == "uint8" and method.output_kind == "coefficients",
                         has_hw=index.layout == "coco", compression=cfg.compression)
    except StoreError as exc:
        raise EncodeError(str(exc)) from None


def _progress_bar(cfg: EncodeConfig, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=f"encode {cfg.method}",
                disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def encode(cfg: EncodeConfig, log: Callable[[str], None] | None = None,
           stats: dict | None = None) -> dict:
    """Run (or resume) an encode job. Returns the committed manifest.

    ``stats``, when given, is filled with this run's timings (they are never stored: the output
    bytes must not depend on them): ``images`` encoded now, ``elapsed_s`` (running the shard
    tasks, start-up of workers included), ``ready_s`` (until the first task started, i.e. the
    workers' start-up), ``steady_s`` (first task start to last task end), and the sums over
    shards of ``decode_cpu_s`` (CPU of the decode threads), ``encode_s`` (time in the method),
    ``encode_cpu_s`` (CPU of the threads calling it, the transform's own helper threads not
    included), ``write_s`` and ``write_cpu_s``."""
    from scatstore.sources import FrameSpec
    from scatstore.stores import read_manifest, writer_for

    log = log or (lambda msg: print(msg, file=sys.stderr))
    for warning in config_warnings(cfg):
        log(f"warning: {warning}")
    # Everything that can be refused is refused here, before OUT exists or is locked.
    index = _discover(cfg)
    method = _method(cfg)
    spec = _spec(cfg, index, method)
    try:
        source_fingerprint = index.fingerprint()
    except ValueError as exc:
        raise EncodeError(f"cannot read SRC {cfg.src}: {exc}") from exc
    params = manifest_mod.job_params(cfg, method, source_fingerprint)
    resuming, lock = jobdir.open_out(cfg.out, params)  # released below, or when the process dies
    try:
        n_shards = spec.n_shards
        writer = writer_for(cfg.out, spec)
        writer.prepare()
        done = jobdir.load_done(cfg.out, writer, n_shards) if resuming else {}
        todo = [s for s in range(n_shards) if s not in done]
        if resuming:
            log(f"resuming: {len(done)}/{n_shards} shards complete and verified, {len(todo)} to do")
        run = uuid.uuid4().hex[:12]
        frame = FrameSpec(size=cfg.size, keep_aspect=index.layout == "coco", augment=cfg.augment,
                          seed=cfg.seed)
        codec = tcfit.codec_for_job(cfg, index, method, spec, frame, log) \
            if cfg.dtype == "tc" else None
        tasks = make_tasks(cfg, method, index, spec, todo, executors.torch_threads_per_task(cfg),
                           run, frame, cfg.value("dtype"), codec)

        started, wall_started = time.perf_counter(), time.time()
        done_slots = sum(len(m["record"]["slots"]) + len(m["rejected"]) for m in done.values())
        results: dict[int, dict] = dict(done)
        sums = {"decode_cpu_s": 0.0, "encode_s": 0.0, "encode_cpu_s": 0.0, "write_s": 0.0,
                "write_cpu_s": 0.0}
        t_first, t_last = float("inf"), wall_started
        run_tasks = executors.EXECUTORS[executors.executor_for(cfg)]
        try:
            with signals.sigterm_as_interrupt(), _progress_bar(cfg, spec.n_slots, done_slots) as bar:
                for result in (run_tasks(cfg, tasks, bar.update) if tasks else ()):
                    results[result.index] = {"record": result.record, "rejected": result.rejected,
                                             "quality": result.quality}
                    for k in sums:
                        sums[k] += result.stats.get(k, 0.0)
                    t_first = min(t_first, result.stats.get("t_start", t_first))
                    t_last = max(t_last, result.stats.get("t_end", t_last))
                    bar.set_postfix(shards=f"{len(results)}/{n_shards}")
        except KeyboardInterrupt as exc:
            how = " (SIGTERM)" if isinstance(exc, signals.JobTerminated) else ""
            log(f"interrupted{how}: {jobdir.count_committed(cfg.out, writer, n_shards)}/{n_shards} "
                f"shards committed in {cfg.out}; re-run the same command to resume")
            raise
        except OSError as exc:
            # Source files that cannot be read are rejected one by one (rejected.jsonl): what
            # reaches here failed to write (a full disk, a quota, a lost mount).
            raise EncodeError(
                f"cannot write {exc.filename or cfg.out}: {exc.strerror or exc}; "
                f"{jobdir.count_committed(cfg.out, writer, n_shards)}/{n_shards} shards committed; "
                "re-run the same command to resume once fixed") from exc
        finally:
            jobdir.clear_cancel(cfg.out, run)
        elapsed = time.perf_counter() - started

        manifest_mod.commit(cfg, index, method, spec, params, results, writer, codec)
        manifest = read_manifest(cfg.out)
        encoded_now = sum(len(r["record"]["slots"]) for i, r in results.items() if i not in done)
        rate = encoded_now / elapsed if elapsed > 0 and encoded_now else 0.0
        if stats is not None:
            t_first = min(t_first, t_last)
            stats.update(sums, images=encoded_now, elapsed_s=elapsed,
                         ready_s=max(0.0, t_first - wall_started), steady_s=max(0.0, t_last - t_first))
        n_declared = len({m.get("source_key") for r in results.values()
                          for m in r["record"]["meta"] if "declared_size" in m})
        for line in summary_lines(cfg, manifest, rate, len(index.skipped()), n_declared):
            log(line)
        return manifest
    finally:
        lock.close()
