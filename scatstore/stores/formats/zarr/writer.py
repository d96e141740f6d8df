"""zarr v3 store writer: ``OUT/data.zarr`` (layout ``scatstore-zarr-v1``, docs/format.md).

Per-shard arrays (written by ``write_shard``; one encode shard = one file per array):
``x`` (N, *sample_shape) sharded with shard = ``shard_size`` samples, inner chunks of
``chunk_samples`` samples, ``qscale``/``qoffset`` (N, C, K) and ``hw`` (N, 2) with one chunk per
encode shard, and for bitstream stores ``bits/NNNNNN`` (one uint8 array per shard).
Global arrays (written by ``finalize`` from the shard records): ``valid``, ``y``, ``key``,
``meta_json``/``meta_offsets``, ``boxes``/``box_category``/``box_offsets`` (when samples carry COCO
boxes), ``bits_offsets``.

Only core codecs are used (bytes, zstd or gzip, crc32c, sharding_indexed), so tensorstore and
other zarr v3 readers open every array. Shard files are encoded in memory with zarr-python and
written with temp + fsync + rename, so a killed writer never leaves a half shard under its name.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np

from ...base import ShardBatch, StoreSpec, StoreWriter, parse_compression, records_arrays
from ...errors import StoreError
from ...files import atomic_write_bytes, sha256_file
from ...fs import RemotePath, each_of

LAYOUT = "scatstore-zarr-v1"
GROUP = "data.zarr"
CHUNK_TARGET = 1 << 20        # >= 1 MiB uncompressed inner chunks for x
BITS_CHUNK_MAX = 1 << 16      # bitstream inner chunks <= 64 KiB
GLOBAL_CHUNK = 1 << 18        # elements per chunk of the 1-d global arrays
META_CHUNK = 1 << 20          # bytes per chunk of meta_json


def choose_chunk_samples(shard_size: int, sample_nbytes: int, target: int = CHUNK_TARGET) -> int:
    """Smallest divisor of ``shard_size`` whose chunk holds >= ``target`` bytes (else the shard)."""
    for d in range(1, shard_size + 1):
        if shard_size % d == 0 and d * sample_nbytes >= target:
            return d
    return shard_size


def _compressors(spec: StoreSpec, payload: bool = True):
    from zarr.codecs import Crc32cCodec, GzipCodec, ZstdCodec

    name, level = parse_compression(spec.compression)
    if name == "default":
        # bitstreams are entropy-coded: compressing them again only costs time
        name, level = ("none", None) if (spec.dtype == "bytes" and payload) else ("zstd", 3)
    if name == "lzf":
        raise StoreError("lzf is an HDF5 filter; zarr stores take zstd, gzip or none")
    if name == "zstd":
        return [ZstdCodec(level=3 if level is None else level), Crc32cCodec()]
    if name == "gzip":
        return [GzipCodec(level=5 if level is None else level), Crc32cCodec()]
    return [Crc32cCodec()]


def compression_info(spec: StoreSpec) -> dict:
    return {"payload": [c.to_dict() for c in _compressors(spec, True)],
            "aux": [c.to_dict() for c in _compressors(spec, False)]}


def _create(store, name, **kw):
    import zarr

    # write_empty_chunks: zarr otherwise compares every chunk with the fill value before writing
    # it (a byte-wise pass over the whole shard, 0.15 ms per scat1 sample, 40 % of the write);
    # a chunk of zeros then costs a few bytes of zstd instead of being left out. Not stored in
    # the metadata: readers see a valid shard either way.
    return zarr.create_array(store, name=name, fill_value=0, overwrite=True,
                             config={"write_empty_chunks": True}, **kw)


def _mem():
    from zarr.storage import MemoryStore

    d: dict = {}
    return MemoryStore(d), d


def _array_defs(spec: StoreSpec) -> dict:
    """name -> create_array kwargs for the per-shard arrays (not bits)."""
    n = spec.n_slots
    defs = {}
    if spec.dtype != "bytes":
        cs = spec.chunk_samples or choose_chunk_samples(spec.shard_size, spec.sample_nbytes)
        defs["x"] = dict(shape=(n, *spec.sample_shape), dtype=spec.dtype,
                         chunks=(cs, *spec.sample_shape), shards=(spec.shard_size, *spec.sample_shape),
                         compressors=_compressors(spec))
    if spec.quantized:
        for q in ("qscale", "qoffset"):
            defs[q] = dict(shape=(n, *spec.qparam_shape), dtype="float32",
                           chunks=(spec.shard_size, *spec.qparam_shape), compressors=_compressors(spec, False))
    if spec.has_hw:
        defs["hw"] = dict(shape=(n, 2), dtype="int32", chunks=(spec.shard_size, 2),
                          compressors=_compressors(spec, False))
    return defs


def _bits_def(spec: StoreSpec, length: int) -> dict:
    n_chunks = max(1, math.ceil(length / BITS_CHUNK_MAX))
    chunk = max(1, math.ceil(length / n_chunks))  # near-equal chunks: < n_chunks bytes of padding
    return dict(shape=(length,), dtype="uint8", chunks=(chunk,), shards=(chunk * n_chunks,),
                compressors=_compressors(spec, True))


def _encode(name: str, kw: dict, assign=None) -> dict:
    """Encode an array in memory; ``assign(arr)`` writes data. Returns {key: bytes} (zarr.json too)."""
    store, d = _mem()
    arr = _create(store, name, **kw)
    if assign is not None:
        assign(arr)
    # zarr also writes implicit parent groups (root zarr.json, ...): keep only this array's keys
    return {k: v.to_bytes() for k, v in d.items() if k.startswith(name + "/")}


def _group_json(spec: StoreSpec) -> bytes:
    import zarr

    store, d = _mem()
    zarr.create_group(store, attributes={"scatstore": {"layout": LAYOUT, "spec": spec.to_dict()}})
    return d["zarr.json"].to_bytes()


class ZarrWriter(StoreWriter):
    layout = LAYOUT

    @property
    def root(self) -> Path:
        return self.out / GROUP

    def _write_if_changed(self, path: Path, data: bytes) -> None:
        try:
            same = path.read_bytes() == data
        except FileNotFoundError:
            same = False
        if not same:
            atomic_write_bytes(path, data)
        if isinstance(path, RemotePath):  # what the object holds now: finalize needs no re-read
            self.__dict__.setdefault("_known", {})[str(path)] = {
                "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def _info(self, path) -> dict:
        return self.__dict__.get("_known", {}).get(str(path)) or _file_info(path)

    def _prepare_layout(self) -> None:
        spec = self.spec
        meta = [(self.root / "zarr.json", _group_json(spec))]
        for name, kw in _array_defs(spec).items():
            enc = _encode(name, kw)
            meta.append((self.root / name / "zarr.json", enc[f"{name}/zarr.json"]))
        if spec.dtype == "bytes":
            import zarr
            store, d = _mem()
            zarr.create_group(store, path="bits", attributes={"scatstore": "one uint8 array per shard"})
            meta.append((self.root / "bits" / "zarr.json", d["bits/zarr.json"].to_bytes()))
        each_of(lambda pd: self._write_if_changed(*pd), meta, self.remote)

    def _shard_paths(self, name: str, kw: dict, index: int) -> str:
        return "/".join([name, "c", str(index)] + ["0"] * (len(kw["shape"]) - 1))

    def _write_files(self, index: int, batch: ShardBatch):
        spec = self.spec
        lo, hi = spec.shard_range(index)
        local = np.asarray(batch.slots, dtype=np.int64) - lo
        files: dict = {}
        extra: dict = {}

        def put(name, kw, full):
            def assign(arr):
                arr[lo:hi] = full
            enc = _encode(name, kw, assign)
            key = self._shard_paths(name, kw, index)
            # written even when all zeros (write_empty_chunks): the shard file always exists
            files[f"{GROUP}/{key}"] = atomic_write_bytes(self.root / key, enc[key])

        for name, kw in _array_defs(spec).items():
            src = {"x": batch.x, "qscale": batch.qscale, "qoffset": batch.qoffset, "hw": batch.hw}[name]
            src = np.asarray(src)
            if len(local) == hi - lo and src.dtype == np.dtype(kw["dtype"]):
                full = src  # every slot of the shard kept (slots are sorted and unique)
            else:  # rejected samples leave rows of zeros
                full = np.zeros((hi - lo, *kw["shape"][1:]), dtype=kw["dtype"])
                full[local] = src
            put(name, kw, full)
        if spec.dtype == "bytes":
            lengths = [len(b) for b in batch.x]
            blob = np.frombuffer(b"".join(bytes(b) for b in batch.x), dtype=np.uint8)
            name = f"bits/{index:06d}"
            kw = _bits_def(spec, len(blob))

            def assign(arr):
                if len(blob):
                    arr[:] = blob
            enc = _encode(name, kw, assign)
            adir = self.root / "bits" / f"{index:06d}"
            for p in sorted(adir.rglob("*")) if adir.exists() else []:
                if p.is_file() and f"{name}/{p.relative_to(adir).as_posix()}" not in enc:
                    p.unlink()
            for key in sorted(enc):
                files[f"{GROUP}/{key}"] = atomic_write_bytes(self.root / key, enc[key])
            extra["lengths"] = lengths
        return files, extra

    # ------------------------------------------------------------------ finalize
    def _finalize_index(self, records: list):
        spec = self.spec
        n = spec.n_slots
        ga = records_arrays(spec, records)
        slots = ga["slot"]
        valid = np.zeros(n, dtype=bool)
        valid[slots] = True
        y = np.full(n, -1, dtype=np.int64)
        y[slots] = ga["y"]
        kb = [k.encode("ascii") for k in ga["key"]]
        width = max([len(k) for k in kb] + [1])
        key = np.zeros((n, width), dtype=np.uint8)
        for s, k in zip(slots, kb):
            key[s, :len(k)] = np.frombuffer(k, dtype=np.uint8)
        # ragged JSON meta and COCO boxes, indexed by slot
        mj = [b""] * n
        nbox = np.zeros(n, dtype=np.int64)
        boxes, cats = [], []
        has_boxes = any("boxes" in m for m in ga["meta"])
        for s, m in zip(slots, ga["meta"]):
            mj[s] = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
            if has_boxes:
                b = np.asarray(m.get("boxes", []), dtype=np.float32).reshape(-1, 4)
                c = np.asarray(m.get("category_ids", [-1] * len(b)), dtype=np.int32).reshape(-1)
                if len(c) != len(b):
                    raise StoreError(f"slot {s}: {len(b)} boxes but {len(c)} category_ids")
                boxes.append(b)
                cats.append(c)
                nbox[s] = len(b)
        meta_off = np.zeros(n + 1, dtype=np.int64)
        meta_off[1:] = np.cumsum([len(b) for b in mj])
        meta_blob = np.frombuffer(b"".join(mj), dtype=np.uint8)

        arrays = {"valid": valid, "y": y, "key": key, "meta_json": meta_blob, "meta_offsets": meta_off}
        if has_boxes:
            arrays["boxes"] = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
            arrays["box_category"] = np.concatenate(cats) if cats else np.zeros(0, np.int32)
            bo = np.zeros(n + 1, dtype=np.int64)
            bo[1:] = np.cumsum(nbox)
            arrays["box_offsets"] = bo
        if spec.dtype == "bytes":
            lens = np.zeros(n, dtype=np.int64)
            lens[slots] = [ln for r in records for ln in r.extra["lengths"]]
            bo = np.zeros(n + 1, dtype=np.int64)
            bo[1:] = np.cumsum(lens)
            arrays["bits_offsets"] = bo
        def one(name) -> dict:
            """The files of global array ``name`` (none when the store has no such array),
            replacing what an earlier finalize of this OUT left there."""
            enc: dict = {}
            if name in arrays:
                a = arrays[name]
                c0 = META_CHUNK if name == "meta_json" else GLOBAL_CHUNK
                if a.ndim == 2:
                    c0 = max(1, c0 // a.shape[1])
                kw = dict(shape=a.shape, dtype=a.dtype,
                          chunks=(max(1, min(len(a), c0)), *a.shape[1:]),
                          compressors=_compressors(spec, False))

                def assign(arr, a=a):
                    if a.size:
                        arr[...] = a
                enc = _encode(name, kw, assign)
            adir = self.root / name
            if isinstance(adir, RemotePath):  # objects: remove only those not rewritten now
                for rel in (adir.rglob_files() if name in present else ()):
                    if f"{name}/{rel}" not in enc:
                        (adir / rel).unlink(missing_ok=True)
            elif adir.exists():
                shutil.rmtree(adir)
            return {f"{GROUP}/{k}": atomic_write_bytes(self.root / k, enc[k]) for k in sorted(enc)}

        # in an object store, one listing says which arrays an earlier finalize left
        present = {p.name for p in self.root.iterdir()} if self.remote else set()
        global_files: dict = {}
        # every array at once in an object store (a request's round trip each), in order here
        for files in each_of(one, ("valid", "y", "key", "meta_json", "meta_offsets", "boxes",
                                   "box_category", "box_offsets", "bits_offsets"), self.remote):
            global_files.update(files)
        for rel in ("zarr.json",):
            global_files[f"{GROUP}/{rel}"] = self._info(self.root / rel)
        for name in list(_array_defs(spec)) + (["bits"] if spec.dtype == "bytes" else []):
            global_files[f"{GROUP}/{name}/zarr.json"] = self._info(self.root / name / "zarr.json")
        cs = _array_defs(spec).get("x", {}).get("chunks", [None])[0]
        extra = {"group": GROUP, "chunk_samples": cs, "compression": compression_info(spec),
                 "key_width": width, "has_boxes": has_boxes}
        return global_files, extra


def _file_info(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def shard_files_present(root: Path) -> list:
    """All files under data.zarr (for tests and tools)."""
    g = root / GROUP
    return sorted(p.relative_to(root).as_posix() for p in g.rglob("*") if p.is_file()) \
        if g.exists() else []


__all__ = ["ZarrWriter", "LAYOUT", "GROUP", "choose_chunk_samples"]
