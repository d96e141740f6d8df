"""The HDF5 store's own checks for ``scatstore verify`` (after the files were re-hashed): no
unlisted ``.h5`` beside the shards, every shard file opening with the datasets of its spec, its
keys those of ``index.npy``, its payload readable (HDF5 filters decode); for ``dtype tc`` stores,
every blob of ``bits`` through the codec's own checks (``verify.check_blobs``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import StoreError
from ...index_npy import load_index_npy, verify_index_npy
from ...verify import check_blobs, coefficient_codec, row_blocks


def verify(root: Path, m: dict, report) -> None:
    import h5py

    report.unlisted(root, report.data_files(root, "", (".h5", ".hdf5")),
                    "not a shard of this store")
    try:
        ix = load_index_npy(root, m)
    except StoreError as e:
        report.problems.append(str(e))
        return
    codec = coefficient_codec(m, report)
    for s in m["store"]["shards"]:
        want = [k.decode("ascii") for k in ix["key"][ix["shard"] == s["index"]]]
        for rel in sorted(s["files"]):
            if not rel.endswith(".h5"):
                continue
            try:
                with h5py.File(root / rel, "r") as f:
                    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["key"][:]]
                    if keys != want:
                        report.damaged.append((s["index"], rel, "its keys differ from index.npy"))
                    for name in ("x", "bits"):
                        if name in f:
                            d = f[name]
                            row = d.dtype.itemsize * max(1, int(d.size // max(1, len(d))))
                            for a, b in row_blocks(0, len(d), row):
                                d[a:b]
                    if codec is not None and "bits" in f:
                        bits, off = f["bits"][:], np.asarray(f["bits_offsets"][:], dtype=np.int64)
                        rows = np.flatnonzero(ix["shard"] == s["index"])
                        pos = ix["pos"][rows].astype(np.int64)
                        check_blobs(report, codec, s["index"], rel,
                                    [bits[off[p]:off[p + 1]].tobytes() for p in pos], rows, want)
            except Exception as e:  # noqa: BLE001 - h5py raises OSError/KeyError/... on damage
                report.damaged.append((s["index"], rel, f"unreadable: {type(e).__name__}: {e}"))
    verify_index_npy(root, m, report)
