"""Sizes, padding and output layout of one scattering geometry (shared by every backend)."""
from __future__ import annotations

import numpy as np

from . import filters as fb


class Geometry:
    """Padded grid, output size, channel count and channel layout of (M, N, J, L, max_order).

    Channels (kymatio's order): 0 the low-pass of the input, then ``1 + j1 * L + l1`` for the
    first order, then from ``off2[j1]`` the second-order block of scale j1, laid out as
    (theta1, j2 - j1 - 1, theta2)."""

    def __init__(self, M: int, N: int, J: int, L: int, max_order: int):
        self.M, self.N, self.J, self.L, self.max_order = M, N, J, L, max_order
        self.Mp, self.Np = fb.compute_padding(M, N, J)
        self.pads = fb.pad_widths(M, N, J)
        self.Mo, self.No = self.Mp // 2**J - 2, self.Np // 2**J - 2  # == M // 2**J, N // 2**J
        self.K1 = 1 + L * J
        self.K = self.K1 + (L * L * J * (J - 1) // 2 if max_order == 2 else 0)
        # channel offset of the order-2 block that starts at scale j1
        self.off2 = []
        off = self.K1
        for j1 in range(J):
            self.off2.append(off)
            off += L * L * (J - 1 - j1)
        self._channels: dict = {}

    def grid(self, j: int) -> tuple[int, int]:
        """The grid at resolution j (the padded grid subsampled by 2**j)."""
        return self.Mp // 2**j, self.Np // 2**j

    def channels1(self, j1: int) -> np.ndarray:
        """Output channels of the first-order paths (j1, theta1 = 0..L-1), shape (L,); the same
        (read-only) array on every call."""
        key = (j1,)
        ch = self._channels.get(key)
        if ch is None:
            ch = 1 + j1 * self.L + np.arange(self.L, dtype=np.int64)
            ch.flags.writeable = False
            self._channels[key] = ch
        return ch

    def channels2(self, j1: int, j2: int, t0: int, tb: int) -> np.ndarray:
        """Output channels of the second-order paths (j1, theta1 = t0..t0+tb-1, j2, theta2),
        shape (tb, L); the same (read-only) array on every call."""
        key = (j1, j2, t0, tb)
        ch = self._channels.get(key)
        if ch is None:
            L, nj2 = self.L, self.J - 1 - j1
            t = np.arange(t0, t0 + tb, dtype=np.int64)[:, None]
            ch = self.off2[j1] + (t * nj2 + (j2 - j1 - 1)) * L + np.arange(L)[None, :]
            ch.flags.writeable = False
            self._channels[key] = ch
        return ch

    def working_bytes(self, real_bytes: int) -> tuple[int, int]:
        """Upper estimate of the working set: (bytes per input map, fixed bytes per theta1 block).

        Per input map (one channel of one image) at order 1: the padded input and its spectrum,
        the L products / inverse FFTs / moduli at full resolution (j1 = 0 dominates), and the
        low-pass intermediates. Order 2 adds the spectra of the L moduli at j1 = 0 and, per
        theta1, the L products and inverse FFTs at j2 = 1.
        """
        c, r = 2 * real_bytes, real_bytes
        P = self.Mp * self.Np
        L = self.L
        per_map = P * (r + c) + L * P * (2 * c + 2 * r) + L * self.Mp * self.No * r
        if self.max_order == 2 and self.J > 1:
            per_map += L * P * c
            per_theta = L * (P // 4) * (2 * c + 2 * r)
        else:
            per_theta = 0
        return per_map, per_theta


__all__ = ["Geometry"]
