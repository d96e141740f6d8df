"""The scale hyperprior's frozen, exactly reproducible entropy model.

Ballé et al. (2018) code each latent ``y`` with a zero-mean Gaussian whose scale a small
network (the hyper-synthesis) predicts from a transmitted hyper-latent ``z``. Run in floating
point on the decoder, that network is what breaks learned codecs across devices (CompressAI
issues #279 / #309 / #320): a scale computed 1 ulp differently on another GPU selects another
table and the rest of the stream decodes into garbage. Here nothing of the sort can happen:

* ``z`` is coded with a per-channel factorized prior frozen into integer tables (bitstream.py);
* the hyper-synthesis is frozen into an **integer network** (:class:`IntegerHyperSynthesis`):
  integer weights ``W = round(w·2^S)`` (6-bit, a power-of-two scale per output channel),
  integer biases, integer activations with 5 fractional bits clamped to ``[0, 2^10 − 1]``
  (ReLU), rescaled by exact power-of-two floors. The arithmetic is carried in float32 on the
  CPU, where integer products and partial sums below 2^24 are exact in any summation order
  (bounds are checked at freeze time), so the scale index computed from ``z`` is the same
  integer on every machine, for every batch size;
* that index selects one of ``SCALE_LEVELS`` integer CDF tables (16-bit counts of a Gaussian of
  scale ``SCALE_MIN · exp(i · SCALE_STEP)`` discretised to unit bins, tails folded into the end
  symbols), as table-based coders do.

The float hyper-synthesis is only used in training; the integer one decides the tables.
Bitstream version 2 (same header as version 1, bitstream.py): one ANS stream in which the
``Cz`` channels of ``z`` (shape ``(Cz, ceil(h/4), ceil(w/4))``) are decoded first, then the
latent's symbols grouped by scale index (ascending), each group in raster order of
``(c, i, j)``, one constriction call per group.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bitstream import (
    CorruptBitstreamError,
    EntropyTables,
    _bytes_to_words,
    _words_to_bytes,
    pack,
    unpack,
)
from .model import SCALE_LEVELS, SCALE_MAX, SCALE_MIN, SCALE_STEP

HYPER_BITSTREAM_VERSION = 2
ACT_BITS = 5              # fractional bits of the integer network's activations
ACT_MAX = (1 << 10) - 1   # ReLU activations clamp to [0, ACT_MAX] (i.e. [0, 32) in real units)
WEIGHT_MAX = 1 << 5       # |integer weight| <= 2^5, one power-of-two scale per output channel
EXACT = 2.0 ** 24         # every partial sum stays below this: float32 arithmetic is exact
CHUNK = 8                 # images per integer-network call (see IntegerHyperSynthesis.__call__)


def _torch():
    import torch
    return torch


def _tap_bound(w: np.ndarray, kind: str) -> np.ndarray:
    """Per output channel, the largest sum of |weights| that meets one output value."""
    a = np.abs(w).astype(np.float64)
    if kind == "conv":                       # (out, in, k, k): every tap meets every output
        return a.sum(axis=(1, 2, 3))
    # transposed conv, stride 2 (in, out, k, k): an output of parity (ry, rx) meets the taps of
    # that parity only
    return np.max([a[:, :, ry::2, rx::2].sum(axis=(0, 2, 3)) for ry in (0, 1) for rx in (0, 1)], axis=0)


class IntegerHyperSynthesis:
    """``z`` (int) -> scale index (int), bit-exact everywhere. Layers as in
    :class:`~scatstore.codecs.model.HyperSynthesis`: deconv5x5/2, ReLU, deconv5x5/2, ReLU, conv3x3.

    Integer weights ``W[o] = round(w[o]·2^S[o])`` (|W| <= 2^5, a shift per output channel),
    integer biases, activations with 5 fractional bits clamped to [0, 2^10 − 1]. The
    convolutions run in float32 (oneDNN's direct kernels, CPU): all products and partial sums are
    integers below 2^24 (checked here from the weights), which float32 holds exactly whatever the
    order of summation, so the result is the same integer on every machine and batch split.
    """

    KINDS = ("deconv", "deconv", "conv")

    def __init__(self, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray],
                 shifts: Sequence[Sequence[int]], z_max: int):
        self.weights = [np.asarray(w, dtype=np.int32) for w in weights]
        self.biases = [np.asarray(b, dtype=np.int64) for b in biases]
        self.shifts = [[int(v) for v in s] for s in shifts]
        self.z_max = int(z_max)
        self.channels = self.weights[2].shape[0]
        self.hyper_channels = self.weights[0].shape[0]
        self._check_bounds()
        torch = _torch()
        self._w = [torch.from_numpy(w.astype(np.float32)) for w in self.weights]
        self._b = [torch.from_numpy(b.astype(np.float32)) for b in self.biases]
        self._scale = []
        f_in = 0
        for i, sh in enumerate(self.shifts):  # per-channel powers of two: exact in float32
            e = np.array(sh, dtype=np.float64) + f_in
            e = (ACT_BITS - e) if i < 2 else -e
            self._scale.append(torch.from_numpy(np.exp2(e).astype(np.float32)).reshape(1, -1, 1, 1))
            f_in = ACT_BITS
        self._wcl = None  # the weights in channels-last layout, made on first use

    def _check_bounds(self) -> None:
        a_max = float(self.z_max)
        for i, (w, b, kind) in enumerate(zip(self.weights, self.biases, self.KINDS)):
            if np.abs(w).max(initial=0) > WEIGHT_MAX:
                raise ValueError(f"hyper-synthesis layer {i}: weights exceed 2^5")
            bound = _tap_bound(w, kind) * a_max + np.abs(b).astype(np.float64)
            if bound.max(initial=0) >= EXACT:
                raise ValueError(f"hyper-synthesis layer {i}: accumulator bound {bound.max():.3g} "
                                 "is not exact in float32")
            a_max = float(ACT_MAX)

    @classmethod
    def from_module(cls, hs, z_tables: EntropyTables) -> IntegerHyperSynthesis:
        """Quantize a trained float :class:`HyperSynthesis` (shift per output channel, lowered
        where needed until the float32 exactness bound holds)."""
        z_max = int(max(np.abs(z_tables.lo).max(), np.abs(z_tables.hi).max()))
        weights, biases, shifts = [], [], []
        f_in, a_max = 0, float(z_max)
        for layer, kind in zip((hs.l0, hs.l1, hs.l2), cls.KINDS):
            w = layer.weight.detach().double().cpu().numpy()
            b = layer.bias.detach().double().cpu().numpy()
            out_axis = 1 if kind == "deconv" else 0
            wo = np.moveaxis(w, out_axis, 0)  # (out, ...)
            Wq = np.empty(wo.shape, dtype=np.int32)
            Bq = np.empty(b.shape, dtype=np.int64)
            sh = []
            for o in range(wo.shape[0]):
                m = float(np.abs(wo[o]).max()) or 1.0
                s = math.floor(math.log2(WEIGHT_MAX / m))
                while True:
                    Wo = np.clip(np.round(wo[o] * 2.0 ** s), -WEIGHT_MAX, WEIGHT_MAX)
                    Bo = round(b[o] * 2.0 ** (s + f_in))
                    one = np.moveaxis(Wo[None], 0, out_axis)
                    if _tap_bound(one, kind)[0] * a_max + abs(Bo) < EXACT or s < -30:
                        break
                    s -= 1
                Wq[o], Bq[o] = Wo, Bo
                sh.append(s)
            weights.append(np.moveaxis(Wq, 0, out_axis))
            biases.append(Bq)
            shifts.append(sh)
            f_in, a_max = ACT_BITS, float(ACT_MAX)
        return cls(weights, biases, shifts, z_max)

    def __call__(self, z: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """``z`` int (B, Cz, hz, wz) -> scale indices uint8 (B, C, h, w).

        Run in chunks of ``CHUNK`` images in channels-last layout (oneDNN's direct kernels are
        ~2× faster on it than on NCHW for the transposed convolutions, and a chunk's activations
        stay in the L2 cache). Chunks below 16 images also keep PyTorch from routing the 3×3
        convolution to NNPACK, whose Winograd/FFT kernels would not be exact; oneDNN's
        reduced-precision modes are refused."""
        torch = _torch()
        if np.abs(z).max(initial=0) > self.z_max:
            raise ValueError("hyper-latent outside the range the integer network was checked for")
        for knob in (torch.backends.mkldnn.fp32_precision, torch.backends.mkldnn.conv.fp32_precision):
            if knob not in ("none", "ieee"):
                raise RuntimeError(f"torch.backends.mkldnn fp32_precision is {knob!r}: the integer "
                                   "hyper-synthesis needs exact float32 convolutions ('ieee')")
        out = np.empty((len(z), self.channels, *shape), dtype=np.uint8)
        lib = _group_lib() if self.native is not False else None
        with torch.no_grad():
            for i in range(0, len(z), CHUNK):
                self._run(z[i:i + CHUNK], shape, out[i:i + CHUNK], lib)
        return out

    native: bool | None = None  # False: the last step in torch even when the C kernel is there

    def _run(self, z: np.ndarray, shape: tuple[int, int], dest: np.ndarray, lib) -> None:
        torch = _torch()
        from torch.nn import functional as F

        if self._wcl is None:
            self._wcl = [w.contiguous(memory_format=torch.channels_last) for w in self._w]
            self._last_scale = np.ascontiguousarray(self._scale[2].reshape(-1).numpy(), np.float32)
        a = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
        a = a.contiguous(memory_format=torch.channels_last)
        for i, kind in enumerate(self.KINDS):
            if kind == "deconv":
                acc = F.conv_transpose2d(a, self._wcl[i], self._b[i], stride=2, padding=2, output_padding=1)
            else:
                acc = F.conv2d(a, self._wcl[i], self._b[i], padding=1)
            if i < 2:  # ReLU with ACT_BITS fractional bits: floor(acc·2^(F − s)), clamped
                a = acc.mul_(self._scale[i]).floor_().clamp_(0.0, float(ACT_MAX))
            elif lib is not None and acc.is_contiguous(memory_format=torch.channels_last):
                n, c, hh, ww = acc.shape  # the same float32 steps, fused, to uint8 NCHW (C)
                lib.hg_index(acc.data_ptr(), n, hh, ww, c, self._last_scale.ctypes.data,
                             shape[0], shape[1], SCALE_LEVELS, dest.ctypes.data)
            else:      # the index: round(acc·2^−s), clamped to the table
                t = acc.mul_(self._scale[i]).add_(0.5).floor_().clamp_(0.0, float(SCALE_LEVELS - 1))
                dest[...] = t[..., :shape[0], :shape[1]].to(torch.uint8).numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for i, (w, b, s) in enumerate(zip(self.weights, self.biases, self.shifts)):
            out[f"hs.w{i}"], out[f"hs.b{i}"] = w, b
            out[f"hs.s{i}"] = np.asarray(s, dtype=np.int32)
        return out


def gaussian_tables(precision: int = 16, tail: float = 1e-9) -> EntropyTables:
    """One integer table per scale level: N(0, sigma_i^2) on unit bins over ``[-K_i, K_i]``."""
    pmfs, offsets = [], []
    for i in range(SCALE_LEVELS):
        sigma = SCALE_MIN * math.exp(SCALE_STEP * i)
        # beyond K the two tails together hold < `tail`
        k = max(1, math.ceil(sigma * math.sqrt(2.0) * _erfcinv(tail) + 0.5))
        grid = np.arange(-k, k + 1, dtype=np.float64)
        upper = np.array([0.5 * math.erfc(-(v + 0.5) / (sigma * math.sqrt(2))) for v in grid])
        lower = np.concatenate([[0.0], upper[:-1]])
        p = upper - lower
        p[-1] = 1.0 - lower[-1]
        pmfs.append(np.clip(p, 0.0, None))
        offsets.append(-k)
    return EntropyTables.from_pmfs(pmfs, offsets, precision)


def _erfcinv(p: float) -> float:
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if math.erfc(mid) > p:
            lo = mid
        else:
            hi = mid
    return hi


def hyper_shape(h: int, w: int) -> tuple[int, int]:
    return (-(-h // 4), -(-w // 4))


_GROUP_LIB = None


def _group_lib():
    """The grouping kernels (``_group.c``, built on first use), or ``None`` (no compiler,
    ``SCATSTORE_NATIVE=0``): then the NumPy path below, which gives the same integers."""
    global _GROUP_LIB
    if _GROUP_LIB is None:
        import ctypes

        from scatstore import _cbuild

        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        _GROUP_LIB = _cbuild.NativeLibrary(
            Path(__file__).with_name("_group.c"), name="hypergroup",
            flags=["-O2", "-std=gnu99", "-ffp-contract=off"],
            signatures={"hg_count": [vp, i64, i64, i64, vp],
                        "hg_group": ([vp, vp, i64, i64, i64, vp, vp, vp, vp], i64),
                        "hg_ungroup": [vp, vp, i64, i64, i64, vp, vp, vp],
                        "hg_index": [vp, i64, i64, i64, i64, vp, i64, i64, i64, vp]},
            what="hyperprior grouping kernels", fallback="NumPy grouping (slower)")
    return _GROUP_LIB.load()


def _lib_or_none(native: bool | None):
    if native is False:
        return None
    lib = _group_lib()
    if lib is None and native:
        raise RuntimeError(f"native grouping kernels unavailable: {_GROUP_LIB.info()['reason']}")
    return lib


def _u8_rows(idx: np.ndarray) -> np.ndarray:
    idx = np.ascontiguousarray(idx.reshape(len(idx), -1), dtype=np.uint8)
    if idx.size and int(idx.max()) >= SCALE_LEVELS:
        raise ValueError("scale index outside the table")
    return idx


def count_levels(idx: np.ndarray, native: bool | None = None) -> np.ndarray:
    """Per image (rows of ``idx``), how many symbols use each scale index: (B, SCALE_LEVELS)."""
    idx = _u8_rows(idx)
    B, n = idx.shape
    lib = _lib_or_none(native)
    if lib is None:
        rows = np.arange(B, dtype=np.int64).reshape(-1, 1) * SCALE_LEVELS
        return np.bincount((idx + rows).ravel(), minlength=B * SCALE_LEVELS).reshape(B, SCALE_LEVELS)
    counts = np.empty((B, SCALE_LEVELS), dtype=np.int64)
    lib.hg_count(idx.ctypes.data, B, n, SCALE_LEVELS, counts.ctypes.data)
    return counts


def group_symbols(idx: np.ndarray, symbols: np.ndarray, lo: np.ndarray, length: np.ndarray,
                  native: bool | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The encoder's stream order: per image, the symbols (rows, raster order of ``(c, i, j)``)
    stably sorted by scale index, made relative to their table (``symbol − lo[index]``); the
    counts per index; and how many symbols fall outside their table."""
    idx = _u8_rows(idx)
    B, n = idx.shape
    flat = np.asarray(symbols).reshape(B, n)
    if flat.dtype != np.int32:
        if flat.size and (flat.min() < -2**31 or flat.max() >= 2**31):
            return np.zeros((B, n), np.int32), count_levels(idx, native), int(flat.size)
        flat = flat.astype(np.int32)
    flat = np.ascontiguousarray(flat)
    lo32, len32 = np.ascontiguousarray(lo, np.int32), np.ascontiguousarray(length, np.int32)
    lib = _lib_or_none(native)
    if lib is None:
        order = np.argsort(idx, axis=1, kind="stable")  # uint8 rows: radix sorts
        rel = flat.astype(np.int64) - lo32[idx]
        bad = int(np.count_nonzero((rel < 0) | (rel >= len32[idx])))
        return np.take_along_axis(rel, order, axis=1).astype(np.int32), count_levels(idx, False), bad
    rel = np.empty((B, n), dtype=np.int32)
    counts = np.empty((B, SCALE_LEVELS), dtype=np.int64)
    bad = lib.hg_group(idx.ctypes.data, flat.ctypes.data, B, n, SCALE_LEVELS, lo32.ctypes.data,
                       len32.ctypes.data, rel.ctypes.data, counts.ctypes.data)
    return rel, counts, int(bad)


def ungroup_symbols(idx: np.ndarray, vals: np.ndarray, counts: np.ndarray, offset: np.ndarray,
                    native: bool | None = None) -> np.ndarray:
    """The decoder's inverse of :func:`group_symbols`: ``vals`` (B, n) in stream order, relative
    to their tables -> symbols (B, n) in raster order."""
    idx = _u8_rows(idx)
    B, n = idx.shape
    vals = np.ascontiguousarray(vals, dtype=np.int32)
    off32 = np.ascontiguousarray(offset, np.int32)
    lib = _lib_or_none(native)
    out = np.empty((B, n), dtype=np.int32)
    if lib is None:
        order = np.argsort(idx, axis=1, kind="stable")
        for b in range(B):  # row by row: cheaper than put_along_axis's index arrays
            out[b, order[b]] = vals[b]
        return out + off32[idx]
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    lib.hg_ungroup(idx.ctypes.data, vals.ctypes.data, B, n, SCALE_LEVELS, counts.ctypes.data,
                   off32.ctypes.data, out.ctypes.data)
    return out


class HyperTables:
    """The frozen hyperprior entropy model: z tables, the integer hyper-synthesis, and the
    per-scale Gaussian tables. ``encode(symbols, z)`` / ``decode(blobs) -> symbols``."""

    kind = "scale hyperprior"

    def __init__(self, z_tables: EntropyTables, synthesis: IntegerHyperSynthesis,
                 y_tables: EntropyTables | None = None, precision: int = 16):
        self.z_tables = z_tables
        self.synthesis = synthesis
        self.y_tables = y_tables if y_tables is not None else gaussian_tables(precision)
        self.precision = int(precision)
        self.channels = synthesis.channels
        self.hyper_channels = z_tables.channels
        if self.y_tables.channels != SCALE_LEVELS:
            raise ValueError("hyperprior tables: wrong number of scale levels")

    # -------------------------------------------------------------- symbols

    def indices(self, z: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return self.synthesis(z, shape)

    def clamp(self, symbols: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, tuple, int]:
        """Clamp ``z`` into its tables and ``symbols`` into the range of their scale's table;
        return ``(symbols, (z, scale indices), #clamped)``."""
        z, nz = self.z_tables.clamp(z)
        idx = self.indices(z, symbols.shape[-2:])
        s = np.asarray(symbols)
        out = np.clip(s, self.y_tables.lo[idx], self.y_tables.hi[idx]).astype(np.int32)
        return out, (z, idx), nz + int(np.count_nonzero(out != s))

    def ideal_bits(self, symbols: np.ndarray, z: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        if idx is None:
            idx = self.indices(z, symbols.shape[-2:])
        t = self.y_tables
        bits = self.z_tables.ideal_bits(z)
        flat = np.concatenate([np.asarray(lp) for lp in t._log2p])
        start = np.concatenate([[0], np.cumsum(t.length)[:-1]])
        pos = start[idx] + (symbols.astype(np.int64) - t.lo[idx])
        return bits - flat[pos].reshape(len(symbols), -1).sum(axis=1)

    # -------------------------------------------------------------- coding

    def encode(self, symbols: np.ndarray, z: np.ndarray, idx: np.ndarray | None = None) -> list[bytes]:
        """``symbols`` (B, C, h, w) and ``z`` (B, Cz, hz, wz), both in range (see ``clamp``,
        which also gives the scale indices ``idx``: computed from ``z`` when not passed)."""
        import constriction

        s = np.asarray(symbols)
        B, C, h, w = s.shape
        if C != self.channels or z.shape[:2] != (B, self.hyper_channels) or \
                tuple(z.shape[2:]) != hyper_shape(h, w):
            raise ValueError(f"expected symbols (B, {self.channels}, h, w) and z (B, "
                             f"{self.hyper_channels}, ceil(h/4), ceil(w/4)), got {s.shape}, {z.shape}")
        idx = (self.indices(z, (h, w)) if idx is None else np.asarray(idx)).reshape(B, -1)
        t, zt = self.y_tables, self.z_tables
        rel, counts, bad = group_symbols(idx, s, t.lo, t.length)
        if bad:
            raise ValueError("symbols outside their scale's table range: clamp them first")
        zrel = (z.astype(np.int64) - zt.lo.reshape(1, -1, 1, 1)).astype(np.int32).reshape(B, self.hyper_channels, -1)
        if np.any(zrel < 0) or np.any(zrel > (zt.hi - zt.lo).reshape(1, -1, 1)):
            raise ValueError("z outside its tables: clamp it first")
        models, zmodels = t._models, zt._models
        out = []
        for b in range(B):
            row = rel[b]
            ends = np.cumsum(counts[b]).tolist()
            coder = constriction.stream.stack.AnsCoder()
            for lev in reversed(np.flatnonzero(counts[b]).tolist()):  # a stack: last group first
                e = ends[lev]
                coder.encode_reverse(row[e - int(counts[b, lev]):e], models[lev])
            for c in range(self.hyper_channels - 1, -1, -1):
                coder.encode_reverse(zrel[b, c], zmodels[c])
            out.append(pack(_words_to_bytes(coder.get_compressed()), (C, h, w), HYPER_BITSTREAM_VERSION))
        return out

    def decode(self, blobs: Sequence[bytes], names: Sequence[str] | None = None,
               return_z: bool = False):
        import constriction

        if names is None:
            names = [f"#{i}" for i in range(len(blobs))]
        if len(names) != len(blobs):
            raise ValueError("names and blobs differ in length")
        t, zt = self.y_tables, self.z_tables
        coders, shape = [], None
        z = None
        for b, (blob, name) in enumerate(zip(blobs, names)):
            (C, h, w), payload = unpack(blob, str(name), HYPER_BITSTREAM_VERSION)
            if C != self.channels:
                raise CorruptBitstreamError(str(name), f"{C} channels but the codec has {self.channels}")
            if shape is None:
                shape = (C, h, w)
                hz, wz = hyper_shape(h, w)
                z = np.empty((len(blobs), self.hyper_channels, hz, wz), dtype=np.int32)
                zflat, nz, zmodels = z.reshape(len(blobs), self.hyper_channels, -1), hz * wz, zt._models
            elif (C, h, w) != shape:
                raise ValueError(f"sample {name!r} has latent shape {(C, h, w)}, the batch {shape}: "
                                 "decode different sizes in separate calls")
            try:
                coder = constriction.stream.stack.AnsCoder(_bytes_to_words(payload))
                zb = zflat[b]
                for c, m in enumerate(zmodels):
                    zb[c] = coder.decode(m, nz)
            except Exception as exc:  # noqa: BLE001 (constriction raises on impossible streams)
                raise CorruptBitstreamError(str(name), f"entropy decoder failed: {exc}") from None
            coders.append(coder)
        if shape is None:
            empty = np.zeros((0, self.channels, 0, 0), dtype=np.int32)
            return (empty, np.zeros((0, self.hyper_channels, 0, 0), np.int32)) if return_z else empty
        z += zt.offset.reshape(1, -1, 1, 1)
        C, h, w = shape
        idx = self.indices(z, (h, w)).reshape(len(blobs), -1)
        counts = count_levels(idx)
        vals = np.empty(idx.shape, dtype=np.int32)  # symbols in the stream's (grouped) order
        models = t._models
        for b, (coder, name) in enumerate(zip(coders, names)):
            row, pos, cb = vals[b], 0, counts[b].tolist()
            try:
                for lev in np.flatnonzero(counts[b]).tolist():
                    n = cb[lev]
                    row[pos:pos + n] = coder.decode(models[lev], n)
                    pos += n
                leftover = not coder.is_empty()
            except Exception as exc:  # noqa: BLE001 (constriction raises on impossible streams)
                raise CorruptBitstreamError(str(name), f"entropy decoder failed: {exc}") from None
            if leftover:
                raise CorruptBitstreamError(str(name), "payload not fully consumed")
        out = ungroup_symbols(idx, vals, counts, t.offset)
        out = out.reshape(len(blobs), C, h, w)
        return (out, z) if return_z else out

    # -------------------------------------------------------------- file

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for pre, tab in (("ztables", self.z_tables), ("ytables", self.y_tables)):
            out[f"{pre}.counts"], out[f"{pre}.offset"], out[f"{pre}.length"] = \
                tab.counts, tab.offset, tab.length
        out.update(self.synthesis.arrays())
        return out

    def meta(self) -> dict:
        return {"precision": self.precision, "kind": self.kind, "arrays": sorted(self.arrays()),
                "scale_table": {"min": SCALE_MIN, "max": SCALE_MAX, "levels": SCALE_LEVELS},
                "integer_synthesis": {"act_bits": ACT_BITS, "act_max": ACT_MAX,
                                      "weight_max": WEIGHT_MAX, "z_max": self.synthesis.z_max}}

    @classmethod
    def from_arrays(cls, meta: dict, arrays: dict[str, np.ndarray]) -> HyperTables:
        st = meta.get("scale_table", {})
        if (st.get("min"), st.get("max"), st.get("levels")) != (SCALE_MIN, SCALE_MAX, SCALE_LEVELS):
            raise ValueError(f"hyperprior scale table {st} is not the one this scatstore knows")
        isy = meta["integer_synthesis"]
        if (isy.get("act_bits"), isy.get("act_max"), isy.get("weight_max")) != (ACT_BITS, ACT_MAX, WEIGHT_MAX):
            raise ValueError("hyperprior integer network with unknown activation format")
        p = int(meta["precision"])
        tabs = {pre: EntropyTables(arrays[f"{pre}.counts"], arrays[f"{pre}.offset"],
                                   arrays[f"{pre}.length"], p) for pre in ("ztables", "ytables")}
        syn = IntegerHyperSynthesis([arrays[f"hs.w{i}"] for i in range(3)],
                                    [arrays[f"hs.b{i}"] for i in range(3)],
                                    [arrays[f"hs.s{i}"] for i in range(3)], isy["z_max"])
        return cls(tabs["ztables"], syn, tabs["ytables"], p)
