"""`scatstore report`: what a store costs against raw pixels and against its source files.

All ratios are *stored / reference* (below 1 means smaller than the reference):

- ``coefficient_ratio``: values stored per sample / uint8 pixel values of the stored frame
  (3·S²). For scat1 this is (1 + L·J)/4^J: 0.39 at J=3, L=8. ``None`` for bitstreams.
- ``bytes_ratio``: bytes on disk / raw uint8 pixel bytes (3·S² per sample).
- ``source_bytes_ratio``: bytes on disk / bytes of the source files of the stored samples.
- ``ratio_vs_jpeg_q90``: bytes on disk per sample / bytes of a quality-90 JPEG of the stored
  frame (the manifest's ``reference_jpeg``: PIL/libjpeg, measured at encode time on the first
  samples of every shard), the file a user would otherwise keep for that frame.
- ``bits_per_pixel``: bytes on disk × 8 / (samples · S²), the learned-compression convention.

Transform-coded stores (``--dtype tc``) report ``dtype: "tc"``, the decoded ``sample_shape`` and a
``coefficient_codec`` summary (quality, transform, step, version).

``bytes_stored`` counts every file of the store (data, indexes, manifest, rejected.jsonl); the
resume markers in ``.scatstore/`` are bookkeeping and are left out. ``payload_bytes`` is the samples'
own size before the store's compression and framing (array bytes, or bitstream bytes for ``cae``),
so ``bytes_stored − payload_bytes`` is the store's overhead for bitstreams and minus its compression
savings for arrays.
"""
from __future__ import annotations

import math
import os

# Keys of the JSON report, in the order the table shows them; documented in docs/format.md.
REPORT_KEYS = (
    "path", "format", "method", "params", "dtype", "sample_shape", "size", "count", "rejected",
    "n_shards", "bytes_stored", "bytes_per_sample", "payload_bytes", "overhead_bytes",
    "raw_bytes", "source_bytes", "jpeg_q90_bytes_per_sample", "coefficient_ratio", "bytes_ratio",
    "source_bytes_ratio", "ratio_vs_jpeg_q90", "bits_per_pixel", "payload_bits_per_pixel",
    "quality", "coefficient_codec",
)


def _store_bytes(out, manifest: dict) -> int:
    from scatstore.stores.fs import RemotePath, call

    if isinstance(out, RemotePath):  # objects under the prefix; a server without listing
        try:                          # (plain HTTP): what the manifest lists
            found = call(out.fs.find, f"list {out}", out.fs_path, detail=True)
            return sum(int(v.get("size") or 0) for k, v in found.items()
                       if "/.scatstore/" not in k[len(out.fs_path):] + "/")
        except Exception:  # noqa: BLE001
            return int(manifest.get("bytes_stored", 0))
    total = 0
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames[:] = [d for d in dirnames if d != ".scatstore"]
        for name in filenames:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def report(out: str | os.PathLike, manifest: dict | None = None) -> dict:
    """Compute the report of the store at ``out`` (its ``manifest.json`` unless given)."""
    from scatstore.stores import read_manifest

    from scatstore.stores.fs import as_path

    out = as_path(out)
    m = manifest if manifest is not None else read_manifest(out)
    count = int(m["count"])
    size = int(m.get("preprocess", {}).get("size", 0)) or None
    store = m.get("store", {})
    shards = store.get("shards", [])
    bytes_stored = _store_bytes(out, m)
    payload = sum(int(s.get("payload_bytes", 0)) for s in shards)
    pixels = 3 * size * size if size else None
    raw_bytes = count * pixels if pixels else None
    shape = m.get("sample_shape")
    tc = m.get("coefficient_codec")
    if tc:
        shape = list(tc.get("shape") or []) or None
    jpeg = (m.get("reference_jpeg") or {}).get("bytes_per_sample")
    per_sample = bytes_stored / count if count else 0.0
    coefficient_ratio = (math.prod(shape) / pixels) if (shape and pixels) else None
    source_bytes = int(m.get("source", {}).get("accepted_bytes", 0)) or None
    n_px = count * size * size if size else 0
    r = {
        "path": str(out),
        "format": store.get("format"),
        "method": m["method"]["name"],
        "params": m["method"].get("params", {}),
        "dtype": "tc" if tc else m.get("dtype"),
        "sample_shape": shape,
        "size": size,
        "count": count,
        "rejected": int(m.get("rejected", 0)),
        "n_shards": int(store.get("n_shards", len(shards))),
        "bytes_stored": bytes_stored,
        "bytes_per_sample": per_sample,
        "payload_bytes": payload,
        "overhead_bytes": bytes_stored - payload,
        "raw_bytes": raw_bytes,
        "source_bytes": source_bytes,
        "jpeg_q90_bytes_per_sample": jpeg,
        "coefficient_ratio": coefficient_ratio,
        "bytes_ratio": bytes_stored / raw_bytes if raw_bytes else None,
        "source_bytes_ratio": bytes_stored / source_bytes if source_bytes else None,
        "ratio_vs_jpeg_q90": per_sample / jpeg if jpeg and count else None,
        "bits_per_pixel": 8 * bytes_stored / n_px if n_px else None,
        "payload_bits_per_pixel": 8 * payload / n_px if n_px else None,
        "quality": m.get("quality"),
        "coefficient_codec": _codec_summary(tc) if tc else None,
    }
    return r


def _codec_summary(rec: dict) -> dict:
    from scatstore.transforms.coefcodec import LOG_BITS, MATRIX_BITS

    steps = rec.get("steps") or [0]
    return {"codec": rec.get("codec"), "version": rec.get("version"), "quality": rec.get("quality"),
            "transform": rec.get("transform"), "eps": rec.get("eps"),
            "step": float(steps[0]) / 2 ** (LOG_BITS + MATRIX_BITS)}


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_report(r: dict) -> str:
    """A table for people."""
    rows = [
        ("store", f"{r['path']} ({r['format']}, {r['n_shards']} shards)"),
        ("method", f"{r['method']} {r['params'] or ''} dtype={r['dtype']}"),
        ("sample shape", r["sample_shape"] or "variable (bitstreams)"),
        ("samples / rejected", f"{r['count']:,} / {r['rejected']:,}"),
        ("bytes stored", f"{_fmt(r['bytes_stored'])} ({_fmt(r['bytes_per_sample'])} per sample)"),
        _payload_row(r),
        ("coefficients vs raw pixels", _ratio(r["coefficient_ratio"])),
        ("bytes vs raw uint8 pixels", _ratio(r["bytes_ratio"])),
        ("bytes vs source files", _ratio(r["source_bytes_ratio"])),
        ("bytes vs q90 JPEG of the frame", _ratio(r["ratio_vs_jpeg_q90"]) + (
            f"  (JPEG {_fmt(r['jpeg_q90_bytes_per_sample'])} per sample)"
            if r["jpeg_q90_bytes_per_sample"] else "")),
        ("bits per pixel", _fmt(r["bits_per_pixel"])),
    ]
    if r.get("coefficient_codec"):
        c = r["coefficient_codec"]
        rows.insert(2, ("coefficient codec", f"{c['codec']} v{c['version']}, quality {c['quality']}, "
                                             f"{c['transform']}, step {c['step']:.4g} (log2)"))
    q = r.get("quality") or {}
    for k, v in q.items():
        rows.append((k.replace("_", " "), _fmt(v)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _payload_row(r: dict) -> tuple[str, str]:
    # Arrays are compressed by the store (stored < payload); bitstreams are not, and then the
    # difference is the store's own framing (tar headers, indexes, meta): show it as overhead.
    payload, overhead = r["payload_bytes"], r["overhead_bytes"]
    if overhead < 0:
        return ("payload before compression", f"{_fmt(payload)} (stored at {r['bytes_stored'] / payload:.3f}×)")
    share = f" ({overhead / r['bytes_stored']:.1%} of stored)" if r["bytes_stored"] else ""
    return ("payload / store overhead", f"{_fmt(payload)} / {_fmt(overhead)}{share}")


def _ratio(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4f}×  ({1 / v:.2f}× smaller)" if v < 1 else f"{v:.4f}×  ({v:.2f}× larger)"
