"""The one exception of the stores package (its own module so that every other module, the
registry included, can import it without importing anything else)."""
from __future__ import annotations


class StoreError(RuntimeError):
    """Anything wrong with a store: bad spec or batch, missing/corrupt files, unsupported manifest."""


class DamagedDataError(StoreError):
    """Stored bytes that fail their check (a chunk's crc32c, a shard index's): the samples they
    hold are damaged, the rest of the store need not be (``skip_damaged`` readers leave exactly
    those samples out)."""
