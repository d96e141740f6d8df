"""The store formats: one registry from a format name to its pieces.

Each format is a subpackage of :mod:`scatstore.stores.formats` holding its writer, its map-style
reader, its bulk reader and its verifier side by side, and exporting them as one
:class:`StoreFormat` named ``FORMAT``. This module only maps names to those subpackages and loads
one when it is first asked for (so ``import scatstore.stores`` does not import zarr or h5py); it
imports no format itself, and nothing outside a format's folder names a format's module.

Adding a format: write ``scatstore/stores/formats/NAME/`` exporting ``FORMAT`` and add one line
to ``BUILTIN`` (or call :func:`register` from a plugin).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import StoreError

# name -> module exporting FORMAT (loaded on first use)
BUILTIN: dict[str, str] = {
    "zarr": "scatstore.stores.formats.zarr",
    "wds": "scatstore.stores.formats.wds",
    "h5": "scatstore.stores.formats.h5",
}
_LOADED: dict[str, "StoreFormat"] = {}


def _no_versions() -> dict:
    return {}


@dataclass(frozen=True)
class StoreFormat:
    """What a format offers (the contract is in docs/architecture.md, "Stores").

    ``writer``: a :class:`~scatstore.stores.base.StoreWriter` subclass, built as ``writer(out, spec)``.
    ``dataset``: a :class:`~scatstore.stores.dataset.ScatDataset` subclass, built as
    ``dataset(root, manifest, raw=...)``.
    ``bulk_reader``: a :class:`~scatstore.stores.bulk.BulkReader` subclass, built as
    ``bulk_reader(dataset)`` (array stores; bitstream stores use the generic reader).
    ``verify``: ``verify(root, manifest, report)``: the format's own checks after the files of
    the manifest were re-hashed (index counts, archive members, chunk checksums); it adds
    problems to the :class:`~scatstore.stores.verify.VerifyReport` and never raises.
    ``library_versions``: ``() -> dict`` of library versions recorded in ``created_by``.
    ``webdataset_urls``: ``(root, manifest) -> list[str]``, the shard files a plain
    ``webdataset.WebDataset`` pipeline reads (the loader benchmark's baseline), or None when
    the format is not a set of webdataset tars.
    """

    name: str
    writer: type
    dataset: type
    bulk_reader: type
    verify: Callable[..., None]
    library_versions: Callable[[], dict] = field(default=_no_versions)
    webdataset_urls: Callable[[Any, dict], list] | None = None
    compressions: dict = field(default_factory=lambda: {"default": None, "none": None})
    compression_advice: str = "use default or none"

    def check_compression(self, text) -> None:
        """Refuse a compression spec (``NAME`` or ``NAME:LEVEL``) this format cannot write:
        ``compressions`` maps each name it takes to its level range ``(lo, hi)`` or ``None``
        (takes no level). Raises ``ValueError`` with a one-line reason."""
        name, colon, level = str(text).partition(":")
        if name not in self.compressions:  # only then are the other formats loaded
            known = sorted({n for f in _all_formats() for n in f.compressions})
            if name not in known:
                raise ValueError(f"unknown compression {text!r}; choose from "
                                 + ", ".join(_describe(n) for n in known))
            raise ValueError(f"{text!r} does not apply to format {self.name}: "
                             f"{self.compression_advice}")
        levels = self.compressions[name]
        if level or colon:
            if levels is None:
                raise ValueError(f"{name!r} takes no level, got {text!r}")
            try:
                lv = int(level)
            except ValueError:
                raise ValueError(f"bad level in {text!r}") from None
            if not levels[0] <= lv <= levels[1]:
                raise ValueError(f"{name} level must be in {levels[0]}..{levels[1]}, got {lv}")


def _all_formats() -> list:
    return [get_format(n) for n in format_names()]


def _describe(name: str) -> str:
    """``zstd[:1-22] (zarr)``: a compression name, its levels and the formats that take it."""
    fmts = [f for f in _all_formats() if name in f.compressions]
    lv = next((f.compressions[name] for f in fmts if f.compressions[name]), None)
    where = "" if len(fmts) == len(format_names()) else f" ({', '.join(f.name for f in fmts)})"
    return f"{name}{f'[:{lv[0]}-{lv[1]}]' if lv else ''}{where}"


def format_names() -> tuple:
    """The known format names, built-in first."""
    return tuple(BUILTIN) + tuple(n for n in _LOADED if n not in BUILTIN)


def get_format(name) -> StoreFormat:
    """The :class:`StoreFormat` called ``name``; ``StoreError`` when there is none."""
    fmt = _LOADED.get(name) if isinstance(name, str) else None
    if fmt is not None:
        return fmt
    if not isinstance(name, str) or name not in BUILTIN:
        raise StoreError(f"unknown store format {name!r}; choose from {format_names()}")
    fmt = importlib.import_module(BUILTIN[name]).FORMAT
    if fmt.name != name:  # pragma: no cover - a packaging mistake
        raise StoreError(f"{BUILTIN[name]} exports format {fmt.name!r}, not {name!r}")
    _LOADED[name] = fmt
    return fmt


def register(fmt: StoreFormat) -> None:
    """Make a format known by name (for formats living outside this package)."""
    if not isinstance(fmt, StoreFormat):
        raise TypeError("register() takes a StoreFormat")
    _LOADED[fmt.name] = fmt
