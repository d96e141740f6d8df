"""Streaming / shuffling batch loaders into torch (docs/loading.md).

``scatstore.loader(path, batch_size, shuffle=True, seed=0, num_workers=None, drop_last=None,
device="cpu", **options)`` -> :class:`StoreLoader`: iterate it for ``(x, y)`` batches, or call it
with an epoch for that epoch's iterable (the training engine's batches factory).
"""
from __future__ import annotations

from .stream import EpochPlan, LoaderEpoch, StoreLoader, loader

__all__ = ["loader", "StoreLoader", "LoaderEpoch", "EpochPlan"]
