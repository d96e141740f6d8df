"""``index.npy``: the structured per-sample index of the stores that keep one (webdataset, HDF5).

One row per stored sample in slot order: ``slot``, ``shard``, ``pos`` (position in the shard),
``y``, ``key`` and, per tar member extension ``E``, ``off_E``/``size_E`` (docs/format.md). Written
with ``allow_pickle=False`` and read the same way.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .errors import StoreError


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def member_field(ext: str) -> str:
    return ext.replace(".", "_")


def build_index(ga: dict, exts: list, offsets: list) -> np.ndarray:
    width = max([len(k) for k in ga["key"]] + [1])
    fields = [("slot", "<i8"), ("shard", "<i4"), ("pos", "<i4"), ("y", "<i8"), ("key", f"S{width}")]
    for e in exts:
        fields += [(f"off_{member_field(e)}", "<i8"), (f"size_{member_field(e)}", "<i8")]
    n = len(ga["slot"])
    idx = np.zeros(n, dtype=fields)
    for name in ("slot", "shard", "pos", "y"):
        idx[name] = ga[name]
    idx["key"] = [k.encode("ascii") for k in ga["key"]]
    off = np.asarray(offsets, dtype=np.int64).reshape(n, 2 * len(exts))
    for j, e in enumerate(exts):
        idx[f"off_{member_field(e)}"] = off[:, 2 * j]
        idx[f"size_{member_field(e)}"] = off[:, 2 * j + 1]
    return idx


def load_index_npy(root: Path, manifest: dict) -> np.ndarray:
    """The structured ``index.npy`` of wds/h5 stores (never unpickled)."""
    p = root / manifest["store"].get("index", "index.npy")
    try:
        a = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {p}: {e}") from None
    if a.dtype.names is None or not {"slot", "shard", "pos", "y", "key"} <= set(a.dtype.names):
        raise StoreError(f"{p} is not a scatstore index")
    return a


def verify_index_npy(root: Path, m: dict, report) -> None:
    """verify's check of ``index.npy``: the samples per shard it lists are the manifest's."""
    store = m["store"]
    ix = load_index_npy(root, m)
    if len(ix) != m["count"]:
        report.problems.append(f"index holds {len(ix)} samples, manifest count is {m['count']}")
        return
    report.compare_counts(np.bincount(ix["shard"], minlength=store["n_shards"]).tolist()
                          [:store["n_shards"]], m)
