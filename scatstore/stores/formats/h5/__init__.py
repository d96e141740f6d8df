"""HDF5 stores: ``OUT/shard-NNNNNN.h5`` + ``index.npy`` (writer, map-style reader, bulk reader,
verifier)."""
from __future__ import annotations

from ...index_npy import verify_index_npy
from ...registry import StoreFormat
from .bulk import H5BulkReader
from .reader import H5Dataset
from .writer import LAYOUT, H5Writer


def library_versions() -> dict:
    import h5py

    return {"hdf5": h5py.version.hdf5_version}


FORMAT = StoreFormat(name="h5", writer=H5Writer, dataset=H5Dataset, bulk_reader=H5BulkReader,
                     verify=verify_index_npy, library_versions=library_versions)

__all__ = ["FORMAT", "H5Writer", "H5Dataset", "H5BulkReader", "LAYOUT"]
