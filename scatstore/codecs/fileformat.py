"""The codec file: one file, a JSON header and raw little-endian arrays, no pickle.

Layout (format versions 1 and 2: the same bytes; version 2 marks codecs that a scatstore
reading only version 1 cannot build: architecture ``cae-gdn-v2``, or the scale hyperprior)::

    offset  size  field
    0       8     magic b"SSCAE\\x00\\x01\\n"
    8       8     header length L (uint64 little endian)
    16      L     header: UTF-8 JSON, keys sorted, padded with spaces to a multiple of 8
    16+L    ...   data: the arrays back to back, each starting at a multiple of 8

The header holds ``format_version``, ``config`` (hyper-parameters), ``tables``
(``precision`` and the names of the integer-table arrays), ``arrays`` (name -> dtype, shape,
offset into data, nbytes), ``info`` (training log, not hashed) and ``hash``.

``hash`` is ``"sha256:" + hexdigest`` of the canonical JSON of ``{format_version, config,
tables, arrays}`` (sorted keys, no spaces) followed by the data bytes: any change of a weight,
a table entry or a hyper-parameter changes it; the informational training log does not.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"SSCAE\x00\x01\n"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_DTYPES = {"float32": "<f4", "float64": "<f8", "int32": "<i4", "int64": "<i8", "uint8": "u1",
           "uint16": "<u2"}


class CodecFileError(ValueError):
    """The codec file is not a scatstore codec, is damaged, or its hash does not verify."""


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def content_hash(format_version: int, config: dict, tables: dict, arrays_meta: dict,
                 data: bytes) -> str:
    h = hashlib.sha256()
    h.update(_canonical({"format_version": format_version, "config": config, "tables": tables,
                         "arrays": arrays_meta}))
    h.update(data)
    return "sha256:" + h.hexdigest()


def _layout(arrays: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    meta: dict[str, dict] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        dt = str(a.dtype)
        if dt not in _DTYPES:
            raise TypeError(f"array {name!r}: dtype {dt} not supported")
        raw = np.ascontiguousarray(a, dtype=_DTYPES[dt]).tobytes()
        meta[name] = {"dtype": dt, "shape": list(a.shape), "offset": offset, "nbytes": len(raw)}
        pad = (-len(raw)) % 8
        chunks.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    return meta, b"".join(chunks)


def pack_codec(config: dict, tables: dict, arrays: dict[str, np.ndarray], info: dict,
               version: int = FORMAT_VERSION) -> tuple[bytes, str]:
    """Serialize; return ``(file bytes, hash)``."""
    if version not in READABLE_VERSIONS:
        raise ValueError(f"codec format version {version} cannot be written")
    meta, data = _layout(arrays)
    digest = content_hash(version, config, tables, meta, data)
    header = {"format": "scatstore-cae", "format_version": version, "config": config,
              "tables": tables, "arrays": meta, "info": info, "hash": digest}
    hb = json.dumps(header, sort_keys=True, indent=1).encode()
    hb += b" " * ((-len(hb)) % 8)
    return MAGIC + struct.pack("<Q", len(hb)) + hb + data, digest


def write_codec(path: str | os.PathLike, config: dict, tables: dict,
                arrays: dict[str, np.ndarray], info: dict, version: int = FORMAT_VERSION) -> str:
    blob, digest = pack_codec(config, tables, arrays, info, version)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return digest


def read_codec(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse and verify a codec file; return ``(header, arrays)``."""
    blob = Path(path).read_bytes()
    if len(blob) < 16 or blob[:8] != MAGIC:
        raise CodecFileError(f"{path}: not a scatstore codec file (bad magic)")
    (hl,) = struct.unpack("<Q", blob[8:16])
    if 16 + hl > len(blob):
        raise CodecFileError(f"{path}: truncated header")
    try:
        header = json.loads(blob[16:16 + hl])
    except ValueError as exc:
        raise CodecFileError(f"{path}: header is not JSON: {exc}") from None
    if header.get("format") != "scatstore-cae":
        raise CodecFileError(f"{path}: not a scatstore-cae codec")
    if header.get("format_version") not in READABLE_VERSIONS:
        raise CodecFileError(f"{path}: codec format version {header.get('format_version')} "
                             f"is not supported (this scatstore reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}): upgrade scatstore")
    data = blob[16 + hl:]
    digest = content_hash(header["format_version"], header["config"], header["tables"],
                          header["arrays"], data)
    if digest != header.get("hash"):
        raise CodecFileError(f"{path}: content hash mismatch (file damaged or edited): "
                             f"stored {header.get('hash')}, computed {digest}")
    arrays = {}
    for name, m in header["arrays"].items():
        start, n = m["offset"], m["nbytes"]
        if start + n > len(data):
            raise CodecFileError(f"{path}: array {name!r} runs past the end of the file")
        arrays[name] = np.frombuffer(data[start:start + n], dtype=_DTYPES[m["dtype"]]) \
            .reshape(m["shape"]).astype(m["dtype"])
    return header, arrays
