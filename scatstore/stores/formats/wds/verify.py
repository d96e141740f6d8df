"""The webdataset store's own checks for ``scatstore verify`` (after the files were re-hashed)."""
from __future__ import annotations

from pathlib import Path

from ...index_npy import verify_index_npy


def verify(root: Path, m: dict, report) -> None:
    verify_index_npy(root, m, report)
