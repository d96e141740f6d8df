"""The one exception of the stores package (its own module so that every other module, the
registry included, can import it without importing anything else)."""
from __future__ import annotations


class StoreError(RuntimeError):
    """Anything wrong with a store: bad spec or batch, missing/corrupt files, unsupported manifest."""
