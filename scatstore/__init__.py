"""scatstore: encode image datasets once into compact tensors and stream them into training.

Data flows through the sub-packages in this order:
sources (read & decode) -> transforms (scattering, codecs) -> stores (zarr, webdataset, hdf5)
-> loaders -> models -> commands (``scatstore.pipelines``, ``scatstore.cli``).

Heavy modules are imported lazily so that ``import scatstore`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Scattering2D": ("scatstore.transforms.scattering", "Scattering2D"),
    "open_dataset": ("scatstore.stores", "open_dataset"),
    "loader": ("scatstore.loaders", "loader"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'scatstore' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
