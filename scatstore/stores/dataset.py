"""Map-style reading of a finished store: ``open_dataset(OUT)`` for zarr, webdataset and HDF5.

Index ``i`` runs over the stored samples (``len(ds) == manifest["count"]``) in slot order; empty
slots (rejected sources) are skipped. ``ds[i]`` returns ``(x, label, meta)``:

- ``x``: float32 ``np.ndarray`` of ``sample_shape``: float16/float32 samples converted, quantized
  ones dequantized, transform-coded ones (``dtype tc``: bytes samples with a
  ``coefficient_codec`` in the manifest) decoded to ``(C, K, h, w)``; raw uint8 pixels are
  returned as uint8 (there is nothing to decode); other bitstream (``bytes``) samples as
  ``bytes``. With ``raw=True`` the stored array (uint8 codes, float16, the tc blob) is
  returned and ``meta`` carries ``qscale``/``qoffset``.
- ``label``: int (-1 when unlabeled).
- ``meta``: the sample's stored meta dict plus ``key``, ``slot`` and (COCO canvases) ``hw``.

A store at a URL (``s3://``, ``gs://``, ``http(s)://``) is read through a local mirror
(:mod:`scatstore.stores.cache`): ``open_dataset`` fetches its manifest and global files, a
shard's files are fetched on first use (``ds.cache``; the streaming loader fetches them ahead).
Webdataset samples read one at a time from a shard not yet cached are ranged GETs of their tar
members (the ``index.npy`` offsets), not a download of the shard.

``get_batch(indices)`` returns stacked *stored* arrays for fast loaders (dequantize on the GPU with
``scatstore.transforms.quantize.dequantize_uint8``). Handles are opened lazily per process (a fork
after open reopens them) and the object pickles without them, so it can go to DataLoader workers.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np

from .base import StoreSpec
from .errors import StoreError
from .manifest import read_manifest
from .registry import get_format


class ScatDataset:
    """Base of the per-format readers (see the module docstring)."""

    #: a format that reads single samples of uncached shards with ranged requests sets this
    range_reads = False

    def __init__(self, root, manifest: dict | None = None, raw: bool = False, cache=None):
        self.root = Path(root)
        self.cache = cache  # a ShardCache when the store is remote (root is then its mirror)
        self.where = cache.where if cache is not None else str(self.root)
        self.manifest = manifest if manifest is not None else read_manifest(self.root)
        store = self.manifest["store"]
        if "spec" not in store:
            raise StoreError(f"{self.where}: manifest.store has no spec (pre-v1 store?)")
        self.spec = StoreSpec.from_dict(store["spec"])
        self.raw = raw
        q = self.manifest.get("quantization") or {}
        self.quant_scheme = q.get("scheme", self.spec.quant_scheme)
        self.coef_codec = None  # dtype tc: the store's CoefficientCodec
        if self.manifest.get("coefficient_codec") is not None:
            from scatstore.transforms.coefcodec import CoefficientCodec

            try:
                self.coef_codec = CoefficientCodec.from_json(self.manifest["coefficient_codec"])
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{self.where}: bad coefficient_codec in the manifest: {e}") from None
            if self.spec.dtype != "bytes":
                raise StoreError(f"{self.where}: a coefficient_codec with dtype {self.spec.dtype}")
        self._pid = None
        self._h: dict = {}
        self._lock = threading.Lock()
        with self._read_errors("its index"):
            self._load_index()
        if len(self.slots) != self.manifest["count"]:
            raise StoreError(f"{self.where}: index holds {len(self.slots)} samples, manifest count "
                             f"is {self.manifest['count']}")
        self._shard_of = (self.slots // self.spec.shard_size).astype(np.int64)

    # ---------------------------------------------------------------- per-process handles
    def _handles(self) -> dict:
        pid = os.getpid()
        if self._pid != pid:  # first use, or we are a forked child: never share parent handles
            with self._lock:
                if self._pid != pid:
                    self._h = {}
                    self._pid = pid
        return self._h

    def _need(self, idx, single: bool = False) -> None:
        """A remote store: the shards holding dataset indices ``idx`` are in the mirror (a single
        sample of a format with ranged reads is read without it)."""
        if self.cache is not None and not (single and self.range_reads):
            self.cache.ensure(np.unique(self._shard_of[np.asarray(idx, dtype=np.int64)]).tolist())

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        for v in list(self._h.values()):
            close = getattr(v, "close", None)
            if callable(close) and self._pid == os.getpid():
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass
        self._h = {}

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_h"] = {}
        d["_pid"] = None
        d.pop("_lock", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def _read_errors(self, what: str, i=None):
        """Whatever the libraries raise on a damaged or hostile file (zarr's checksum
        ValueError, h5py's OSError, a MemoryError from a size read from the store, ...) becomes
        a ``StoreError`` naming the store, the shard and what was read."""
        try:
            yield
        except StoreError:
            raise
        except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError, MemoryError,
                OverflowError, RuntimeError, UnicodeDecodeError) as e:
            where = f"shard {int(self._shard_of[i]):06d}, " if i is not None and \
                hasattr(self, "_shard_of") else ""
            raise StoreError(f"{self.where}: cannot read {where}{what}: {type(e).__name__}: {e}") from None

    # ---------------------------------------------------------------- map-style API
    def __len__(self) -> int:
        return len(self.slots)

    @property
    def labels_list(self) -> list:
        return self.labels.tolist()

    @property
    def n_shards(self) -> int:
        return self.spec.n_shards

    def shard_indices(self, shard: int) -> np.ndarray:
        """Dataset indices of the samples of encode shard ``shard`` (contiguous, in slot order)."""
        lo = np.searchsorted(self._shard_of, shard, side="left")
        hi = np.searchsorted(self._shard_of, shard, side="right")
        return np.arange(lo, hi, dtype=np.int64)

    def _index(self, i) -> int:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        return i

    def __getitem__(self, i):
        return self.get(i)

    def get(self, i, raw: bool | None = None):
        raw = self.raw if raw is None else raw
        i = self._index(i)
        self._need([i], single=True)
        with self._read_errors(f"sample {self.keys[i]!r}", i):
            x, qs, qo, hw = self._read(np.asarray([i]))
            meta = dict(self._meta(i))
        meta["key"] = self.keys[i]
        meta["slot"] = int(self.slots[i])
        if hw is not None:
            meta["hw"] = [int(v) for v in hw[0]]
        x = x[0]
        if self.coef_codec is not None and not raw:
            x = self.decode_tc([x])[0]
        elif self.spec.dtype != "bytes":
            if raw:
                if qs is not None:
                    meta["qscale"], meta["qoffset"] = qs[0], qo[0]
            elif self.spec.quantized:
                x = self.dequantize(x[None], qs[:1], qo[:1])[0]
            elif x.dtype != np.float32 and x.dtype.kind == "f":
                x = x.astype(np.float32)
        return x, int(self.labels[i]), meta

    @property
    def decoded_shape(self) -> tuple | None:
        """Shape of one decoded sample: ``sample_shape``, or the codec's for ``dtype tc``."""
        return tuple(self.coef_codec.shape) if self.coef_codec is not None else self.spec.sample_shape

    def decode_tc(self, blobs, threads: int = 1, dtype: str = "float32") -> np.ndarray:
        """Transform-coded blobs -> float coefficients ``(B, C, K, h, w)``; a damaged blob is a
        ``StoreError`` naming the store."""
        from scatstore.transforms.coefcodec import CorruptCoefficientsError

        try:
            return self.coef_codec.decode(blobs, dtype=dtype, threads=threads)
        except CorruptCoefficientsError as e:
            raise StoreError(f"{self.where}: {e}") from None

    def get_batch(self, indices, dequantize: bool = False) -> dict:
        """Stacked stored arrays: ``x`` (B, ...) (a list of bytes for bitstreams), ``y`` int64,
        ``slot`` int64, ``key`` list, and ``qscale``/``qoffset``/``hw`` when the store has them.
        ``dequantize``: quantized codes dequantized, transform-coded blobs decoded (float32)."""
        idx = np.asarray([self._index(i) for i in np.asarray(indices).reshape(-1)], dtype=np.int64)
        self._need(idx)
        with self._read_errors(f"{len(idx)} samples", idx[0] if len(idx) else None):
            x, qs, qo, hw = self._read(idx)
        out = {"x": x, "y": self.labels[idx].copy(), "slot": self.slots[idx].copy(),
               "key": [self.keys[i] for i in idx]}
        if qs is not None:
            out["qscale"], out["qoffset"] = qs, qo
            if dequantize:
                out["x"] = self.dequantize(x, qs, qo)
        if dequantize and self.coef_codec is not None:
            out["x"] = self.decode_tc(x)
        if hw is not None:
            out["hw"] = hw
        return out

    def iter_shard(self, shard: int):
        """Yield ``self[i]`` for the samples of one shard, in order (reads each chunk once)."""
        self._need(self.shard_indices(shard)[:1])
        for i in self.shard_indices(shard):
            yield self[i]

    def dequantize(self, q, qscale, qoffset):
        from scatstore.transforms.quantize import dequantize_uint8

        return dequantize_uint8(q, qscale, qoffset, scheme=self.quant_scheme)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.where!r}, n={len(self)}, format={self.spec.format}, "
                f"dtype={self.spec.dtype}, sample_shape={self.spec.sample_shape})")

    def _stack(self, xs: list, qs: list, qo: list, hws: list):
        """``_read``'s result from per-sample lists (formats that read sample by sample)."""
        spec = self.spec
        x = xs if spec.dtype == "bytes" else (np.stack(xs) if xs else
                                              np.zeros((0, *spec.sample_shape), spec.dtype))
        if spec.quantized:
            qs_a = np.stack(qs) if qs else np.zeros((0, *spec.qparam_shape), np.float32)
            qo_a = np.stack(qo) if qo else np.zeros((0, *spec.qparam_shape), np.float32)
        else:
            qs_a = qo_a = None
        hw = np.asarray(hws, dtype=np.int32).reshape(-1, 2) if spec.has_hw else None
        return x, qs_a, qo_a, hw

    # ---------------------------------------------------------------- format hooks
    def _load_index(self) -> None:  # sets slots, keys, labels
        raise NotImplementedError

    def _read(self, idx: np.ndarray):  # -> x, qscale, qoffset, hw
        raise NotImplementedError

    def _meta(self, i: int) -> dict:
        raise NotImplementedError


def open_dataset(path, raw: bool = False, cache_dir=None, cache_bytes: int | None = None,
                 fetch_threads: int = 8) -> ScatDataset:
    """Open a finished store (the directory or URL holding ``manifest.json``) as a map-style
    dataset. A URL (``s3://bucket/prefix``, ``gs://…``, ``https://…``) is read through a local
    mirror in ``cache_dir`` (default ``$SCATSTORE_CACHE_DIR`` or ``~/.cache/scatstore``) of at
    most ``cache_bytes`` of shard files (default: no limit), fetched by ``fetch_threads``."""
    from .fs import RemotePath, as_path

    root = as_path(path)
    m = read_manifest(root)
    try:
        fmt = get_format(m["store"]["format"])
    except StoreError as e:
        raise StoreError(f"{root}: {e}") from None
    if not isinstance(root, RemotePath):
        return fmt.dataset(root, m, raw=raw)
    from .cache import ShardCache

    cache = ShardCache(root, m, cache_dir=cache_dir, cache_bytes=cache_bytes, threads=fetch_threads)
    cache.open()
    return fmt.dataset(cache.root, m, raw=raw, cache=cache)
