"""zarr v3 stores: ``OUT/data.zarr`` (writer, map-style reader, bulk reader, verifier)."""
from __future__ import annotations

from ...registry import StoreFormat
from .bulk import ZarrBulkReader
from .reader import ZarrDataset
from .verify import verify
from .writer import GROUP, LAYOUT, ZarrWriter

FORMAT = StoreFormat(name="zarr", writer=ZarrWriter, dataset=ZarrDataset,
                     bulk_reader=ZarrBulkReader, verify=verify)

__all__ = ["FORMAT", "ZarrWriter", "ZarrDataset", "ZarrBulkReader", "GROUP", "LAYOUT"]
