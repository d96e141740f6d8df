"""webdataset stores: ``OUT/shard-NNNNNN.tar`` + ``index.npy`` (writer, map-style reader, bulk
reader, verifier, and the shard list a plain webdataset pipeline reads)."""
from __future__ import annotations

from pathlib import Path

from ...registry import StoreFormat
from .bulk import WdsBulkReader
from .reader import WdsDataset
from .tar import iter_tar_samples
from .verify import verify
from .writer import LAYOUT, WdsWriter


def webdataset_urls(root, m: dict) -> list:
    """The shard tars the manifest lists, in order (never a glob: unlisted files are not read)."""
    return [str(Path(root) / rel) for s in m["store"]["shards"] for rel in sorted(s["files"])
            if rel.endswith(".tar")]


FORMAT = StoreFormat(name="wds", writer=WdsWriter, dataset=WdsDataset, bulk_reader=WdsBulkReader,
                     verify=verify, webdataset_urls=webdataset_urls)

__all__ = ["FORMAT", "WdsWriter", "WdsDataset", "WdsBulkReader", "iter_tar_samples", "LAYOUT"]
