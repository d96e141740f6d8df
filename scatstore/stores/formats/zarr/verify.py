"""The zarr store's own checks for ``scatstore verify`` (after the files were re-hashed): no
unlisted file in ``data.zarr``, the ``valid`` counts, and every chunk of every per-shard array
decoding with its crc32c intact (zarr-python checks it), so a flipped byte is found even when
the manifest's checksums were refreshed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...verify import row_blocks
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
        if "bits" in g:
            try:
                g[f"bits/{i:06d}"][:]
            except Exception as e:  # noqa: BLE001
                report.damaged.append((i, f"{GROUP}/bits/{i:06d}", f"does not decode: {e}"))
