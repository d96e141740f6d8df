"""Image quality on 8-bit images: PSNR, SSIM and MS-SSIM (Wang, Simoncelli & Bovik 2003).

SSIM uses the usual constants: an 11-tap Gaussian window with sigma 1.5 (truncated at 3.5
sigma, normalized), K1 = 0.01, K2 = 0.03, L = 255, population statistics, and only the
"valid" positions where the window fits inside the image. That is what
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`` reports per channel.

MS-SSIM: 5 scales with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); contrast-structure
terms at scales 1..4 and the full SSIM (luminance included) at scale 5; 2x2 average pooling
between scales. Negative terms are clipped at 0 before the power (as common implementations
do, so that the product stays real). Colour images: the mean over channels of per-channel
MS-SSIM. Images must be at least 11·2⁴ = 176 pixels on a side (224² works).

All functions accept uint8 arrays (H, W), (H, W, 3), (3, H, W) or batches (B, 3, H, W), and
return one value per image for batches.
"""
from __future__ import annotations

import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_K1, _K2, _L = 0.01, 0.03, 255.0


def _gauss1d(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation over the last two axes."""
    k = g.size
    h, w = img.shape[-2:]
    out = np.zeros(img.shape[:-2] + (h - k + 1, w), dtype=np.float64)
    for i in range(k):
        out += g[i] * img[..., i:i + h - k + 1, :]
    out2 = np.zeros(img.shape[:-2] + (h - k + 1, w - k + 1), dtype=np.float64)
    for i in range(k):
        out2 += g[i] * out[..., i:i + w - k + 1]
    return out2


def _ssim_terms(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean SSIM and mean contrast-structure over the last two axes."""
    g = _gauss1d()
    c1, c2 = (_K1 * _L) ** 2, (_K2 * _L) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    s_aa = _filter_valid(a * a, g) - mu_a ** 2
    s_bb = _filter_valid(b * b, g) - mu_b ** 2
    s_ab = _filter_valid(a * b, g) - mu_a * mu_b
    cs = (2 * s_ab + c2) / (s_aa + s_bb + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
    return (lum * cs).mean(axis=(-2, -1)), cs.mean(axis=(-2, -1))


def _to_bchw(x: np.ndarray) -> tuple[np.ndarray, bool]:
    x = np.asarray(x)
    if x.ndim == 2:
        return x[None, None].astype(np.float64), False
    if x.ndim == 3:
        if x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
            return x[None].astype(np.float64), False
        return np.moveaxis(x, -1, 0)[None].astype(np.float64), False
    if x.ndim == 4:
        return x.astype(np.float64), True
    raise ValueError(f"unsupported image shape {x.shape}")


def _pool2(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return 0.25 * (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2])


def psnr(a: np.ndarray, b: np.ndarray):
    """PSNR in dB on 0..255 images (per image for batches; inf for identical images)."""
    x, batched = _to_bchw(a)
    y, _ = _to_bchw(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {x.shape} vs {y.shape}")
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        out = 10 * np.log10(_L ** 2 / mse)
    return out if batched else float(out[0])


def ssim(a: np.ndarray, b: np.ndarray):
    """Single-scale SSIM (channel mean)."""
    x, batched = _to_bchw(a)
    y, _ = _to_bchw(b)
    s, _ = _ssim_terms(x, y)
    out = s.mean(axis=1)
    return out if batched else float(out[0])


def ms_ssim(a: np.ndarray, b: np.ndarray, weights=MS_SSIM_WEIGHTS):
    """Multi-scale SSIM (Wang et al. 2003), 5 scales by default."""
    x, batched = _to_bchw(a)
    y, _ = _to_bchw(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {x.shape} vs {y.shape}")
    n = len(weights)
    if min(x.shape[-2:]) < 11 * 2 ** (n - 1):
        raise ValueError(f"images of {x.shape[-2:]} are too small for {n}-scale MS-SSIM "
                         f"(need >= {11 * 2 ** (n - 1)} pixels a side)")
    w = np.asarray(weights, dtype=np.float64)
    vals = []
    for i in range(n):
        s, cs = _ssim_terms(x, y)
        vals.append(s if i == n - 1 else cs)
        if i < n - 1:
            x, y = _pool2(x), _pool2(y)
    v = np.clip(np.stack(vals, axis=-1), 0.0, None)  # (B, C, n)
    out = np.prod(v ** w, axis=-1).mean(axis=1)
    return out if batched else float(out[0])
