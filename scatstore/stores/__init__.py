"""Sharded stores (zarr v3, webdataset, HDF5): writers, the manifest, readers and verification.

The on-disk format is a public contract documented in ``docs/format.md``.
"""
from __future__ import annotations

from pathlib import Path

from .base import ShardBatch, ShardRecord, StoreError, StoreSpec, StoreWriter
from .dataset import ScatDataset, open_dataset
from .manifest import MANIFEST_VERSION, read_manifest, upgrade_manifest
from .verify import VerifyReport, verify


def writer_for(out, spec: StoreSpec) -> StoreWriter:
    """The writer of ``spec.format`` for the store at ``out`` (picklable; rebuilt cheaply)."""
    if spec.format == "zarr":
        from .zarr_store import ZarrWriter as cls
    elif spec.format == "wds":
        from .wds_store import WdsWriter as cls
    elif spec.format == "h5":
        from .h5_store import H5Writer as cls
    else:  # pragma: no cover - StoreSpec validates
        raise StoreError(f"unknown format {spec.format!r}")
    return cls(Path(out), spec)


__all__ = [
    "StoreSpec", "ShardBatch", "ShardRecord", "StoreWriter", "StoreError", "writer_for",
    "open_dataset", "ScatDataset", "verify", "VerifyReport", "read_manifest", "upgrade_manifest",
    "MANIFEST_VERSION",
]
