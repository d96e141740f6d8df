"""webdataset stores: ``OUT/shard-NNNNNN.tar`` + ``index.npy`` (writer, map-style reader, bulk
reader, verifier, and the shard list a plain webdataset pipeline reads)."""
from __future__ import annotations

from ...base import StoreSpec
from ...errors import StoreError
from ...registry import StoreFormat
from ...safepath import inside
from .bulk import WdsBulkReader
from .reader import WdsDataset
from .tar import iter_tar_samples, member_exts
from .verify import member_problems, verify
from .writer import LAYOUT, WdsWriter


def webdataset_urls(root, m: dict) -> list:
    """The shard tars the manifest lists, in order (never a glob: unlisted files are not read),
    each checked to hold only this store's members: a plain webdataset pipeline would otherwise
    group stray members into samples without an array, or decode a ``.pyd`` with pickle.
    ``StoreError`` naming the first bad member."""
    exts = member_exts(StoreSpec.from_dict(m["store"]["spec"]))
    urls = []
    for s in m["store"]["shards"]:
        for rel in sorted(s["files"]):
            if rel.endswith(".tar"):
                path = inside(root, rel, "shard file")
                bad = member_problems(path, exts, None)
                if bad:
                    raise StoreError(f"{path}: {bad[0]} (run scatstore verify {root})")
                urls.append(str(path))
    return urls


FORMAT = StoreFormat(name="wds", writer=WdsWriter, dataset=WdsDataset, bulk_reader=WdsBulkReader,
                     verify=verify, webdataset_urls=webdataset_urls,
                     compressions={"default": None, "none": None},
                     compression_advice="webdataset members are never compressed (plain readers must decode them): use default or none")

__all__ = ["FORMAT", "WdsWriter", "WdsDataset", "WdsBulkReader", "iter_tar_samples", "LAYOUT"]
