"""The store contract: spec, shard batches and records, and the writer machinery shared by formats.

A job is ``n_slots`` slots cut into shards of ``shard_size`` slots; shard ``s`` covers slots
``[s*shard_size, min((s+1)*shard_size, n_slots))``. One task writes one whole shard through
``StoreWriter.write_shard``: it writes only that shard's files (each to a temporary name, fsync,
rename) and then the shard's *record* ``_store/shard-NNNNNN.json`` (the commit marker, written last).
``finalize`` writes the global index files and then ``manifest.json`` atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError
from .fs import RemotePath, as_path, each_of
from .files import atomic_write_bytes, json_bytes, remove_tmp_files, sha256_file
from .manifest import build_manifest, write_manifest
from .registry import format_names
from .safepath import check_key, inside

DTYPES = ("float16", "float32", "uint8", "bytes")
QUANT_SCHEMES = ("affine", "sqrt")
STATE_DIR = "_store"          # spec.json + one record per committed shard
_SPEC_FORMAT_VERSION = 1


def all_finite(x: np.ndarray) -> bool:
    """Whether a float16/32/64 array holds no NaN or infinity, exactly: a value is not finite when
    its exponent bits are all ones. Reading the bits as unsigned integers is ~14× faster than
    ``np.isfinite`` on float16 (0.006 against 0.08 ms per scat1 J=3 sample), whose numpy loop
    converts every value."""
    x = np.ascontiguousarray(x)
    bits = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000),
            8: (np.uint64, 0x7FF0000000000000)}.get(x.dtype.itemsize)
    if x.dtype.kind != "f" or bits is None:
        return bool(np.isfinite(x).all())
    utype, exponent = bits
    u = x.view(utype)
    return not bool(((u & utype(exponent)) == utype(exponent)).any())


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


# --------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class StoreSpec:
    """What a store holds and how it is cut. JSON round-trippable (``to_dict`` / ``from_dict``).

    ``dtype``: ``float16`` | ``float32`` | ``uint8`` (raw pixels, or quantized coefficients when
    ``quantized``) | ``bytes`` (one variable-length bitstream per sample, ``sample_shape=None``).
    ``bfloat16`` is refused: numpy and zarr's core data types have no bfloat16, and float16 keeps
    scattering coefficients to ~2e-4 relative RMS (docs/format.md).
    ``compression``: ``"default"`` (zarr: zstd level 3; h5: gzip level 1 + shuffle; wds: none),
    ``"zstd"`` / ``"zstd:L"`` (zarr; h5 has no zstd without plugins and uses its default),
    ``"gzip"`` / ``"gzip:L"``, ``"lzf"`` (h5 only), ``"none"``. Webdataset members are never
    compressed (plain readers must decode them), whatever is asked.
    ``chunk_samples``: samples per zarr inner chunk / h5 chunk; ``None`` picks it (docs/format.md).
    """

    format: str
    n_slots: int
    shard_size: int
    sample_shape: tuple | None
    dtype: str = "float16"
    quantized: bool = False
    has_hw: bool = False
    compression: str = "default"
    quant_scheme: str = "affine"
    chunk_samples: int | None = None

    def __post_init__(self):
        if self.format not in format_names():
            raise StoreError(f"unknown store format {self.format!r}; choose from {format_names()}")
        if self.dtype == "bfloat16":
            raise StoreError("dtype bfloat16 is not supported (no numpy / zarr core bfloat16); "
                             "use float16, float32 or uint8")
        if self.dtype not in DTYPES:
            raise StoreError(f"unknown dtype {self.dtype!r}; choose from {DTYPES}")
        if int(self.n_slots) < 0 or int(self.shard_size) < 1:
            raise StoreError(f"bad n_slots={self.n_slots} / shard_size={self.shard_size}")
        object.__setattr__(self, "n_slots", int(self.n_slots))
        object.__setattr__(self, "shard_size", int(self.shard_size))
        if self.dtype == "bytes":
            if self.sample_shape is not None:
                raise StoreError("dtype 'bytes' samples are variable-length: sample_shape must be None")
            if self.quantized:
                raise StoreError("dtype 'bytes' cannot be quantized")
        else:
            if self.sample_shape is None or len(self.sample_shape) < 1:
                raise StoreError(f"dtype {self.dtype!r} needs a sample_shape")
            shape = tuple(int(s) for s in self.sample_shape)
            if any(s < 1 for s in shape):
                raise StoreError(f"bad sample_shape {shape}")
            object.__setattr__(self, "sample_shape", shape)
        if self.quantized:
            if self.dtype != "uint8":
                raise StoreError("quantized stores hold uint8 codes: dtype must be 'uint8'")
            if len(self.sample_shape) < 3:
                raise StoreError("quantization is per (..., h, w) map: sample_shape needs >= 3 dims")
        if self.quant_scheme not in QUANT_SCHEMES:
            raise StoreError(f"unknown quantization scheme {self.quant_scheme!r}")
        if self.chunk_samples is not None:
            c = int(self.chunk_samples)
            if c < 1 or self.shard_size % c:
                raise StoreError(f"chunk_samples={c} must divide shard_size={self.shard_size}")
            object.__setattr__(self, "chunk_samples", c)
        parse_compression(self.compression)

    # ----------------------------------------------------------------- derived
    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_slots / self.shard_size)

    def shard_range(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.n_shards:
            raise StoreError(f"shard index {index} out of range 0..{self.n_shards - 1}")
        return index * self.shard_size, min((index + 1) * self.shard_size, self.n_slots)

    @property
    def qparam_shape(self) -> tuple | None:
        return tuple(self.sample_shape[:-2]) if self.quantized else None

    @property
    def sample_nbytes(self) -> int | None:
        if self.dtype == "bytes":
            return None
        return int(np.prod(self.sample_shape)) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sample_shape"] = list(self.sample_shape) if self.sample_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StoreSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise StoreError(f"unknown StoreSpec fields {sorted(unknown)}")
        d = dict(d)
        if d.get("sample_shape") is not None:
            d["sample_shape"] = tuple(d["sample_shape"])
        return cls(**d)


def parse_compression(text: str) -> tuple[str, int | None]:
    """``"zstd:5"`` -> ("zstd", 5); ``"default"`` -> ("default", None)."""
    name, _, level = str(text).partition(":")
    if name not in ("default", "zstd", "gzip", "lzf", "none"):
        raise StoreError(f"unknown compression {text!r}")
    if level:
        if name in ("default", "lzf", "none"):
            raise StoreError(f"compression {name!r} takes no level")
        try:
            lv = int(level)
        except ValueError:
            raise StoreError(f"bad compression level in {text!r}") from None
        return name, lv
    return name, None


# --------------------------------------------------------------------------------------- batch
@dataclass
class ShardBatch:
    """The samples of one shard, in slot order (see the module docstring)."""

    slots: np.ndarray
    keys: list
    x: Any                      # (n, *sample_shape) array of the store dtype, or list[bytes]
    y: np.ndarray
    meta: list
    qscale: np.ndarray | None = None
    qoffset: np.ndarray | None = None
    hw: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def validate(self, spec: StoreSpec, index: int) -> None:
        lo, hi = spec.shard_range(index)
        slots = np.asarray(self.slots)
        n = len(slots)
        if slots.ndim != 1 or slots.dtype.kind not in "iu":
            raise StoreError(f"shard {index}: slots must be a 1-d integer array")
        if n and (slots.min() < lo or slots.max() >= hi):
            raise StoreError(f"shard {index}: slots outside [{lo}, {hi})")
        if n > 1 and not (np.diff(slots) > 0).all():
            raise StoreError(f"shard {index}: slots must be sorted and unique")
        if len(self.keys) != n or len(self.meta) != n or len(np.asarray(self.y)) != n:
            raise StoreError(f"shard {index}: slots, keys, y and meta lengths differ")
        if len(set(self.keys)) != n:
            raise StoreError(f"shard {index}: duplicate keys")
        for k in self.keys:
            check_key(k)
        if np.asarray(self.y).dtype.kind not in "iu":
            raise StoreError(f"shard {index}: y must be integers")
        for m in self.meta:
            if not isinstance(m, dict):
                raise StoreError(f"shard {index}: meta entries must be dicts")
        if spec.dtype == "bytes":
            if not isinstance(self.x, (list, tuple)) or len(self.x) != n or \
                    not all(isinstance(b, (bytes, bytearray, memoryview)) for b in self.x):
                raise StoreError(f"shard {index}: x must be a list of {n} bytes objects")
        else:
            x = self.x
            if not isinstance(x, np.ndarray):
                raise StoreError(f"shard {index}: x must be a numpy array")
            if x.shape != (n, *spec.sample_shape):
                raise StoreError(f"shard {index}: x shape {x.shape} != {(n, *spec.sample_shape)}")
            if x.dtype != np.dtype(spec.dtype):
                raise StoreError(f"shard {index}: x dtype {x.dtype} != store dtype {spec.dtype}")
            if x.dtype.kind == "f" and n and not all_finite(x):
                raise StoreError(f"shard {index}: x holds NaN or inf (float16 overflow?)")
        if spec.quantized:
            for name in ("qscale", "qoffset"):
                a = getattr(self, name)
                if a is None or np.asarray(a).shape != (n, *spec.qparam_shape):
                    raise StoreError(f"shard {index}: {name} must have shape {(n, *spec.qparam_shape)}")
                if np.asarray(a).dtype != np.float32:
                    raise StoreError(f"shard {index}: {name} must be float32")
        elif self.qscale is not None or self.qoffset is not None:
            raise StoreError(f"shard {index}: qscale/qoffset given for a store that is not quantized")
        if spec.has_hw:
            if self.hw is None or np.asarray(self.hw).shape != (n, 2):
                raise StoreError(f"shard {index}: hw must have shape {(n, 2)}")
        elif self.hw is not None:
            raise StoreError(f"shard {index}: hw given for a store without has_hw")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise StoreError(f"shard {index}: meta is not JSON-able: {e}") from None

    def payload_nbytes(self) -> int:
        if isinstance(self.x, (list, tuple)):
            return int(sum(len(b) for b in self.x))
        return int(self.x.nbytes)


# --------------------------------------------------------------------------------------- record
def _canon(obj):
    if isinstance(obj, dict):
        return {str(k): _canon(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    return obj


@dataclass
class ShardRecord:
    """What ``write_shard`` wrote; JSON round-trippable. ``files`` maps paths relative to the store
    root to ``{"sha256", "bytes"}``; ``extra`` holds format-specific index data (wds member
    offsets, bitstream lengths)."""

    index: int
    count: int
    slots: list
    keys: list
    y: list
    meta: list
    files: dict
    bytes: int
    payload_bytes: int
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # canonical form (sorted dict keys all the way down), so that a record that went through
        # a JSON round trip with sort_keys (a resumed job) serializes to the same bytes
        self.meta = [_canon(m) for m in self.meta]
        self.files = _canon(self.files)
        self.extra = _canon(self.extra)

    def to_dict(self) -> dict:
        # the fields as they are (plain JSON values already): dataclasses.asdict deep-copies
        # every sample's meta (the job's commit: 0.40 -> 0.27 s for 20k samples, with the change
        # to the source listing; benchmarks/job_overhead.py)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise StoreError(f"bad shard record: {e}") from None

    def summary(self) -> dict:
        """The manifest's per-shard entry."""
        return {"index": self.index, "count": self.count, "files": self.files,
                "bytes": self.bytes, "payload_bytes": self.payload_bytes}


# --------------------------------------------------------------------------------------- writer
class StoreWriter:
    """Base of the format writers; picklable (holds only ``out`` and ``spec``)."""

    layout: str = ""

    def __init__(self, out, spec: StoreSpec):
        self.out = as_path(out)  # a local Path, or a RemotePath (s3://…: stores.fs)
        self.spec = spec

    def __reduce__(self):
        return (type(self), (str(self.out), self.spec))

    @property
    def remote(self) -> bool:
        """Whether the store is in an object store (independent requests then run concurrently,
        ``fs.each_of``)."""
        return isinstance(self.out, RemotePath)

    # ---------------------------------------------------------------- prepare
    @property
    def state_dir(self) -> Path:
        return self.out / STATE_DIR

    def record_path(self, index: int) -> Path:
        return self.state_dir / f"{shard_name(index)}.json"

    def prepare(self) -> None:
        """Create the layout idempotently. An existing store with the same spec is kept as it is
        (completed shards survive); a different spec is refused; stale temporary files of killed
        writers are removed."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(exist_ok=True)
        spec_file = self.state_dir / "spec.json"
        want = {"spec_version": _SPEC_FORMAT_VERSION, "layout": self.layout, "spec": self.spec.to_dict()}
        if spec_file.exists():
            try:
                have = json.loads(spec_file.read_text())
            except (OSError, ValueError) as e:
                raise StoreError(f"{spec_file} is unreadable ({e}); remove the store to start over") from None
            if have != want:
                raise StoreError(f"{self.out} holds a store with a different spec ({have.get('spec')}); "
                                 f"refusing to mix it with {want['spec']}")
        else:
            atomic_write_bytes(spec_file, json_bytes(want))
        remove_tmp_files(self.out)
        self._prepare_layout()

    def _prepare_layout(self) -> None:
        """Files a format writes once per store before any shard (zarr's group and array
        metadata); none by default."""

    # ---------------------------------------------------------------- shards
    def write_shard(self, shard_index: int, batch: ShardBatch) -> ShardRecord:
        """Write all files of shard ``shard_index`` (and nothing shared), then its record."""
        batch.validate(self.spec, shard_index)
        try:
            files, extra = self._write_files(shard_index, batch)
        except OSError as exc:
            if exc.filename or exc.errno is None:
                raise
            # tarfile, h5py and zarr's stores write without naming the file: say which shard
            raise OSError(exc.errno, exc.strerror, f"{self.out}/{shard_name(shard_index)}") from exc
        rec = ShardRecord(
            index=int(shard_index), count=len(batch),
            slots=[int(s) for s in np.asarray(batch.slots)], keys=list(batch.keys),
            y=[int(v) for v in np.asarray(batch.y)], meta=list(batch.meta),
            files=dict(sorted(files.items())), bytes=int(sum(f["bytes"] for f in files.values())),
            payload_bytes=batch.payload_nbytes(), extra=extra)
        atomic_write_bytes(self.record_path(shard_index), json_bytes(rec.to_dict()))
        return rec

    def _write_files(self, index: int, batch: ShardBatch) -> tuple[dict, dict]:  # pragma: no cover
        raise NotImplementedError

    def load_record(self, shard_index: int) -> ShardRecord | None:
        """The committed record of a shard, or None (never written, or unreadable). The files are
        not re-hashed here: call ``check_shard``."""
        p = self.record_path(shard_index)
        try:
            rec = ShardRecord.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, StoreError):
            return None
        return rec if rec.index == shard_index else None

    def check_shard(self, record: ShardRecord) -> bool:
        """True when every file of the record exists with its recorded size and sha256.

        In an object store, with its recorded size only (one HEAD per object, nothing
        downloaded): an object appears whole or not at all, and the record is written after
        the shard's objects, so a record names complete objects; ``verify`` re-hashes them."""
        try:
            if record.count != len(record.slots) or not 0 <= record.index < self.spec.n_shards:
                return False
            if self.remote:
                def size_ok(item):
                    rel, info = item
                    try:
                        return inside(self.out, rel, "shard record file").stat().st_size \
                            == info["bytes"]
                    except FileNotFoundError:
                        return False
                return all(each_of(size_ok, sorted(record.files.items())))
            for rel, info in record.files.items():
                p = inside(self.out, rel, "shard record file")  # records are read from OUT too
                if p.is_symlink() or not p.is_file() or p.stat().st_size != info["bytes"]:
                    return False
                if sha256_file(p) != info["sha256"]:
                    return False
        except (OSError, KeyError, TypeError, StoreError):
            return False
        return True

    # ---------------------------------------------------------------- finalize
    def finalize(self, manifest: dict, records: list) -> None:
        """Write the global index files, then ``manifest.json`` atomically."""
        records = sorted((r if isinstance(r, ShardRecord) else ShardRecord.from_dict(r) for r in records),
                         key=lambda r: r.index)
        if [r.index for r in records] != list(range(self.spec.n_shards)):
            raise StoreError(f"finalize needs one record per shard 0..{self.spec.n_shards - 1}, "
                             f"got {[r.index for r in records]}")
        for r in records:
            lo, hi = self.spec.shard_range(r.index)
            if any(not lo <= s < hi for s in r.slots) or len(r.slots) != r.count:
                raise StoreError(f"record of shard {r.index} is inconsistent with the spec")
        # the records under _store/ are resume state; keep them equal to what is committed
        def keep(r):
            data = json_bytes(r.to_dict())
            p = self.record_path(r.index)
            try:
                same = p.read_bytes() == data
            except OSError:
                same = False
            if not same:
                atomic_write_bytes(p, data)
        each_of(keep, records, self.remote)
        global_files, store_extra = self._finalize_index(records)
        full = build_manifest(manifest, self.spec, self.layout, records, global_files, store_extra)
        write_manifest(self.out, full)

    def _finalize_index(self, records: list) -> tuple[dict, dict]:  # pragma: no cover
        raise NotImplementedError


def records_arrays(spec: StoreSpec, records: list) -> dict:
    """Global per-sample arrays (slot order) from the records."""
    slots = np.asarray([s for r in records for s in r.slots], dtype=np.int64)
    keys = [k for r in records for k in r.keys]
    y = np.asarray([v for r in records for v in r.y], dtype=np.int64)
    shard = np.asarray([r.index for r in records for _ in r.slots], dtype=np.int32)
    pos = np.asarray([i for r in records for i in range(r.count)], dtype=np.int32)
    meta = [m for r in records for m in r.meta]
    return {"slot": slots, "key": keys, "y": y, "shard": shard, "pos": pos, "meta": meta}
