"""The zarr store's own checks for ``scatstore verify`` (after the files were re-hashed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .writer import GROUP


def verify(root: Path, m: dict, report) -> None:
    import zarr

    store = m["store"]
    ss = store["shard_size"]
    g = zarr.open_group(str(root / GROUP), mode="r")
    valid = np.asarray(g["valid"][:], dtype=bool)
    if len(valid) != m["n_slots"]:
        report.problems.append(f"valid has {len(valid)} slots, manifest n_slots is {m['n_slots']}")
        return
    report.compare_counts([int(valid[i * ss:(i + 1) * ss].sum()) for i in range(store["n_shards"])], m)
