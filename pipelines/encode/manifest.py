"""The job's parameters and the manifest assembled from the committed shards.

Also the two per-file lists in OUT (docs/format.md, "Rejected and skipped files"):
``rejected.jsonl`` (listed source files that could not be decoded, one per slot) and
``skipped.jsonl`` (what discovery left out before any slot existed: symlinks out of SRC,
unreadable folders, empty class folders, COCO entries with bad paths or ids).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import tcfit
from .jobdir import fingerprint

REJECTED_FILE = "rejected.jsonl"
SKIPPED_FILE = "skipped.jsonl"


def stored_dtype(cfg, method) -> str:
    """The store's dtype: transform-coded coefficients (``tc``) are variable-length bytes."""
    dtype = {"pixels": "uint8", "bytes": "bytes"}.get(method.output_kind, cfg.value("dtype"))
    return "bytes" if dtype == "tc" else dtype


def job_params(cfg, method, source_fingerprint: str) -> dict:
    """The parameters that define a job: a resume must match all of them."""
    from scatstore.stores import MANIFEST_VERSION

    params = {
        "manifest_version": MANIFEST_VERSION,
        "method": {"name": method.name, "params": method.params},
        "format": cfg.format, "shard_size": cfg.shard_size, "size": cfg.size,
        "dtype": stored_dtype(cfg, method), "compression": cfg.compression, "layout": cfg.layout,
        "split": cfg.split, "augment": cfg.augment, "seed": cfg.seed,
        "source_fingerprint": source_fingerprint,
    }
    if cfg.dtype == "tc":  # only then: the parameters of other jobs (and their resume) unchanged
        params["coefficient_codec"] = {"dtype": "tc", "quality": float(cfg.value("quality")),
                                       **tcfit.FIT_PARAMS}
    return params


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def commit(cfg, index, method, spec, params, results: dict, writer, spec_codec=None) -> dict:
    """Write rejected.jsonl, skipped.jsonl and (by the store) the manifest; returns the
    manifest as given to the store. ``spec_codec``: the store's fitted
    :class:`~scatstore.transforms.coefcodec.CoefficientCodec` (``dtype tc``), recorded as the
    manifest's ``coefficient_codec``."""
    from scatstore.stores import ShardRecord
    from scatstore.stores.base import atomic_write_bytes
    from scatstore.stores.fs import each_of

    records = [ShardRecord.from_dict(results[s]["record"]) for s in sorted(results)]
    rejected = sorted((r for s in results for r in results[s]["rejected"]), key=lambda r: r["slot"])
    each_of(lambda nd: atomic_write_bytes(cfg.out / nd[0], nd[1]),
            [(REJECTED_FILE, _jsonl(rejected)), (SKIPPED_FILE, _jsonl(index.skipped()))],
            writer.remote)
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
        "job": {"fingerprint": fingerprint(params), "params": params},
    }
    if spec_codec is not None:
        manifest["coefficient_codec"] = spec_codec.to_json()
    per_shard = [results[s].get("quality") or {} for s in sorted(results)]
    jpeg = reference_jpeg(per_shard)
    if jpeg:
        manifest["reference_jpeg"] = jpeg
    quality = quality_summary(per_shard)
    if quality:
        manifest["quality"] = quality
    writer.finalize(manifest, records)
    return manifest


def reference_jpeg(per_shard: list[dict]) -> dict:
    """The mean size of a quality-90 JPEG of the stored frames, over the measured subset (the
    first samples of every shard, ``shards.frame_jpeg_sums``); {} when none was measured."""
    n = sum(q.get("jpeg_q90_n", 0.0) for q in per_shard)
    if not n:
        return {}
    total = sum(q.get("jpeg_q90_bytes_sum", 0.0) for q in per_shard)
    return {"quality": 90, "encoder": "PIL/libjpeg, 4:2:0", "measured_samples": int(n),
            "bytes_per_sample": total / n}


def quality_summary(per_shard: list[dict]) -> dict:
    """Means over the measured subset (see shards.MEASURE_PER_SHARD), keys in docs/format.md."""
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
