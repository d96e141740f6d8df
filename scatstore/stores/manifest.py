"""``manifest.json``: the versioned description of a store (docs/format.md, "Manifest").

``read_manifest`` upgrades older versions to the current one through ``UPGRADES`` (one function per
version step) and refuses newer ones. ``build_manifest`` completes the engine's fields with the
store's own and validates the whole document before ``write_manifest`` commits it atomically.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from .errors import StoreError
from .files import atomic_write_bytes, json_bytes
from .registry import get_format

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


# --------------------------------------------------------------------------------------- upgrades
def _upgrade_v0_to_v1(m: dict) -> dict:
    """v0 was the pre-release draft: ``version: 0``, a top-level ``format``/``shard_size``/``shards``
    list of ``{index, count, sha256, path}`` (one file per shard), ``n`` for the count, no
    ``created_by``/``store``/``quantization``/``bytes_stored``."""
    m = dict(m)
    m.pop("version", None)
    shards = []
    for s in m.pop("shards", []):
        files = {s["path"]: {"sha256": s["sha256"], "bytes": int(s.get("bytes", 0))}} if "path" in s else {}
        shards.append({"index": int(s["index"]), "count": int(s["count"]), "files": files,
                       "bytes": int(s.get("bytes", 0)), "payload_bytes": int(s.get("payload_bytes", 0))})
    shard_size = int(m.pop("shard_size"))
    fmt = m.pop("format")
    m["count"] = int(m.pop("n", sum(s["count"] for s in shards)))
    m.setdefault("n_slots", m["count"])
    m.setdefault("rejected", m["n_slots"] - m["count"])
    m.setdefault("created_by", {})
    m.setdefault("quantization", None)
    m.setdefault("class_names", [])
    m.setdefault("source", None)
    m.setdefault("job", {})
    m["store"] = {"format": fmt, "layout": f"scatstore-{fmt}-v0", "shard_size": shard_size,
                  "n_shards": len(shards), "shards": shards, "global_files": {}}
    m["bytes_stored"] = sum(s["bytes"] for s in shards)
    m["format_version"] = 1
    return m


UPGRADES = {0: _upgrade_v0_to_v1}


def upgrade_manifest(m: dict) -> dict:
    if not isinstance(m, dict):
        raise StoreError("manifest is not a JSON object")
    v = m.get("format_version", m.get("version"))
    if not isinstance(v, int) or isinstance(v, bool):
        raise StoreError(f"manifest has no integer format_version (got {v!r})")
    if v > MANIFEST_VERSION:
        raise StoreError(f"manifest format_version {v} is newer than this scatstore supports "
                         f"({MANIFEST_VERSION}); upgrade scatstore")
    while v < MANIFEST_VERSION:
        if v not in UPGRADES:
            raise StoreError(f"no upgrade from manifest format_version {v}")
        m = UPGRADES[v](m)
        v = m["format_version"]
    return m


def read_manifest(path) -> dict:
    """Read ``manifest.json`` (``path`` is the store directory or the file), upgraded to
    ``MANIFEST_VERSION``. Raises ``StoreError`` when missing, not JSON, or too new."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise StoreError(f"{p} not found: not a finished scatstore store "
                         "(an interrupted encode leaves no manifest; re-run it to resume)") from None
    except OSError as e:
        raise StoreError(f"cannot read {p}: {e}") from None
    try:
        m = json.loads(text)
    except ValueError as e:
        raise StoreError(f"{p} is corrupt (not JSON: {e})") from None
    m = upgrade_manifest(m)
    validate_manifest(m)
    return m


# --------------------------------------------------------------------------------------- versions
def software_versions() -> dict:
    """Versions of the software that wrote the store (from package metadata: importing torch
    only to read its version would cost seconds)."""
    import sys
    from importlib import metadata

    import numpy

    out: dict[str, Any] = {"python": platform.python_version(), "numpy": numpy.__version__}
    for mod, dist in (("scatstore", "scatstore"), ("torch", "torch"), ("zarr", "zarr"),
                      ("numcodecs", "numcodecs"), ("webdataset", "webdataset"), ("h5py", "h5py")):
        m = sys.modules.get(mod)
        v = getattr(m, "__version__", None) if m is not None else None
        if v is None:
            try:
                v = metadata.version(dist)
            except metadata.PackageNotFoundError:
                v = None
        out[mod] = v
    return out


# --------------------------------------------------------------------------------------- build
def _quantization(spec, given) -> dict | None:
    if not spec.quantized:
        if given not in (None, {}, {"scheme": "none"}):
            raise StoreError("manifest.quantization given for a store that is not quantized")
        return None
    from scatstore.transforms.quantize import quantization_info

    info = quantization_info(spec.quant_scheme)
    if given:
        if given.get("scheme") != spec.quant_scheme:
            raise StoreError(f"manifest.quantization.scheme {given.get('scheme')!r} != store's "
                             f"{spec.quant_scheme!r}")
        info = {**info, **given}
    return info


def build_manifest(engine: dict, spec, layout: str, records: list,
                   global_files: dict, store_extra: dict) -> dict:
    """The engine's fields (method, source, job, rejected, class_names, ...) plus the store's."""
    engine = dict(engine or {})
    shards = [r.summary() for r in records]
    count = sum(r.count for r in records)
    payload = sum(r.payload_bytes for r in records)
    shard_bytes = sum(r.bytes for r in records)
    glob_bytes = sum(f["bytes"] for f in global_files.values())
    stored = shard_bytes + glob_bytes
    store = {
        "format": spec.format, "layout": layout, "shard_size": spec.shard_size,
        "n_shards": spec.n_shards, "spec": spec.to_dict(), **store_extra,
        "payload_bytes": payload, "overhead_bytes": stored - payload,
        "overhead_bytes_per_sample": (stored - payload) / count if count else 0.0,
        "global_files": dict(sorted(global_files.items())), "shards": shards,
    }
    m: dict[str, Any] = {"format_version": MANIFEST_VERSION}
    versions = software_versions()
    versions.update(get_format(spec.format).library_versions())
    m["created_by"] = {**versions, **engine.pop("created_by", {})}
    m["method"] = engine.pop("method", None)
    m["dtype"] = spec.dtype
    m["quantization"] = _quantization(spec, engine.pop("quantization", None))
    m["sample_shape"] = list(spec.sample_shape) if spec.sample_shape is not None else None
    m["count"] = count
    m["n_slots"] = spec.n_slots
    m["rejected"] = engine.pop("rejected", spec.n_slots - count)
    m["class_names"] = engine.pop("class_names", [])
    m["source"] = engine.pop("source", None)
    m["job"] = engine.pop("job", {})
    for k in ("format_version", "dtype", "sample_shape", "count", "n_slots", "store", "bytes_stored"):
        if k in engine and engine[k] != m.get(k, engine[k]):
            raise StoreError(f"manifest field {k!r}={engine[k]!r} contradicts the store "
                             f"({m.get(k)!r})")
        engine.pop(k, None)
    m.update(engine)  # further engine fields (e.g. timings, report) pass through
    m["store"] = store
    m["bytes_stored"] = stored
    validate_manifest(m)
    return m


def _req(m: dict, key: str, types, where: str = "manifest"):
    if key not in m:
        raise StoreError(f"{where} lacks {key!r}")
    if not isinstance(m[key], types) or (isinstance(m[key], bool) and bool not in
                                          (types if isinstance(types, tuple) else (types,))):
        raise StoreError(f"{where}.{key} has type {type(m[key]).__name__}, expected {types}")
    return m[key]


def validate_manifest(m: dict) -> None:
    """Structural check of a current-version manifest; raises ``StoreError``."""
    if _req(m, "format_version", int) != MANIFEST_VERSION:
        raise StoreError(f"manifest format_version {m['format_version']} != {MANIFEST_VERSION}")
    _req(m, "created_by", dict)
    method = _req(m, "method", dict)
    _req(method, "name", str, "manifest.method")
    _req(method, "params", dict, "manifest.method")
    _req(m, "dtype", str)
    if m.get("quantization") is not None and not isinstance(m["quantization"], dict):
        raise StoreError("manifest.quantization must be an object or null")
    if m.get("sample_shape") is not None and not isinstance(m["sample_shape"], list):
        raise StoreError("manifest.sample_shape must be a list or null")
    count = _req(m, "count", int)
    n_slots = _req(m, "n_slots", int)
    rejected = _req(m, "rejected", int)
    if count > n_slots or count < 0 or rejected < 0:
        raise StoreError(f"manifest counts are inconsistent (count={count}, n_slots={n_slots}, "
                         f"rejected={rejected})")
    names = _req(m, "class_names", list)
    if not all(isinstance(n, str) for n in names):
        raise StoreError("manifest.class_names must be strings")
    if m.get("source") is not None and not isinstance(m["source"], dict):
        raise StoreError("manifest.source must be an object or null")
    _req(m, "job", dict)
    store = _req(m, "store", dict)
    _req(store, "format", str, "manifest.store")
    _req(store, "layout", str, "manifest.store")
    _req(store, "shard_size", int, "manifest.store")
    n_shards = _req(store, "n_shards", int, "manifest.store")
    shards = _req(store, "shards", list, "manifest.store")
    _req(store, "global_files", dict, "manifest.store")
    if len(shards) != n_shards:
        raise StoreError(f"manifest.store lists {len(shards)} shards, n_shards={n_shards}")
    total = 0
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or s.get("index") != i:
            raise StoreError(f"manifest.store.shards[{i}] is malformed")
        total += _req(s, "count", int, f"manifest.store.shards[{i}]")
        files = _req(s, "files", dict, f"manifest.store.shards[{i}]")
        for rel, info in files.items():
            _check_rel(rel)
            if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                    or not isinstance(info.get("bytes"), int):
                raise StoreError(f"manifest.store.shards[{i}].files[{rel!r}] is malformed")
    for rel in store["global_files"]:
        _check_rel(rel)
    if total != count:
        raise StoreError(f"manifest shard counts sum to {total}, count={count}")
    _req(m, "bytes_stored", int)


def _check_rel(rel: str) -> None:
    """Paths in a manifest are relative, inside the store, without '..'."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("/") or "\\" in rel:
        raise StoreError(f"manifest names a path outside the store: {rel!r}")


def write_manifest(out: Path, manifest: dict) -> None:
    validate_manifest(manifest)
    atomic_write_bytes(Path(out) / MANIFEST_NAME, json_bytes(manifest))
