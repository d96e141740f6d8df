"""Morlet / Gaussian filter bank of the 2D scattering transform (NumPy, float64).

The filters are the ones kymatio 0.3 builds in ``kymatio/scattering2d/filter_bank.py``, with the
same constants:

* wavelet ``psi_{j,l}`` (``j = 0..J-1``, ``l = 0..L-1``): a Morlet filter built *in space* on the
  padded grid, with ``sigma = 0.8 * 2**j``, angle ``theta = (int(L - L/2 - 1) - l) * pi / L``,
  centre frequency ``xi = (3/4) * pi / 2**j`` and slant ``4 / L``; the Morlet is the Gabor filter
  minus ``K`` times its Gaussian envelope, ``K`` chosen so that the filter sums to zero;
* low-pass ``phi_J``: a Gaussian with ``sigma = 0.8 * 2**(J - 1)`` (no slant, no rotation);
* every Gaussian is periodised over 5 x 5 copies of the grid and divided by
  ``2 * 3.1415 * sigma**2 / slant`` (kymatio writes 3.1415, not pi);
* the Fourier transform is taken and only its real part is kept (the imaginary part is zero up
  to rounding because the filters are even around the origin);
* a filter applied on a grid coarser by ``2**res`` is *cropped* in Fourier: frequencies
  ``|k| >= M / 2**(res+1)`` are zeroed (the negative Nyquist frequency is kept) and the aliased
  blocks are summed (:func:`periodize_filter_fft`).

Everything here is computed in float64 with NumPy and vectorised (kymatio loops in Python); the
agreement with kymatio's own ``filter_bank`` is a test. The low-pass filter is separable
(``phi_hat = outer(a, b)``), which :func:`lowpass_matrix` uses to turn "multiply by phi_hat,
subsample by 2**k in Fourier, inverse FFT, unpad" into two small dense matrices applied in space.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

# kymatio's constants (filter_bank.py)
SIGMA0 = 0.8
XI0 = 3.0 / 4.0 * np.pi
KYMATIO_PI = 3.1415  # kymatio's normalisation uses this truncated value
PERIODS = (-2, -1, 0, 1, 2)


def compute_padding(M: int, N: int, J: int) -> tuple[int, int]:
    """Padded size kymatio uses: ``((M + 2**J) // 2**J + 1) * 2**J`` along each axis."""
    s = 2**J
    return ((M + s) // s + 1) * s, ((N + s) // s + 1) * s


def pad_widths(M: int, N: int, J: int) -> tuple[int, int, int, int]:
    """Reflection padding (top, bottom, left, right): split evenly, the extra pixel goes after."""
    Mp, Np = compute_padding(M, N, J)
    return (Mp - M) // 2, (Mp - M + 1) // 2, (Np - N) // 2, (Np - N + 1) // 2


def reflect_index(size: int, before: int, after: int) -> np.ndarray:
    """Source index of each padded sample for a reflection pad (``x[1]`` mirrors ``x[-1]``)."""
    # A pad equal to the size (an image side of exactly 2**J) reflects twice, as kymatio does
    # (its Pad adds the one sample torch's reflection cannot); numpy's reflect gives the same.
    if before > size or after > size or size < 2:
        raise ValueError(f"reflection pad ({before}, {after}) needs a size of at least both, got {size}")
    return np.pad(np.arange(size), (before, after), mode="reflect")


# Periodisation terms whose Gaussian envelope is below exp(-_NEGLIGIBLE) of its peak everywhere on
# the grid are skipped: they change the filters by < 1e-21 of their peak (float64 adds nothing of
# them to the main term), and skipping them makes building a J=3, 240² bank ~10× faster.
_NEGLIGIBLE = 50.0


def _gabor_terms(M: int, N: int, sigma: float, theta: float, xi: float, slant: float):
    """Periodised Gaussian envelope and Gabor filter (both complex128 (M, N), unnormalised)."""
    c, s = math.cos(theta), math.sin(theta)
    R = np.array([[c, -s], [s, c]])
    R_inv = np.array([[c, s], [-s, c]])
    D = np.array([[1.0, 0.0], [0.0, slant * slant]])
    curv = R @ D @ R_inv / (2.0 * sigma * sigma)
    lam_min = float(np.linalg.eigvalsh((curv + curv.T) / 2).min())
    x0 = np.arange(M, dtype=np.float64)
    y0 = np.arange(N, dtype=np.float64)
    env = np.zeros((M, N), dtype=np.float64)
    gab = np.zeros((M, N), dtype=np.complex128)

    def nearest(ex: int, n: int) -> float:  # smallest |x + ex·n| over the grid
        return 0.0 if ex == 0 else (ex * n if ex > 0 else (-ex - 1) * n + 1)

    for ex in PERIODS:
        for ey in PERIODS:
            if lam_min * (nearest(ex, M) ** 2 + nearest(ey, N) ** 2) > _NEGLIGIBLE:
                continue
            xx = (x0 + ex * M)[:, None]
            yy = (y0 + ey * N)[None, :]
            g = np.exp(-(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy
                         + curv[1, 1] * yy * yy))
            env += g
            if xi:
                # the carrier is separable: exp(i ξ (x cos θ + y sin θ)) = outer product
                gab += g * (np.exp(1j * xi * c * xx) * np.exp(1j * xi * s * yy))
    return env, (gab if xi else env.astype(np.complex128))


def gabor_2d(M: int, N: int, sigma: float, theta: float, xi: float, slant: float = 1.0
             ) -> np.ndarray:
    """Periodised 2D Gabor filter in space, complex128 (M, N); kymatio's ``gabor_2d``."""
    _, gab = _gabor_terms(M, N, sigma, theta, xi, slant)
    return gab / (2 * KYMATIO_PI * sigma * sigma / slant)


def morlet_2d(M: int, N: int, sigma: float, theta: float, xi: float, slant: float = 0.5
              ) -> np.ndarray:
    """Periodised 2D Morlet filter in space (zero sum), complex128 (M, N)."""
    env, wv = _gabor_terms(M, N, sigma, theta, xi, slant)
    # kymatio normalises both terms by the same constant, which cancels in the ratio below
    norm = 2 * KYMATIO_PI * sigma * sigma / slant
    wv = wv / norm
    env = env.astype(np.complex128) / norm
    return wv - (wv.sum() / env.sum()) * env


def periodize_filter_fft(x: np.ndarray, res: int, axes: tuple[int, ...] = (-2, -1)) -> np.ndarray:
    """Crop a Fourier filter to a grid ``2**res`` times coarser along ``axes`` (kymatio's rule).

    Frequencies ``start = n / 2**(res+1)`` up to ``n - start`` (excluded) are zeroed, then the
    ``2**res`` aliased blocks are summed.
    """
    if res == 0:
        return x.copy()
    k = 2**res
    out = np.asarray(x)
    for ax in axes:
        ax = ax % out.ndim
        n = out.shape[ax]
        if n % k:
            raise ValueError(f"size {n} is not divisible by 2**{res}")
        start = int(n * 2.0 ** (-res - 1))
        length = int(n * (1 - 2.0 ** (-res)))
        mask_shape = [1] * out.ndim
        mask_shape[ax] = n
        mask = np.ones(n)
        mask[start:start + length] = 0
        out = out * mask.reshape(mask_shape)
        new_shape = out.shape[:ax] + (k, n // k) + out.shape[ax + 1:]
        out = out.reshape(new_shape).sum(axis=ax)
    return out


@lru_cache(maxsize=32)
def wavelet_bank(M: int, N: int, J: int, L: int) -> np.ndarray:
    """Real Fourier transforms of the Morlet wavelets on the (M, N) grid: float64 (J, L, M, N)."""
    out = np.empty((J, L, M, N))
    for j in range(J):
        for l in range(L):
            theta = (int(L - L / 2 - 1) - l) * np.pi / L
            psi = morlet_2d(M, N, SIGMA0 * 2**j, theta, XI0 / 2**j, 4.0 / L)
            out[j, l] = np.real(np.fft.fft2(psi))
    out.setflags(write=False)
    return out


def _gauss_1d(n: int, sigma: float) -> np.ndarray:
    x = np.arange(n)[None, :] + np.asarray(PERIODS)[:, None] * n
    return np.exp(-(x * x) / (2.0 * sigma * sigma)).sum(axis=0)


@lru_cache(maxsize=32)
def lowpass_factors(M: int, N: int, J: int) -> tuple[np.ndarray, np.ndarray]:
    """1D real Fourier factors ``(a, b)`` with ``phi_hat = outer(a, b)`` on the (M, N) grid."""
    sigma = SIGMA0 * 2 ** (J - 1)
    a = np.real(np.fft.fft(_gauss_1d(M, sigma))) / (2 * KYMATIO_PI * sigma * sigma)
    b = np.real(np.fft.fft(_gauss_1d(N, sigma)))
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def lowpass_fft(M: int, N: int, J: int, res: int = 0) -> np.ndarray:
    """``phi_hat`` cropped to resolution ``res`` (kymatio's ``phi['levels'][res]``), float64."""
    a, b = lowpass_factors(M, N, J)
    return np.outer(periodize_filter_fft(a, res, axes=(0,)), periodize_filter_fft(b, res, axes=(0,)))


def _lowpass_1d_matrix(n: int, J: int, res: int, factor: np.ndarray, unpad: bool) -> np.ndarray:
    """Matrix of "circular convolution with ifft(crop(factor)), subsample by 2**(J-res)"."""
    f = periodize_filter_fft(factor, res, axes=(0,))
    h = np.fft.ifft(f)
    if np.abs(h.imag).max() > 1e-9 * max(np.abs(h.real).max(), 1e-300):
        raise AssertionError("low-pass filter is not even")  # pragma: no cover
    h = h.real
    nr = n // 2**res
    step = 2 ** (J - res)
    rows = np.arange(nr // step)
    if unpad:
        rows = rows[1:-1]
    idx = (rows[:, None] * step - np.arange(nr)[None, :]) % nr
    return h[idx]


@lru_cache(maxsize=64)
def lowpass_matrices(M: int, N: int, J: int, res: int, unpad: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Dense matrices ``(A, B)`` such that, for a real map ``U`` on the grid coarser by ``2**res``,

    ``A @ U @ B.T == unpad(real(ifft2(subsample_fourier(fft2(U) * phi_hat_res, 2**(J-res)))))``

    exactly (up to rounding), where ``subsample_fourier`` averages the aliased blocks as kymatio
    does. Shapes: ``A`` (M // 2**J - 2, M // 2**res), ``B`` (N // 2**J - 2, N // 2**res) with
    unpadding (one coefficient removed each side), M and N being the padded sizes.
    """
    a, b = lowpass_factors(M, N, J)
    A = _lowpass_1d_matrix(M, J, res, a, unpad)
    B = _lowpass_1d_matrix(N, J, res, b, unpad)
    A.setflags(write=False)
    B.setflags(write=False)
    return A, B


def order0_lowpass_matrices(M: int, N: int, J: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A0, B0)`` of :func:`lowpass_matrices` at resolution 0 with kymatio's reflection padding
    folded in, so that ``A0 @ x @ B0.T`` is the zeroth order of the *unpadded* (M, N) input."""
    Mp, Np = compute_padding(M, N, J)
    top, bottom, left, right = pad_widths(M, N, J)
    A, B = lowpass_matrices(Mp, Np, J, 0)
    return (fold_padding(A, reflect_index(M, top, bottom)),
            fold_padding(B, reflect_index(N, left, right)))


def fold_padding(A: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Compose a matrix acting on a padded axis with the padding: ``A @ P`` with ``P[i, index[i]] = 1``."""
    out = np.zeros((A.shape[0], int(index.max()) + 1))
    np.add.at(out, (slice(None), index), A)
    return out


def significant_blocks(F: np.ndarray, s: int, rtol: float = 1e-12) -> list[tuple[int, int]]:
    """Aliased blocks (a, b) of a Fourier filter bank F (..., M, N) split in s x s blocks where
    some filter exceeds ``rtol`` times its own maximum.

    The other blocks contribute less than ``rtol`` relative to the filter's peak to kymatio's
    Fourier-domain subsampling (far below float32 rounding), so they can be skipped.
    """
    M, N = F.shape[-2:]
    Fl = np.abs(F).reshape(-1, s, M // s, s, N // s)
    peak = Fl.reshape(Fl.shape[0], -1).max(axis=1)
    blk = Fl.max(axis=(2, 4)) / np.maximum(peak, 1e-300)[:, None, None]
    keep = (blk > rtol).any(axis=0)
    return [(a, b) for a in range(s) for b in range(s) if keep[a, b]]


def filter_bank(M: int, N: int, J: int, L: int = 8) -> dict:
    """kymatio-shaped filter bank (dicts with ``levels``), for comparisons and inspection."""
    psi_all = wavelet_bank(M, N, J, L)
    psi = []
    for j in range(J):
        for l in range(L):
            levels = [periodize_filter_fft(psi_all[j, l], res)
                      for res in range(min(j + 1, max(J - 1, 1)))]
            psi.append({"levels": levels, "j": j, "theta": l})
    phi = {"levels": [lowpass_fft(M, N, J, res) for res in range(J)], "j": J}
    return {"phi": phi, "psi": psi}


__all__ = [
    "compute_padding", "pad_widths", "reflect_index", "gabor_2d", "morlet_2d",
    "periodize_filter_fft", "wavelet_bank", "lowpass_factors", "lowpass_fft",
    "lowpass_matrices", "fold_padding", "significant_blocks", "filter_bank",
]


def band_rows(A: np.ndarray, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Cyclic band form of a matrix whose rows are localised bumps (the low-pass matrices).

    Returns ``(start, coef)``, int32 (R,) and float64 (R, W), such that
    ``A[r, (start[r] + w) % n] == coef[r, w]`` for ``w < W`` and every entry of A outside these
    windows is below ``rtol`` times its row's largest magnitude (``W == n`` keeps all of it).
    """
    R, n = A.shape
    mag = np.abs(A)
    sig = mag > rtol * np.maximum(mag.max(axis=1, keepdims=True), 1e-300)
    starts, widths = np.zeros(R, dtype=np.int64), np.zeros(R, dtype=np.int64)
    for r in range(R):
        p = np.flatnonzero(sig[r])
        if p.size == 0:
            widths[r] = 1
            continue
        gaps = np.diff(np.r_[p, p[0] + n])  # cyclic distance to the next significant entry
        g = int(np.argmax(gaps))
        starts[r] = p[(g + 1) % p.size]
        widths[r] = n - gaps[g] + 1
    W = int(min(n, widths.max()))
    if W == n:
        starts[:] = 0
    idx = (starts[:, None] + np.arange(W)[None, :]) % n
    return starts.astype(np.int32), np.take_along_axis(A, idx, axis=1)


def significant_boxes(F: np.ndarray, s: int, rtol: float = 1e-9) -> np.ndarray:
    """Per filter, the rectangles of its s x s aliased blocks that hold every entry above ``rtol``
    times the filter's peak: int32 (n_filters, n_boxes, 6) rows ``(a, b, p0, p1, q0, q1)``, the
    box ``[p0, p1) x [q0, q1)`` of block ``(a, b)`` in block coordinates.

    A Morlet filter is a Gaussian bump: in most aliased blocks only a corner or an edge strip is
    above float32 relevance, so summing the blocks over these boxes instead of whole blocks does
    the same arithmetic on what matters (the rest is below ``rtol`` of the peak, ``1e-9``: far
    under float32 rounding). Boxes covering a whole block come first; filters with fewer boxes are
    padded with empty ones (``p0 == p1``).
    """
    F = np.asarray(F)
    M, N = F.shape[-2:]
    F = F.reshape(-1, M, N)
    m, k = M // s, N // s
    per_filter = []
    for f in F:
        mag = np.abs(f)
        thr = rtol * max(mag.max(), 1e-300)
        boxes = []
        for a in range(s):
            for b in range(s):
                blk = mag[a * m:(a + 1) * m, b * k:(b + 1) * k] > thr
                if not blk.any():
                    continue
                rows, cols = np.flatnonzero(blk.any(axis=1)), np.flatnonzero(blk.any(axis=0))
                box = (a, b, rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
                if (box[3] - box[2]) * (box[5] - box[4]) >= 0.7 * m * k:
                    box = (a, b, 0, m, 0, k)  # nearly whole: whole blocks vectorise better
                boxes.append(box)
        boxes.sort(key=lambda x: -(x[3] - x[2]) * (x[5] - x[4]))  # a whole-block box first
        per_filter.append(boxes)
    nb = max(1, max(len(b) for b in per_filter))
    out = np.zeros((len(per_filter), nb, 6), dtype=np.int32)
    for i, boxes in enumerate(per_filter):
        if boxes:
            out[i, :len(boxes)] = boxes
    return out
