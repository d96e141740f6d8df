"""The scattering cascade, written once, in terms of a backend's primitives.

This is kymatio's ``scattering2d/core/scattering2d.py`` organised for speed (see
``docs/scattering.md``): one FFT of the padded input; per scale ``j1`` the wavelet products fused
with the Fourier-domain subsampling, the inverse FFT and the modulus, ``group`` orientations at a
time; the low-pass of every modulus (filter, subsample, inverse FFT and unpad in one primitive);
at order 2 one FFT per first-order modulus reused for every ``j2 > j1``, ``theta_block``
orientations theta1 at a time.

A backend (:mod:`._torch_backend`: torch on CPU or CUDA, with the C kernels of :mod:`._native`
for the primitives the CPU's kernel table selects; :mod:`._xp_backend`: NumPy / CuPy) supplies an
``ops`` object bound to one plan (filters of one geometry on one device) with:

``geo``
    the :class:`~scatstore.transforms.geometry.Geometry`;
``group``
    orientations per product step at order 1 (``L``: all at once);
``pad(x)``
    reflection padding of the real maps x (n, M, N) to the padded grid;
``fft2(r, role)``
    complex 2D FFT of real maps (any leading axes);
``prod_periodize(U, filt, l0, nl, role)``
    the product of the spectra U (n, [t,] M, N) with the wavelets ``l0..l0+nl`` of filter
    ``filt`` (``(j1,)`` at order 1, ``(j1, j2)`` at order 2), subsampled in Fourier by summing
    the aliased blocks (kymatio's periodization): (n, [t,] nl, M/s, N/s);
``ifft2(Z)``
    inverse FFT, possibly in place and unnormalised: returns ``(W, scale)`` with
    ``scale * W`` the inverse transform;
``modulus(W, scale, dest, at, role)``
    ``|scale * W|`` (n, [t,] nl, m, k); with ``dest`` given or ``nl`` short of the full L, it is
    written into orientations ``at..at+nl`` of ``dest`` (n, L, m, k) (allocated when None),
    which is returned;
``lowpass(U, res, out, channels)``
    the low-pass phi_J of the real maps U (n, *lead, m, k) at resolution ``res``, subsampled to
    the output grid and unpadded, written into the output channels ``channels`` (an int array of
    shape ``lead``) of ``out`` (n, K, Mo, No); ``res = -1``: order 0, from the unpadded input.
"""
from __future__ import annotations

import numpy as np

_CH0 = np.zeros((), dtype=np.int64)  # order 0 writes channel 0 (no leading axes)
_CH0.flags.writeable = False


def scatter(ops, x, out, theta_block: int) -> None:
    """Fill ``out`` (n, K, Mo, No) with the scattering coefficients of the real maps x (n, M, N)."""
    g = ops.geo
    J, L = g.J, g.L
    ops.lowpass(x, -1, out, _CH0)
    U0 = ops.fft2(ops.pad(x), "U0")
    for j1 in range(J):
        U1 = None
        for l0 in range(0, L, ops.group):
            nl = min(ops.group, L - l0)
            W, scale = ops.ifft2(ops.prod_periodize(U0, (j1,), l0, nl, "Z"))
            U1 = ops.modulus(W, scale, U1, l0, f"U1.{j1}")
        ops.lowpass(U1, j1, out, g.channels1(j1))
        if g.max_order < 2 or j1 == J - 1:
            continue
        V = ops.fft2(U1, f"V.{j1}")  # (n, L, m, k), reused for every j2 > j1
        for t0 in range(0, L, theta_block):
            tb = min(theta_block, L - t0)
            Vb = V[:, t0:t0 + tb]
            for j2 in range(j1 + 1, J):
                W, scale = ops.ifft2(ops.prod_periodize(Vb, (j1, j2), 0, L, "Z"))
                U2 = ops.modulus(W, scale, None, 0, "U2")
                ops.lowpass(U2, j2, out, g.channels2(j1, j2, t0, tb))


__all__ = ["scatter"]
