"""The bulk reader of an opened store, chosen through the format registry.

The readers themselves live next to their formats (``scatstore/stores/formats/NAME/bulk.py``,
the contract in ``scatstore/stores/bulk.py``); bitstream stores, whose samples have no fixed
size, are read through the dataset's own ``get_batch`` by the generic ``BulkReader``.
"""
from __future__ import annotations

from scatstore.stores.bulk import BulkReader
from scatstore.stores.registry import get_format


def make_reader(ds) -> BulkReader:
    """The fastest reader for ``ds`` (an opened ScatDataset)."""
    if ds.spec.sample_nbytes is None:  # variable-length samples
        return BulkReader(ds)
    return get_format(ds.spec.format).bulk_reader(ds)
