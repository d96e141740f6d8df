"""Sharded stores (zarr v3, webdataset, HDF5): writers, the manifest, readers and verification.

The on-disk format is a public contract documented in ``docs/format.md``; the package layout
and the format registry in ``docs/architecture.md`` ("Stores").
"""
from __future__ import annotations


from .base import ShardBatch, ShardRecord, StoreSpec, StoreWriter
from .dataset import ScatDataset, open_dataset
from .errors import StoreError
from .manifest import MANIFEST_VERSION, read_manifest, upgrade_manifest
from .registry import StoreFormat, format_names, get_format, register
from .verify import VerifyReport, verify


def writer_for(out, spec: StoreSpec) -> StoreWriter:
    """The writer of ``spec.format`` for the store at ``out`` (picklable; rebuilt cheaply)."""
    return get_format(spec.format).writer(out, spec)  # a path or URL (stores.fs.as_path)


__all__ = [
    "StoreSpec", "ShardBatch", "ShardRecord", "StoreWriter", "StoreError", "writer_for",
    "open_dataset", "ScatDataset", "verify", "VerifyReport", "read_manifest", "upgrade_manifest",
    "MANIFEST_VERSION", "StoreFormat", "format_names", "get_format", "register",
]
