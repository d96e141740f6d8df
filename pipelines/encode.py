"""The encode job: a source dataset → a sharded, verified store of compact tensors.

How the job is cut up (see docs/architecture.md):

- The job has ``n_slots = n_items × max(1, augment)`` slots; slot ``i`` is source item
  ``i // variants``, variant ``i % variants``. Shard ``s`` holds slots
  ``[s·shard_size, (s+1)·shard_size)``. A shard's content depends only on its slots, so the output
  bytes are the same whatever the number of workers or the scheduler.
- One task encodes and writes one whole shard. When the shard's files are on disk the task writes a
  commit marker ``OUT/.scatstore/shards/shard-NNNNNN.json`` (atomically: temp file + rename). A
  re-run keeps every shard whose marker exists and whose files still hash to the recorded sha256,
  and redoes the others: a job killed at any moment resumes to the same bytes.
- The manifest is written last, atomically, by the store's ``finalize``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

JOB_DIR = ".scatstore"
JOB_FILE = "job.json"
SHARD_MARKERS = "shards"
REJECTED_FILE = "rejected.jsonl"
# Methods with a `measure` hook (the learned codec) decode this many samples per shard to record
# PSNR / MS-SSIM and actual vs estimated rate: a deterministic subset, so cost stays small.
MEASURE_PER_SHARD = 8
FORMATS = ("zarr", "wds", "h5")
DTYPES = ("float16", "float32", "uint8")


class EncodeError(RuntimeError):
    """A fatal problem with the job as a whole (bad arguments, unusable SRC or OUT)."""


@dataclass
class EncodeConfig:
    """Everything that defines an encode job (``job_params`` picks the part that must match on resume)."""

    src: Path
    out: Path
    method: str = "scat1"
    J: int = 3
    L: int = 8
    codec: str | None = None
    format: str = "zarr"
    shard_size: int = 512
    size: int = 224
    dtype: str = "float16"
    compression: str = "default"
    layout: str = "auto"
    split: str | None = None
    augment: int = 0
    seed: int = 0
    workers: int = 1
    scheduler: str | None = None
    device: str = "cpu"
    batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        self.src = Path(self.src)
        self.out = Path(self.out)
        if self.format not in FORMATS:
            raise EncodeError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise EncodeError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("shard_size", "size", "workers", "batch_size"):
            if getattr(self, name) < 1:
                raise EncodeError(f"--{name.replace('_', '-')} must be ≥ 1")
        from scatstore.stores.base import StoreError, parse_compression

        try:
            parse_compression(self.compression)
        except StoreError as exc:
            raise EncodeError(f"--compression: {exc}") from None
        if self.augment < 0:
            raise EncodeError("--augment must be ≥ 0")
        if self.method in ("scat1", "scat2") and self.size <= 2 ** self.J:
            raise EncodeError(f"--size {self.size} is too small for J={self.J}: need > {2 ** self.J}")
        if self.method == "cae" and self.size % 8:
            raise EncodeError("method 'cae' needs --size divisible by 8 (encoder stride 8)")

    @property
    def variants(self) -> int:
        return max(1, self.augment)


# --------------------------------------------------------------------------------------------
# Work units (module level and plain data, so they pickle to worker processes and dask workers)


@dataclass
class ShardTask:
    index: int
    out: str
    src_root: str
    spec: dict
    method: Any
    slots: list[int]
    items: list[Any]  # SourceItem per slot
    variants: list[int]
    size: int
    dtype: str
    keep_aspect: bool
    augment: int
    seed: int
    batch_size: int
    torch_threads: int = 0


@dataclass
class ShardResult:
    index: int
    record: dict
    rejected: list[dict]
    seconds: float
    n_items: int = 0
    stats: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _marker_path(out: Path, index: int) -> Path:
    return out / JOB_DIR / SHARD_MARKERS / f"shard-{index:06d}.json"


def _prepare_sample(task: ShardTask, item, variant: int, cache: dict):
    """Decode (once per source item) and preprocess one slot. Returns (image, meta) or raises."""
    from scatstore.sources import (decode_image, random_resized_crop, resize_center_crop,
                                   resize_keep_aspect, variant_rng)

    img = cache.get(item.key)
    if img is None:
        img = decode_image(os.path.join(task.src_root, item.path))
        cache.clear()  # variants of one item are consecutive slots: keep only the current one
        cache[item.key] = img
    meta: dict[str, Any] = {"source_key": item.key, "path": item.path}
    hw = None
    if task.augment:
        meta["variant"] = variant
        # Seeded by (job seed, source key, variant): never by worker or shard position.
        pixels, geom = random_resized_crop(img, task.size, variant_rng(task.seed, item.key, variant))
        hw = (task.size, task.size)
    elif task.keep_aspect:
        pixels, hw, geom = resize_keep_aspect(img, task.size)
    else:
        pixels, geom = resize_center_crop(img, task.size)
        hw = (task.size, task.size)
    if "boxes" in item.meta:
        boxes = np.asarray(item.meta["boxes"], dtype=np.float64).reshape(-1, 4)
        kept_boxes, kept = geom.apply_to_boxes(boxes)
        cats = np.asarray(item.meta.get("category_ids", []), dtype=np.int64)
        meta["image_id"] = item.meta.get("image_id")
        meta["boxes"] = np.round(np.asarray(kept_boxes, dtype=np.float64), 3).tolist()
        meta["category_ids"] = cats[np.asarray(kept, dtype=bool)].tolist() if len(cats) else []
    if task.keep_aspect:
        meta["hw"] = [int(hw[0]), int(hw[1])]
    return pixels, meta, hw


def _to_storage(task: ShardTask, method, encoded) -> tuple[Any, dict]:
    """Convert a method's output to the stored dtype. Returns (x, extra per-sample arrays)."""
    kind = method.output_kind
    if kind == "bytes":
        return list(encoded), {}
    if kind == "pixels":
        return np.ascontiguousarray(encoded, dtype=np.uint8), {}
    if task.dtype == "uint8":
        from scatstore.transforms.quantize import quantize_uint8

        q, qscale, qoffset = quantize_uint8(encoded)
        return q, {"qscale": qscale, "qoffset": qoffset}
    return np.ascontiguousarray(encoded, dtype=task.dtype), {}


def encode_shard(task: ShardTask, on_progress: Callable[[int], None] | None = None) -> ShardResult:
    """Encode and write one whole shard, then commit its marker. Runs in any process."""
    from scatstore.sources import DecodeError
    from scatstore.stores import ShardBatch, StoreSpec, writer_for

    started = time.perf_counter()
    if task.torch_threads:
        import torch

        torch.set_num_threads(task.torch_threads)
    method = task.method
    out = Path(task.out)
    writer = writer_for(out, StoreSpec.from_dict(task.spec))

    # Decoding runs in threads (the JPEG/PNG decoders release the GIL) a window ahead of the
    # transform, so that decode overlaps the FFT work of the previous batch.
    cache: dict = {}
    window = max(2 * task.batch_size, 4)
    slots_iter = iter(zip(task.slots, task.items, task.variants))
    pending: deque = deque()
    rejected: list[dict] = []
    kept_slots: list[int] = []
    keys: list[str] = []
    labels: list[int] = []
    metas: list[dict] = []
    hws: list = []
    xs: list = []
    extras: dict[str, list] = {}
    t_decode = t_encode = 0.0
    quality: dict[str, float] = {}

    def submit_next(pool) -> bool:
        nxt = next(slots_iter, None)
        if nxt is None:
            return False
        slot, item, variant = nxt
        # Variants of one item share a decode: submit them to the same thread in order.
        pending.append((slot, item, variant, pool.submit(_timed_prepare, task, item, variant, cache)))
        return True

    def flush(batch_pixels: list) -> None:
        nonlocal t_encode
        if not batch_pixels:
            return
        t0 = time.perf_counter()
        encoded = method.encode(np.stack(batch_pixels))
        x, extra = _to_storage(task, method, encoded)
        n_measured = int(quality.get("n", 0))
        if hasattr(method, "measure") and n_measured < MEASURE_PER_SHARD:
            take = MEASURE_PER_SHARD - n_measured
            sums = method.measure(np.stack(batch_pixels[:take]), encoded[:take])
            for k, v in sums.items():
                quality[k] = quality.get(k, 0.0) + v
        xs.append(x)
        for k, v in extra.items():
            extras.setdefault(k, []).append(v)
        t_encode += time.perf_counter() - t0
        if on_progress:
            on_progress(len(batch_pixels))
        batch_pixels.clear()

    batch_pixels: list = []
    # One decode thread when variants share an item cache (ordering), else two.
    with ThreadPoolExecutor(max_workers=1 if task.augment > 1 else 2) as pool:
        for _ in range(window):
            if not submit_next(pool):
                break
        while pending:
            slot, item, variant, fut = pending.popleft()
            submit_next(pool)
            try:
                pixels, meta, hw, dt = fut.result()
                t_decode += dt
            except DecodeError as exc:
                rejected.append({"slot": slot, "key": item.key, "path": item.path,
                                 "code": getattr(exc, "code", "corrupt"), "reason": str(exc)})
                if on_progress:
                    on_progress(1)
                continue
            kept_slots.append(slot)
            keys.append(item.key if not task.augment else f"{item.key}_a{variant}")
            labels.append(int(item.label))
            metas.append(meta)
            hws.append(hw)
            batch_pixels.append(pixels)
            if len(batch_pixels) >= task.batch_size:
                flush(batch_pixels)
        flush(batch_pixels)

    spec = StoreSpec.from_dict(task.spec)
    if xs and isinstance(xs[0], list):
        x_all: Any = [b for chunk in xs for b in chunk]
    elif xs:
        x_all = np.concatenate(xs)
    else:
        x_all = [] if spec.sample_shape is None else np.zeros((0, *spec.sample_shape), dtype=task.dtype)
    batch_kwargs: dict[str, Any] = {
        "slots": np.asarray(kept_slots, dtype=np.int64), "keys": keys, "x": x_all,
        "y": np.asarray(labels, dtype=np.int64), "meta": metas,
    }
    if spec.quantized:
        for k in ("qscale", "qoffset"):
            batch_kwargs[k] = (np.concatenate(extras[k]) if extras.get(k)
                               else np.zeros((0, *spec.sample_shape[:2]), np.float32))
    if spec.has_hw:
        batch_kwargs["hw"] = np.asarray(hws, dtype=np.int32).reshape(-1, 2)
    t0 = time.perf_counter()
    record = writer.write_shard(task.index, ShardBatch(**batch_kwargs))
    t_write = time.perf_counter() - t0
    record_dict = record.to_dict()
    marker = {"record": record_dict, "rejected": rejected, "quality": quality}
    _atomic_write_text(_marker_path(out, task.index), json.dumps(marker, sort_keys=True))
    return ShardResult(index=task.index, record=record_dict, rejected=rejected, quality=quality,
                       seconds=time.perf_counter() - started, n_items=len(task.slots),
                       stats={"decode_s": t_decode, "encode_s": t_encode, "write_s": t_write})


def _timed_prepare(task, item, variant, cache):
    t0 = time.perf_counter()
    pixels, meta, hw = _prepare_sample(task, item, variant, cache)
    return pixels, meta, hw, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# The driver


def job_params(cfg: EncodeConfig, method, source_fingerprint: str) -> dict:
    """The parameters that define a job: a resume must match all of them."""
    from scatstore.stores import MANIFEST_VERSION

    return {
        "manifest_version": MANIFEST_VERSION,
        "method": {"name": method.name, "params": method.params},
        "format": cfg.format, "shard_size": cfg.shard_size, "size": cfg.size,
        "dtype": _stored_dtype(cfg, method), "compression": cfg.compression, "layout": cfg.layout, "split": cfg.split,
        "augment": cfg.augment, "seed": cfg.seed, "source_fingerprint": source_fingerprint,
    }


def _stored_dtype(cfg: EncodeConfig, method) -> str:
    return {"pixels": "uint8", "bytes": "bytes"}.get(method.output_kind, cfg.dtype)


def _fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _check_out(cfg: EncodeConfig, params: dict) -> bool:
    """Validate OUT. Returns True if OUT already holds (part of) this very job."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise EncodeError(f"OUT {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_DIR / SHARD_MARKERS).mkdir(parents=True, exist_ok=True)
        probe = out / JOB_DIR / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EncodeError(f"OUT {out} is not writable: {exc.strerror or exc}") from exc
    job_file = out / JOB_DIR / JOB_FILE
    if job_file.exists():
        try:
            previous = json.loads(job_file.read_text())
        except (OSError, ValueError) as exc:
            raise EncodeError(f"{job_file} is unreadable ({exc}); remove OUT or choose another") from exc
        if previous.get("fingerprint") != _fingerprint(params):
            diff = sorted(k for k in set(params) | set(previous.get("params", {}))
                          if params.get(k) != previous.get("params", {}).get(k))
            raise EncodeError(
                f"OUT {out} holds a different job's data (differs in: {', '.join(diff)}); "
                "use a new OUT or delete this one")
        return True
    others = [p.name for p in out.iterdir() if p.name != JOB_DIR]
    if others:
        raise EncodeError(f"OUT {out} is not empty and holds no scatstore job "
                          f"(found {', '.join(sorted(others)[:3])}…); choose an empty directory")
    _atomic_write_text(job_file, json.dumps({"fingerprint": _fingerprint(params), "params": params},
                                            indent=2, sort_keys=True))
    return False


def _load_markers(out: Path, writer, n_shards: int) -> dict[int, dict]:
    """Completed shards whose files still hash to their recorded checksums."""
    from scatstore.stores import ShardRecord

    done = {}
    for index in range(n_shards):
        path = _marker_path(out, index)
        if not path.exists():
            continue
        try:
            marker = json.loads(path.read_text())
            if writer.check_shard(ShardRecord.from_dict(marker["record"])):
                done[index] = marker
        except (OSError, ValueError, KeyError):
            pass  # unreadable marker: the shard is redone
    return done


def _make_tasks(cfg, method, index, spec, todo: Iterable[int], torch_threads: int) -> list[ShardTask]:
    variants = cfg.variants
    tasks = []
    for s in todo:
        lo, hi = s * cfg.shard_size, min((s + 1) * cfg.shard_size, spec.n_slots)
        slots = list(range(lo, hi))
        tasks.append(ShardTask(
            index=s, out=str(cfg.out), src_root=str(index.root), spec=spec.to_dict(), method=method,
            slots=slots, items=[index.items[i // variants] for i in slots],
            variants=[i % variants for i in slots], size=cfg.size, dtype=cfg.dtype,
            keep_aspect=index.layout == "coco", augment=cfg.augment, seed=cfg.seed,
            batch_size=cfg.batch_size, torch_threads=torch_threads))
    return tasks


def _run_tasks(cfg: EncodeConfig, tasks: list[ShardTask], bar) -> Iterable[ShardResult]:
    """Run the tasks in-process, on a local process pool, or on a dask cluster."""
    if not tasks:
        return
    if cfg.scheduler:
        yield from _run_dask(cfg, tasks, bar)
    elif cfg.workers == 1:
        for task in tasks:
            yield encode_shard(task, on_progress=bar.update)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent may hold torch thread pools and open file handles.
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn")) as ex:
            futures = [ex.submit(encode_shard, t) for t in tasks]
            for fut in as_completed(futures):
                result = fut.result()
                bar.update(result.n_items)
                yield result


def _run_dask(cfg: EncodeConfig, tasks: list[ShardTask], bar) -> Iterable[ShardResult]:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if cfg.scheduler == "local":
        # One single-threaded worker process per requested worker: the scattering itself uses
        # torch threads, so dask threads would only oversubscribe the cores.
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(cfg.scheduler)
    try:
        # pure=False: a task's result is a side effect on disk, never deduplicated by dask.
        futures = [client.submit(encode_shard, t, pure=False, key=f"encode-shard-{t.index}")
                   for t in tasks]
        for fut in as_completed(futures):
            result = fut.result()
            bar.update(result.n_items)
            yield result
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _progress_bar(cfg: EncodeConfig, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=f"encode {cfg.method}",
                disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def encode(cfg: EncodeConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) an encode job. Returns the committed manifest."""
    from scatstore.sources import discover
    from scatstore.stores import StoreSpec, read_manifest, writer_for
    from scatstore.transforms.methods import make_method

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not cfg.src.exists():
        raise EncodeError(f"SRC {cfg.src} does not exist")
    if not cfg.src.is_dir():
        raise EncodeError(f"SRC {cfg.src} is not a directory")
    try:
        index = discover(cfg.src, layout=cfg.layout, split=cfg.split)
    except (ValueError, FileNotFoundError) as exc:
        raise EncodeError(f"cannot read SRC {cfg.src}: {exc}") from exc
    if not index.items:
        raise EncodeError(f"SRC {cfg.src} holds no images (layout {index.layout})")
    try:
        method = make_method(cfg.method, J=cfg.J, L=cfg.L, device=cfg.device, codec=cfg.codec)
    except (ValueError, FileNotFoundError) as exc:
        raise EncodeError(str(exc)) from exc
    params = job_params(cfg, method, index.fingerprint())
    resuming = _check_out(cfg, params)

    n_slots = len(index.items) * cfg.variants
    stored_dtype = _stored_dtype(cfg, method)
    spec = StoreSpec(format=cfg.format, n_slots=n_slots, shard_size=cfg.shard_size,
                     sample_shape=method.sample_shape(cfg.size), dtype=stored_dtype,
                     quantized=stored_dtype == "uint8" and method.output_kind == "coefficients",
                     has_hw=index.layout == "coco", compression=cfg.compression)
    n_shards = -(-n_slots // cfg.shard_size)
    writer = writer_for(cfg.out, spec)
    writer.prepare()

    done = _load_markers(cfg.out, writer, n_shards) if resuming else {}
    todo = [s for s in range(n_shards) if s not in done]
    if resuming:
        log(f"resuming: {len(done)}/{n_shards} shards complete and verified, {len(todo)} to do")
    threads = max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers > 1 else 0
    tasks = _make_tasks(cfg, method, index, spec, todo, threads)

    started = time.perf_counter()
    done_slots = sum(len(m["record"]["slots"]) + len(m["rejected"]) for m in done.values())
    results: dict[int, dict] = dict(done)
    stats = {"decode_s": 0.0, "encode_s": 0.0, "write_s": 0.0}
    with _progress_bar(cfg, n_slots, done_slots) as bar:
        for result in _run_tasks(cfg, tasks, bar):
            results[result.index] = {"record": result.record, "rejected": result.rejected,
                                     "quality": result.quality}
            for k in stats:
                stats[k] += result.stats.get(k, 0.0)
            bar.set_postfix(shards=f"{len(results)}/{n_shards}")
    elapsed = time.perf_counter() - started

    manifest = _commit(cfg, index, method, spec, params, results, writer)
    manifest = read_manifest(cfg.out)
    encoded_now = sum(len(r["record"]["slots"]) for i, r in results.items() if i not in done)
    rate = encoded_now / elapsed if elapsed > 0 and encoded_now else 0.0
    log(_summary_line(cfg, manifest, rate))
    return manifest


def _commit(cfg, index, method, spec, params, results, writer) -> dict:
    from scatstore.stores import ShardRecord

    records = [ShardRecord.from_dict(results[s]["record"]) for s in sorted(results)]
    rejected = sorted((r for s in results for r in results[s]["rejected"]), key=lambda r: r["slot"])
    _atomic_write_text(cfg.out / REJECTED_FILE,
                       "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected))
    # Source bytes of the images actually stored, for an honest "vs source files" ratio.
    accepted = {r.get("source_key") for rec in records for r in rec.meta}
    item_bytes = {}
    for item in index.items:
        if item.key in accepted:
            try:
                item_bytes[item.key] = os.path.getsize(os.path.join(index.root, item.path))
            except OSError:
                pass
    count = sum(rec.count for rec in records)
    manifest = {
        "method": {"name": method.name, "params": method.params},
        "dtype": spec.dtype,
        "sample_shape": list(spec.sample_shape) if spec.sample_shape else None,
        "count": count,
        "n_slots": spec.n_slots,
        "rejected": len(rejected),
        "class_names": list(index.class_names),
        "categories": index.categories,
        "preprocess": {
            "size": cfg.size,
            "resize": ("random-resized-crop+flip" if cfg.augment else
                       "keep-aspect canvas" if index.layout == "coco" else
                       "shorter side + centre crop"),
            "augment": cfg.augment, "seed": cfg.seed, "pixel_scale": "x/255",
        },
        "source": {
            "root": str(Path(index.root).resolve()), "layout": index.layout,
            "n_items": len(index.items), "total_bytes": int(index.total_bytes),
            "accepted_bytes": int(sum(item_bytes.values())),
            "missing_annotations": len(index.missing), "fingerprint": index.fingerprint(),
        },
        "job": {"fingerprint": _fingerprint(params), "params": params},
    }
    quality = _quality_summary([results[s].get("quality") or {} for s in sorted(results)])
    if quality:
        manifest["quality"] = quality
    writer.finalize(manifest, records)
    return manifest


def _quality_summary(per_shard: list[dict]) -> dict:
    """Means over the measured subset (see MEASURE_PER_SHARD), keys documented in docs/format.md."""
    total: dict[str, float] = {}
    for q in per_shard:
        for k, v in q.items():
            total[k] = total.get(k, 0.0) + v
    n = total.get("n", 0.0)
    if not n:
        return {}
    out = {"measured_samples": int(n), "psnr_db": total["psnr_db_sum"] / n}
    if "ms_ssim_sum" in total:
        out["ms_ssim"] = total["ms_ssim_sum"] / n
    if total.get("bits_estimated_sum"):
        out["rate_actual_over_estimate"] = total["bits_actual_sum"] / total["bits_estimated_sum"]
    return out


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _summary_line(cfg: EncodeConfig, manifest: dict, rate: float) -> str:
    from scatstore.pipelines.report import report

    r = report(cfg.out, manifest=manifest)
    speed = f", {rate:.0f} img/s" if rate else ""
    ratio = f" ({r['bytes_ratio']:.3f}× the raw pixel bytes)" if r["bytes_ratio"] else ""
    return (f"encoded {r['count']:,} samples ({r['rejected']} rejected) into {r['n_shards']} "
            f"{r['format']} shards: {_human_bytes(r['bytes_stored'])}, "
            f"{_human_bytes(r['bytes_per_sample'])}/sample{ratio}{speed} → {cfg.out}")


def config_from_kwargs(**kwargs) -> EncodeConfig:
    """Build an :class:`EncodeConfig`, turning unknown keys into a clear error."""
    names = {f.name for f in dataclasses.fields(EncodeConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise EncodeError(f"unknown encode option(s): {', '.join(unknown)}")
    return EncodeConfig(**kwargs)
