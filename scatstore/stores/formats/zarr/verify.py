"""The zarr store's own checks for ``scatstore verify`` (after the files were re-hashed): no
unlisted file in ``data.zarr``, the ``valid`` counts, and every chunk of every per-shard array
decoding with its crc32c intact (zarr-python checks it), so a flipped byte is found even when
the manifest's checksums were refreshed; for ``dtype tc`` stores, every blob of ``bits/NNNNNN``
through the codec's own checks (``verify.check_blobs``: a blob damaged before its chunk's
crc32c was computed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...verify import check_blobs, coefficient_codec, row_blocks
from .writer import GROUP


def verify(root: Path, m: dict, report) -> None:
    import zarr

    report.unlisted(root, report.data_files(root, GROUP), "zarr readers would open it")
    store = m["store"]
    ss = store["shard_size"]
    g = zarr.open_group(str(root / GROUP), mode="r")
    valid = np.asarray(g["valid"][:], dtype=bool)
    if len(valid) != m["n_slots"]:
        report.problems.append(f"valid has {len(valid)} slots, manifest n_slots is {m['n_slots']}")
        return
    report.compare_counts([int(valid[i * ss:(i + 1) * ss].sum()) for i in range(store["n_shards"])], m)
    names = [n for n in ("x", "qscale", "qoffset", "hw") if n in g]
    for i in range(store["n_shards"]):
        lo, hi = i * ss, min((i + 1) * ss, m["n_slots"])
        for name in names:
            try:
                a = g[name]
                row = a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
                for b0, b1 in row_blocks(lo, hi, row, multiple=a.chunks[0]):
                    a[b0:b1]
            except Exception as e:  # noqa: BLE001 - zarr's checksum ValueError, codec errors
                report.damaged.append((i, f"{GROUP}/{name}", f"does not decode: {e}"))
    codec = coefficient_codec(m, report) if "bits" in g else None
    if codec is not None:
        off = np.asarray(g["bits_offsets"][:], dtype=np.int64)
        index = np.cumsum(valid) - 1  # slot -> dataset index
        keys = np.asarray(g["key"][:])
    for i in range(store["n_shards"]) if "bits" in g else ():
        rel = f"{GROUP}/bits/{i:06d}"
        try:
            bits = np.asarray(g[f"bits/{i:06d}"][:])
        except Exception as e:  # noqa: BLE001
            report.damaged.append((i, rel, f"does not decode: {e}"))
            continue
        if codec is None:
            continue
        lo, hi = i * ss, min((i + 1) * ss, m["n_slots"])
        slots = lo + np.flatnonzero(valid[lo:hi])
        a, b = off[slots] - off[lo], off[slots + 1] - off[lo]
        if len(slots) and (a.min() < 0 or (b < a).any() or b.max() > len(bits)):
            report.damaged.append((i, rel, "bits_offsets lie outside its bytes"))
            continue
        check_blobs(report, codec, i, rel, [bits[x:y].tobytes() for x, y in zip(a, b)],
                    index[slots], [bytes(keys[s]).rstrip(b"\0").decode("ascii", "replace")
                                   for s in slots])
