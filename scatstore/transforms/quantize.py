"""Per-channel 8-bit quantization of coefficient maps, with the scales kept beside the data.

A sample ``(C, K, h, w)`` holds ``C*K`` coefficient maps of ``h*w`` values each. Every map of every
sample gets its own affine 8-bit code (the ``qscale`` / ``qoffset`` pair, float32, shape
``(B, C, K)``), so a dark image and a bright one, or a low-pass map and a high-frequency one, all use
the full 0..255 range.

Schemes (``scheme`` argument, stored in the manifest as ``quantization.scheme``):

``"affine"`` (default)
    ``qoffset = min``, ``qscale = (max - min) / 255``, ``q = rint((x - qoffset) / qscale)``,
    ``x' = q * qscale + qoffset``. Worst-case error ``qscale / 2`` per value.
``"sqrt"``
    Square-root companding of ``x - min``: ``t = sqrt(x - qoffset)``, ``qscale = max(t) / 255``,
    ``q = rint(t / qscale)``, ``x' = (q * qscale)**2 + qoffset``. Finer steps near the minimum,
    coarser near the maximum (for heavy-tailed maps).

The measured errors on real scattering coefficients are in ``docs/format.md``; ``"affine"`` is
the default because it has the lower RMS error there (see ``measure_error``).

Both functions accept numpy arrays and torch tensors (any device): a loader can move the uint8
codes and the float32 scales to the GPU and dequantize there. Arithmetic is done in float32 in the
order written above, so numpy and torch (CPU) produce identical results.
"""
from __future__ import annotations

from typing import Any

import numpy as np

SCHEMES = ("affine", "sqrt")
LEVELS = 255  # codes 0..255


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {SCHEMES}")


def quantize_uint8(x, scheme: str = "affine"):
    """Quantize ``x`` of shape ``(B, *lead, h, w)`` (e.g. ``(B, C, K, h, w)``) to uint8.

    Returns ``(q, qscale, qoffset)``: ``q`` uint8 with the shape of ``x``; ``qscale`` and ``qoffset``
    float32 of shape ``(B, *lead)`` (one pair per coefficient map). Non-finite input is refused.
    """
    _check_scheme(scheme)
    if x.ndim < 3:
        raise ValueError(f"expected (B, ..., h, w) with at least 3 dims, got shape {tuple(x.shape)}")
    if _is_torch(x):
        return _quantize_torch(x, scheme)
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("quantize_uint8: input holds NaN or inf")
    flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    lo = flat.min(axis=-1)
    hi = flat.max(axis=-1)
    if scheme == "affine":
        scale = ((hi - lo) / np.float32(LEVELS)).astype(np.float32)
        t = x - lo[..., None, None]
    else:  # sqrt
        # sqrt in float64 then rounded: the correctly rounded float32 sqrt on every backend
        # (torch's float32 CPU sqrt is not correctly rounded, numpy's is)
        t = np.sqrt(np.maximum(x - lo[..., None, None], np.float32(0)).astype(np.float64)).astype(np.float32)
        scale = (t.reshape(flat.shape).max(axis=-1) / np.float32(LEVELS)).astype(np.float32)
    div = np.where(scale > 0, scale, np.float32(1))[..., None, None]
    q = np.clip(np.rint(t / div), 0, LEVELS).astype(np.uint8)
    return q, scale.astype(np.float32), lo.astype(np.float32)


def _quantize_torch(x, scheme: str):
    import torch

    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_uint8: input holds NaN or inf")
    flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    lo = flat.amin(dim=-1)
    hi = flat.amax(dim=-1)
    if scheme == "affine":
        scale = (hi - lo) / LEVELS
        t = x - lo[..., None, None]
    else:
        t = torch.sqrt(torch.clamp(x - lo[..., None, None], min=0).double()).float()
        scale = t.reshape(flat.shape).amax(dim=-1) / LEVELS
    div = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None, None]
    q = torch.clamp(torch.round(t / div), 0, LEVELS).to(torch.uint8)
    return q, scale, lo


def dequantize_uint8(q, qscale, qoffset, scheme: str = "affine", dtype=None):
    """Invert :func:`quantize_uint8`: ``q`` (B, *lead, h, w) uint8, ``qscale``/``qoffset`` (B, *lead).

    Works on numpy arrays and torch tensors (computed on the tensors' device). Returns float32
    unless ``dtype`` is given (e.g. ``torch.float16`` for a half-precision model).
    """
    _check_scheme(scheme)
    if _is_torch(q):
        import torch

        s = torch.as_tensor(qscale, device=q.device, dtype=torch.float32)[..., None, None]
        o = torch.as_tensor(qoffset, device=q.device, dtype=torch.float32)[..., None, None]
        t = q.to(torch.float32) * s
        out = (t * t if scheme == "sqrt" else t) + o
        return out if dtype is None else out.to(dtype)
    q = np.asarray(q)
    s = np.asarray(qscale, dtype=np.float32)[..., None, None]
    o = np.asarray(qoffset, dtype=np.float32)[..., None, None]
    t = q.astype(np.float32) * s
    out = (t * t if scheme == "sqrt" else t) + o
    return out if dtype is None else out.astype(dtype)


def quantization_info(scheme: str = "affine") -> dict:
    """The manifest's ``quantization`` entry for a quantized store."""
    _check_scheme(scheme)
    formula = ("x = q * qscale + qoffset" if scheme == "affine"
               else "x = (q * qscale)**2 + qoffset")
    return {"scheme": scheme, "bits": 8, "granularity": "per sample, per (C, K) map",
            "params": ["qscale", "qoffset"], "params_dtype": "float32", "dequantize": formula}


def measure_error(x, scheme: str = "affine") -> dict:
    """Error figures of quantizing ``x`` (B, *lead, h, w): relative RMS, max abs / map range, ..."""
    x = np.asarray(x, dtype=np.float32)
    q, s, o = quantize_uint8(x, scheme)
    xr = dequantize_uint8(q, s, o, scheme)
    err = (xr - x).astype(np.float64)
    flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1]).astype(np.float64)
    rng = flat.max(-1) - flat.min(-1)
    eflat = np.abs(err).reshape(flat.shape).max(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_range = np.where(rng > 0, eflat / rng, 0.0)
    # per-map relative RMS (error energy over map energy), averaged over maps
    map_rel = np.sqrt((err.reshape(flat.shape) ** 2).sum(-1) / np.maximum((flat ** 2).sum(-1), 1e-30))
    return {
        "scheme": scheme,
        "rel_rms": float(np.sqrt((err ** 2).sum() / (x.astype(np.float64) ** 2).sum())),
        "mean_map_rel_rms": float(map_rel.mean()),
        "max_abs_over_range": float(rel_range.max()),
        "max_abs": float(np.abs(err).max()),
    }
