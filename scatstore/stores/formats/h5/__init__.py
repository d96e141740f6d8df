"""HDF5 stores: ``OUT/shard-NNNNNN.h5`` + ``index.npy`` (writer, map-style reader, bulk reader,
verifier)."""
from __future__ import annotations

from ...registry import StoreFormat
from .bulk import H5BulkReader
from .reader import H5Dataset
from .verify import verify
from .writer import LAYOUT, H5Writer


def library_versions() -> dict:
    import h5py

    return {"hdf5": h5py.version.hdf5_version}


FORMAT = StoreFormat(name="h5", writer=H5Writer, dataset=H5Dataset, bulk_reader=H5BulkReader,
                     verify=verify, library_versions=library_versions,
                     compressions={"default": None, "none": None, "gzip": (0, 9), "lzf": None},
                     compression_advice="HDF5 has no zstd without a plugin: use gzip[:L], lzf or none")

__all__ = ["FORMAT", "H5Writer", "H5Dataset", "H5BulkReader", "LAYOUT"]
