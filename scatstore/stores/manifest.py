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
from .registry import format_names, get_format
from .safepath import safe_relpath

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
        try:
            m = UPGRADES[v](m)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"manifest format_version {v} is malformed ({type(e).__name__}: {e})") from None
        v = m["format_version"]
    return m


def read_manifest(path) -> dict:
    """Read ``manifest.json`` (``path`` is the store directory or the file), upgraded to
    ``MANIFEST_VERSION`` and validated. Raises ``StoreError`` when missing, not JSON, too new or
    inconsistent."""
    m = load_manifest_json(path)
    validate_manifest(m)
    return m


def load_manifest_json(path) -> dict:
    """``manifest.json`` parsed and upgraded, not yet validated (``StoreError`` when it cannot be
    read, is not JSON, or has an unsupported version)."""
    from .fs import RemotePath, as_path

    p = as_path(path)
    if isinstance(p, RemotePath):
        if p.name != MANIFEST_NAME:
            p = p / MANIFEST_NAME
    elif p.is_dir():
        p = p / MANIFEST_NAME
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise StoreError(f"{p} not found: not a finished scatstore store "
                         "(an interrupted encode leaves no manifest; re-run it to resume)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"cannot read {p}: {e}") from None
    try:
        m = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise StoreError(f"{p} is corrupt (not JSON: {e})") from None
    return upgrade_manifest(m)


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


class _Problems(list):
    """Collects every structural problem of a manifest (verify prints them all)."""

    def req(self, m, key: str, types, where: str = "manifest"):
        """``m[key]`` when present and of ``types`` (bool is not an int), else None (noted)."""
        if not isinstance(m, dict):
            return None
        if key not in m:
            self.append(f"{where} lacks {key!r}")
            return None
        v = m[key]
        tt = types if isinstance(types, tuple) else (types,)
        if not isinstance(v, tt) or (isinstance(v, bool) and bool not in tt):
            self.append(f"{where}.{key} has type {type(v).__name__}, expected "
                        f"{' or '.join(t.__name__ for t in tt)}")
            return None
        return v

    def rel(self, rel, where: str) -> bool:
        try:
            safe_relpath(rel, where)
        except StoreError as e:
            self.append(str(e))
            return False
        return True


def manifest_problems(m) -> list:
    """Every structural problem of a current-version manifest (empty when it is sound): types,
    counts that do not add up, a shard list that does not match the spec, unsafe paths."""
    pr = _Problems()
    if not isinstance(m, dict):
        return ["manifest is not a JSON object"]
    if pr.req(m, "format_version", int) not in (None, MANIFEST_VERSION):
        pr.append(f"manifest format_version {m['format_version']} != {MANIFEST_VERSION}")
    pr.req(m, "created_by", dict)
    method = pr.req(m, "method", dict)
    if method is not None:
        pr.req(method, "name", str, "manifest.method")
        pr.req(method, "params", dict, "manifest.method")
    pr.req(m, "dtype", str)
    if m.get("quantization") is not None and not isinstance(m["quantization"], dict):
        pr.append("manifest.quantization must be an object or null")
    if m.get("sample_shape") is not None and not isinstance(m["sample_shape"], list):
        pr.append("manifest.sample_shape must be a list or null")
    count = pr.req(m, "count", int)
    n_slots = pr.req(m, "n_slots", int)
    rejected = pr.req(m, "rejected", int)
    if None not in (count, n_slots, rejected) and (count > n_slots or count < 0 or rejected < 0):
        pr.append(f"manifest counts are inconsistent (count={count}, n_slots={n_slots}, "
                  f"rejected={rejected})")
    names = pr.req(m, "class_names", list)
    if names is not None and not all(isinstance(n, str) for n in names):
        pr.append("manifest.class_names must be strings")
    if m.get("source") is not None and not isinstance(m["source"], dict):
        pr.append("manifest.source must be an object or null")
    pr.req(m, "job", dict)
    pr.req(m, "bytes_stored", int)
    store = pr.req(m, "store", dict)
    if store is None:
        return list(pr)
    fmt = pr.req(store, "format", str, "manifest.store")
    if fmt is not None and fmt not in format_names():
        pr.append(f"manifest.store.format {fmt!r} is not a known format {format_names()}")
    pr.req(store, "layout", str, "manifest.store")
    shard_size = pr.req(store, "shard_size", int, "manifest.store")
    if shard_size is not None and shard_size < 1:
        pr.append(f"manifest.store.shard_size is {shard_size}: must be >= 1")
        shard_size = None
    n_shards = pr.req(store, "n_shards", int, "manifest.store")
    shards = pr.req(store, "shards", list, "manifest.store")
    glob = pr.req(store, "global_files", dict, "manifest.store")
    if shards is not None and n_shards is not None and len(shards) != n_shards:
        pr.append(f"manifest.store lists {len(shards)} shards, n_shards={n_shards}")
    if None not in (shard_size, n_shards, n_slots) and -(-n_slots // shard_size) != n_shards:
        pr.append(f"manifest.store.n_shards {n_shards} != ceil(n_slots {n_slots} / shard_size "
                  f"{shard_size}) = {-(-n_slots // shard_size)}")
    spec = store.get("spec")
    if spec is not None:
        if not isinstance(spec, dict):
            pr.append("manifest.store.spec must be an object")
        else:
            for k, v in (("format", fmt), ("n_slots", n_slots), ("shard_size", shard_size),
                         ("dtype", m.get("dtype"))):
                if v is not None and k in spec and spec[k] != v:
                    pr.append(f"manifest.store.spec.{k}={spec[k]!r} contradicts {v!r}")
    total = 0
    for i, s in enumerate(shards or []):
        where = f"manifest.store.shards[{i}]"
        if not isinstance(s, dict) or s.get("index") != i:
            pr.append(f"{where} is malformed (not an object with index {i})")
            continue
        c = pr.req(s, "count", int, where)
        if c is not None:
            total += c
            if c < 0 or (shard_size is not None and c > shard_size):
                pr.append(f"{where}.count {c} is outside 0..shard_size")
        files = pr.req(s, "files", dict, where)
        for rel, info in (files or {}).items():
            pr.rel(rel, f"{where} file")
            if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                    or not isinstance(info.get("bytes"), int) or isinstance(info.get("bytes"), bool):
                pr.append(f"{where}.files[{rel!r}] is malformed")
    for rel, info in (glob or {}).items():
        pr.rel(rel, "manifest.store.global_files path")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                or not isinstance(info.get("bytes"), int):
            pr.append(f"manifest.store.global_files[{rel!r}] is malformed")
    for name in ("index", "group"):  # format fields naming a file or folder of the store
        if name in store:
            pr.rel(store[name], f"manifest.store.{name}")
    if count is not None and shards is not None and total != count:
        pr.append(f"manifest shard counts sum to {total}, count={count}")
    return list(pr)


def validate_manifest(m: dict) -> None:
    """Structural check of a current-version manifest; ``StoreError`` naming the first problem
    (and how many more there are)."""
    problems = manifest_problems(m)
    if problems:
        more = f" (and {len(problems) - 1} more problems: run scatstore verify)" if len(problems) > 1 else ""
        raise StoreError(problems[0] + more)


def write_manifest(out: Path, manifest: dict) -> None:
    validate_manifest(manifest)
    from .fs import as_path

    atomic_write_bytes(as_path(out) / MANIFEST_NAME, json_bytes(manifest))
