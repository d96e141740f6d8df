"""Per-channel uint8 quantization: error bounds, numpy/torch agreement, real scattering output."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scatstore.transforms.quantize import (dequantize_uint8, measure_error, quantization_info,
                                           quantize_uint8)


def _maps(seed=0):
    rng = np.random.default_rng(seed)
    # heavy-tailed, non-negative maps with very different scales per (C, K)
    x = rng.lognormal(mean=-3, sigma=1.5, size=(4, 3, 5, 12, 10)).astype(np.float32)
    return x * np.logspace(-3, 2, 5, dtype=np.float32)[None, None, :, None, None]


@pytest.mark.parametrize("scheme", ["affine", "sqrt"])
def test_shapes_and_bound(scheme):
    x = _maps()
    q, s, o = quantize_uint8(x, scheme)
    assert q.dtype == np.uint8 and q.shape == x.shape
    assert s.dtype == np.float32 and s.shape == (4, 3, 5) and o.shape == (4, 3, 5)
    xr = dequantize_uint8(q, s, o, scheme)
    assert xr.dtype == np.float32
    flat = x.reshape(4, 3, 5, -1)
    rng = flat.max(-1) - flat.min(-1)
    err = np.abs(xr - x).reshape(4, 3, 5, -1).max(-1)
    if scheme == "affine":      # half a step, up to float32 rounding
        assert (err <= rng / 255 * 0.5 * (1 + 1e-4) + 1e-7).all()
    else:                       # sqrt steps: largest near the maximum, <= (2*255 - 1) / 255**2 of range
        assert (err <= rng * (2 * 255 - 1) / 255 ** 2 / 2 * (1 + 1e-3) + 1e-7).all()
    # codes use the full range of every map
    assert (q.reshape(4, 3, 5, -1).max(-1) == 255).all() and (q.reshape(4, 3, 5, -1).min(-1) == 0).all()


def test_constant_maps_and_empty_batch():
    x = np.full((2, 1, 2, 4, 4), 3.5, np.float32)
    q, s, o = quantize_uint8(x)
    assert (s == 0).all() and (q == 0).all()
    np.testing.assert_array_equal(dequantize_uint8(q, s, o), x)
    q, s, o = quantize_uint8(np.zeros((0, 3, 4, 8, 8), np.float16))
    assert q.shape == (0, 3, 4, 8, 8) and s.shape == (0, 3, 4)
    with pytest.raises(ValueError):
        quantize_uint8(np.array([[[np.nan]]], np.float32))


@pytest.mark.parametrize("scheme", ["affine", "sqrt"])
def test_numpy_and_torch_agree(scheme):
    x = _maps(1)
    qn, sn, on = quantize_uint8(x, scheme)
    qt, st, ot = quantize_uint8(torch.from_numpy(x), scheme)
    assert qt.dtype == torch.uint8
    np.testing.assert_array_equal(qt.numpy(), qn)
    np.testing.assert_array_equal(st.numpy(), sn)
    np.testing.assert_array_equal(ot.numpy(), on)
    dn = dequantize_uint8(qn, sn, on, scheme)
    dt = dequantize_uint8(torch.from_numpy(qn), torch.from_numpy(sn), torch.from_numpy(on), scheme)
    np.testing.assert_array_equal(dt.numpy(), dn)
    assert dequantize_uint8(torch.from_numpy(qn), sn, on, scheme, dtype=torch.float16).dtype == torch.float16


def test_manifest_info():
    info = quantization_info("affine")
    assert info["scheme"] == "affine" and info["bits"] == 8 and "qscale" in info["dequantize"]
    with pytest.raises(ValueError):
        quantization_info("log")


def test_error_on_real_scattering_coefficients(astronaut):
    """Order-1 scattering (kymatio, J=2) of real photo crops: the figures docs/format.md quotes."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    crops = [astronaut[r:r + 64, c:c + 64] for r, c in ((100, 180), (20, 40), (300, 300), (400, 120))]
    x = torch.from_numpy(np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2)).astype(np.float32) / 255)
    coef = ScatteringTorch2D(J=2, shape=(64, 64), L=8, max_order=1)(x).numpy()   # (4, 3, 17, 16, 16)
    a = measure_error(coef, "affine")
    s = measure_error(coef, "sqrt")
    assert a["rel_rms"] < 3e-3 and a["max_abs_over_range"] <= 0.5 / 255 * 1.001
    assert s["rel_rms"] < 5e-3
    # the default (affine) has the lower overall relative RMS error on scattering output
    assert a["rel_rms"] < s["rel_rms"]
