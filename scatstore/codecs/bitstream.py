"""Entropy coding of quantized latents with frozen integer tables (constriction ANS).

One image's latent ``(C, h, w)`` of integer symbols becomes one self-delimiting bitstream::

    offset  size  field
    0       1     magic 0xCA
    1       1     bitstream format version (1)
    2       var   C, h, w            unsigned LEB128 varints (1 byte each below 128)
    .       var   n, payload length  unsigned LEB128 varint (bytes)
    .       n     payload            constriction ANS words (uint32 little endian), the final
                                     word's high zero bytes dropped (at most 3)
    .       4     CRC32              zlib.crc32 of every byte before it, little endian

A 28x28x8 latent costs 11 header bytes (2 + 3 + 2 + 4). The payload is one ANS stream in
which channel 0 is decoded first, each channel with its own categorical model, so every
constriction call codes ``h*w`` symbols at once (no per-symbol Python).

The models come from integer probability tables (``counts``, summing to ``2**precision``,
every entry >= 1). Encoder and decoder derive constriction's models from the same integers
(``counts / 2**precision`` is exact in float64) through the same deterministic quantizer,
so both sides hold bit-identical fixed-point tables whatever machine or device runs the
network: no floating-point entropy parameter is ever recomputed at decode time.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

MAGIC = 0xCA
BITSTREAM_VERSION = 1
CODER = "constriction-ans32"  # constriction.stream.stack.AnsCoder, 32-bit words, 24-bit models


class CorruptBitstreamError(ValueError):
    """A stored bitstream is damaged, truncated or not a scatstore CAE bitstream."""

    def __init__(self, sample: str, reason: str):
        self.sample = sample
        self.reason = reason
        super().__init__(f"corrupt bitstream for sample {sample!r}: {reason}")


# ------------------------------------------------------------------ varints


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varint must be non-negative")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("header ends inside a varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 35:
            raise ValueError("varint too long")


def pack(payload: bytes, shape: tuple[int, int, int], version: int = BITSTREAM_VERSION) -> bytes:
    """Wrap an entropy-coded payload in the bitstream header and CRC."""
    out = bytearray((MAGIC, version))
    for v in shape:
        _put_varint(out, int(v))
    _put_varint(out, len(payload))
    out += payload
    out += zlib.crc32(out).to_bytes(4, "little")
    return bytes(out)


_KINDS = {1: "factorized prior", 2: "scale hyperprior"}


def unpack(blob: bytes, name: str = "?", version: int = BITSTREAM_VERSION
           ) -> tuple[tuple[int, int, int], bytes]:
    """Check a bitstream of ``version`` and return ``((C, h, w), payload)``; raise
    CorruptBitstreamError (version 1: factorized prior, 2: scale hyperprior, hyper.py)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CorruptBitstreamError(name, f"expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < 2 + 4 + 4:
        raise CorruptBitstreamError(name, f"only {len(blob)} bytes, shorter than any header")
    if blob[0] != MAGIC:
        raise CorruptBitstreamError(name, f"bad magic byte 0x{blob[0]:02x} (expected 0x{MAGIC:02x})")
    if blob[1] != version:
        what = f" ({_KINDS[blob[1]]})" if blob[1] in _KINDS else ""
        raise CorruptBitstreamError(name, f"bitstream version {blob[1]}{what}, but this codec reads "
                                          f"version {version} ({_KINDS[version]})")
    try:
        pos = 2
        shape = []
        for _ in range(3):
            v, pos = _get_varint(blob, pos)
            shape.append(v)
        n, pos = _get_varint(blob, pos)
    except ValueError as exc:
        raise CorruptBitstreamError(name, str(exc)) from None
    expected = pos + n + 4
    if len(blob) != expected:
        raise CorruptBitstreamError(
            name, f"length {len(blob)} bytes but the header announces {expected}"
            + (" (truncated)" if len(blob) < expected else " (trailing bytes)"))
    crc = int.from_bytes(blob[pos + n:], "little")
    if zlib.crc32(blob[:pos + n]) != crc:
        raise CorruptBitstreamError(name, "CRC32 mismatch (damaged bytes)")
    return (shape[0], shape[1], shape[2]), blob[pos:pos + n]


def _words_to_bytes(words: np.ndarray) -> bytes:
    b = words.astype("<u4", copy=False).tobytes()
    k = 0
    while k < 3 and k < len(b) and b[len(b) - 1 - k] == 0:
        k += 1
    return b[:len(b) - k]


def _bytes_to_words(b: bytes) -> np.ndarray:
    pad = (-len(b)) % 4
    return np.frombuffer(b + b"\0" * pad, dtype="<u4").astype(np.uint32)


# ------------------------------------------------------------------ tables


def quantize_pmf(pmf: np.ndarray, precision: int = 16) -> np.ndarray:
    """Integer counts summing to ``2**precision``, each >= 1, close to ``pmf`` (deterministic)."""
    pmf = np.asarray(pmf, dtype=np.float64)
    n = pmf.size
    total = 1 << precision
    if n < 2 or n > total // 4:
        raise ValueError(f"alphabet of {n} symbols does not fit precision {precision}")
    pmf = np.clip(pmf, 0.0, None)
    pmf = pmf / pmf.sum()
    free = total - n
    raw = pmf * free
    counts = np.floor(raw).astype(np.int64)
    rest = free - int(counts.sum())
    if rest > 0:  # largest remainders first, ties by index: deterministic
        order = np.lexsort((np.arange(n), -(raw - counts)))
        counts[order[:rest]] += 1
    counts += 1
    assert counts.sum() == total and counts.min() >= 1
    return counts


class EntropyTables:
    """Per-channel integer probability tables and the constriction models built from them.

    ``counts[c, :length[c]]`` are the counts of symbols ``offset[c] .. offset[c]+length[c]-1``.
    """

    def __init__(self, counts: np.ndarray, offset: np.ndarray, length: np.ndarray,
                 precision: int = 16):
        import constriction

        self.counts = np.ascontiguousarray(counts, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int32)
        self.length = np.asarray(length, dtype=np.int32)
        self.precision = int(precision)
        self.channels = self.counts.shape[0]
        total = 1 << self.precision
        self.lo = self.offset.astype(np.int64)
        self.hi = self.lo + self.length - 1
        self._models = []
        self._log2p = []
        for c in range(self.channels):
            cnt = self.counts[c, :self.length[c]].astype(np.int64)
            if cnt.sum() != total or cnt.min() < 1 or cnt.size < 2:
                raise ValueError(f"channel {c}: invalid integer table")
            probs = cnt.astype(np.float64) / total  # exact in float64
            self._models.append(constriction.stream.model.Categorical(probs, perfect=False))
            self._log2p.append(np.log2(probs))

    @classmethod
    def from_pmfs(cls, pmfs: Sequence[np.ndarray], offsets: Sequence[int],
                  precision: int = 16) -> EntropyTables:
        length = np.array([len(p) for p in pmfs], dtype=np.int32)
        counts = np.zeros((len(pmfs), int(length.max())), dtype=np.int32)
        for c, p in enumerate(pmfs):
            counts[c, :len(p)] = quantize_pmf(p, precision)
        return cls(counts, np.asarray(offsets, dtype=np.int32), length, precision)

    # -------------------------------------------------------------- helpers

    def clamp(self, symbols: np.ndarray) -> tuple[np.ndarray, int]:
        """Clamp ``(B, C, h, w)`` symbols into each channel's table range; return (symbols, #clamped)."""
        s = np.asarray(symbols)
        lo = self.lo.reshape(1, -1, 1, 1)
        hi = self.hi.reshape(1, -1, 1, 1)
        clamped = np.clip(s, lo, hi).astype(np.int32)
        return clamped, int(np.count_nonzero(clamped != s))

    def ideal_bits(self, symbols: np.ndarray) -> np.ndarray:
        """Ideal code length (bits) of each image's in-range symbols under the integer tables."""
        s = np.asarray(symbols)
        out = np.zeros(s.shape[0], dtype=np.float64)
        for c in range(self.channels):
            idx = s[:, c].reshape(s.shape[0], -1).astype(np.int64) - self.lo[c]
            out -= self._log2p[c][idx].sum(axis=1)
        return out

    # -------------------------------------------------------------- coding

    def encode(self, symbols: np.ndarray) -> list[bytes]:
        """Entropy-code ``(B, C, h, w)`` int symbols (already in range) into B bitstreams."""
        import constriction

        s = np.asarray(symbols)
        if s.ndim != 4 or s.shape[1] != self.channels:
            raise ValueError(f"expected symbols (B, {self.channels}, h, w), got {s.shape}")
        if np.any(s < self.lo.reshape(1, -1, 1, 1)) or np.any(s > self.hi.reshape(1, -1, 1, 1)):
            raise ValueError("symbols outside the table range: clamp them first")
        B, C, h, w = s.shape
        rel = (s.astype(np.int64) - self.lo.reshape(1, -1, 1, 1)).astype(np.int32)
        rel = rel.reshape(B, C, h * w)
        out = []
        models = self._models
        for b in range(B):
            coder = constriction.stream.stack.AnsCoder()
            row = rel[b]
            for c in range(C - 1, -1, -1):  # ANS is a stack: last encoded = first decoded
                coder.encode_reverse(row[c], models[c])
            out.append(pack(_words_to_bytes(coder.get_compressed()), (C, h, w)))
        return out

    def decode(self, blobs: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """Decode B bitstreams into ``(B, C, h, w)`` int32 symbols (all of one shape)."""
        import constriction

        if names is None:
            names = [f"#{i}" for i in range(len(blobs))]
        if len(names) != len(blobs):
            raise ValueError("names and blobs differ in length")
        shape = None
        out = None
        models = self._models
        for b, (blob, name) in enumerate(zip(blobs, names)):
            (C, h, w), payload = unpack(blob, str(name))
            if C != self.channels:
                raise CorruptBitstreamError(str(name), f"{C} channels but the codec has {self.channels}")
            if shape is None:
                shape = (C, h, w)
                out = np.empty((len(blobs), C, h, w), dtype=np.int32)
            elif (C, h, w) != shape:
                raise ValueError(f"sample {name!r} has latent shape {(C, h, w)}, the batch {shape}: "
                                 "decode different sizes in separate calls")
            try:
                coder = constriction.stream.stack.AnsCoder(_bytes_to_words(payload))
                for c in range(C):
                    out[b, c] = coder.decode(models[c], h * w).reshape(h, w)
                leftover = not coder.is_empty()
            except Exception as exc:  # constriction raises on impossible streams
                raise CorruptBitstreamError(str(name), f"entropy decoder failed: {exc}") from None
            if leftover:
                raise CorruptBitstreamError(str(name), "payload not fully consumed")
        if out is None:
            return np.zeros((0, self.channels, 0, 0), dtype=np.int32)
        out += self.offset.reshape(1, -1, 1, 1)
        return out
