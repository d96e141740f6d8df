"""zarr v3 stores: ``OUT/data.zarr`` (writer, map-style reader, bulk reader, verifier)."""
from __future__ import annotations

from ...registry import StoreFormat
from .bulk import ZarrBulkReader
from .reader import ZarrDataset
from .verify import verify
from .writer import GROUP, LAYOUT, ZarrWriter

FORMAT = StoreFormat(name="zarr", writer=ZarrWriter, dataset=ZarrDataset,
                     bulk_reader=ZarrBulkReader, verify=verify,
                     compressions={"default": None, "none": None, "zstd": (1, 22), "gzip": (0, 9)},
                     compression_advice="lzf is an HDF5 filter: use zstd[:L], gzip[:L] or none")

__all__ = ["FORMAT", "ZarrWriter", "ZarrDataset", "ZarrBulkReader", "GROUP", "LAYOUT"]
