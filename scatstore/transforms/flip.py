"""Horizontal flip in coefficient space: augmentation that survives caching.

Flipping an image left-right maps a Morlet wavelet of angle ``a`` onto the one of angle ``-a``
(modulo pi, since ``|x * psi_{a+pi}| = |x * psi_a|`` for real ``x``). In kymatio's filter bank
(which :class:`scatstore.Scattering2D` reproduces) filter ``l`` has the angle
``(int(L - L/2 - 1) - l) * pi / L`` with the frequency vector ``(cos a, sin a)`` in (row, column)
coordinates, so a left-right flip (columns ``y -> -y``) sends ``a`` to ``-a`` and orientation index

    l  ->  (2 * int(L - L/2 - 1) - l) mod L

which is ``(L - 2 - l) mod L`` for even ``L`` (L = 8: 0<->6, 1<->5, 2<->4, 3 and 7 fixed) and
differs from it for odd ``L``. Order-2 paths permute both ``theta1`` and ``theta2``.

The spatial part is not a plain reversal of the coefficient columns. kymatio pads the image by
reflection to ``M_pad`` and samples the low-passed maps at pixel ``2^J * (u + 1) - pad_left`` of
the image (``u`` = output column): reversing the image puts output column ``u`` at the position of
original column ``n - u - (1 + e) / 2^J`` (``n`` = output width, ``e`` = 1 when the padding is odd),
i.e. 1-2 pixels off column ``n - u``, but ``2^J - 1 - e`` pixels (7 at J = 3) off column
``n - 1 - u`` that a plain reversal would use. ``align`` chooses:

``"none"``   plain reversal of the columns (7-pixel misalignment at J=3).
``"cell"``   reversal shifted by one cell (column ``n - u``; column 0 repeats its neighbour).
``"interp"`` (default) ``"cell"`` plus linear interpolation towards the exact sub-cell position,
             weight ``(1 + e) / 2^J`` on the neighbour: the lowest error measured.

Measured relative L2 error against the scattering of the flipped image (16 real photos, 224²,
J = 3, L = 8; details and the 64² figures in ``docs/loading.md``):

========== ======== ====== ========= =========
align       all      S0     order 1   (j=0/1/2)
========== ======== ====== ========= =========
none        16.6 %  15.3 %  48 / 50 / 47 %
cell         3.5 %   3.2 %  12 / 12 / 11 %
interp       3.0 %   2.6 %  11 / 11 /  9 %
========== ======== ====== ========= =========

The residual comes from the sub-sampled grids inside the transform (the intermediate ``U1`` maps
at ``2^j1``), which no relabelling of the output can undo: the flip stays approximate.
"""
from __future__ import annotations

from typing import Any

import numpy as np

ALIGN_MODES = ("none", "cell", "interp")


def orientation_permutation(L: int = 8) -> np.ndarray:
    """``perm[l]`` = orientation index whose (flipped) map becomes orientation ``l`` after a flip.

    The map is an involution, so it is also where orientation ``l`` goes.
    """
    c = int(L - L / 2 - 1)
    return np.array([(2 * c - l) % L for l in range(L)], dtype=np.int64)


def filter_angles(L: int = 8) -> np.ndarray:
    """Angles (radians) of kymatio's filters ``l = 0..L-1``: ``(int(L - L/2 - 1) - l) * pi / L``."""
    return np.array([(int(L - L / 2 - 1) - l) * np.pi / L for l in range(L)])


def path_pairs(J: int, L: int = 8, max_order: int = 1) -> list[tuple]:
    """kymatio's channel order as ``(j, θ)`` pairs per channel: ``()`` for S0, ``((j1, t1),)`` for
    order 1, ``((j1, t1), (j2, t2))`` for order 2 (from :func:`scattering.scattering_paths`)."""
    from .scattering import scattering_paths

    return [tuple(zip(*p)) for p in scattering_paths(J, L, max_order)]


def channel_permutation(J: int, L: int = 8, max_order: int = 1) -> np.ndarray:
    """Index array ``p`` over the K scattering channels: ``flipped[..., k, :, :] = x[..., p[k], :, :]``
    (before the spatial part)."""
    perm = orientation_permutation(L)
    paths = path_pairs(J, L, max_order)
    index = {p: i for i, p in enumerate(paths)}
    out = [index[tuple((j, int(perm[t])) for j, t in p)] for p in paths]
    return np.asarray(out, dtype=np.int64)


def _shift_weight(J: int, width: int, size: int | None) -> tuple[int, float]:
    """(1 if the cell-shifted reversal is closer than the plain one else 0, interp weight)."""
    if size is None:
        size = width * 2 ** J
    m_pad = ((size + 2 ** J) // 2 ** J + 1) * 2 ** J
    e = (m_pad - size) % 2
    off = 1 + e  # pixels between the exact position and column n - u
    if off < 2 ** J - 1 - e:
        return 1, off / 2 ** J
    return 0, 0.0


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def flip_coefficients(x, J: int, L: int = 8, max_order: int = 1, *, align: str = "interp",
                      size: int | None = None):
    """Left-right flip of scattering coefficients ``x``.

    ``x``: numpy array or torch tensor, ``(..., K, h, w)`` with ``K`` the scattering channels per
    colour channel (e.g. ``(B, C, K, h, w)``) or ``(..., C*K, h, w)`` as a loader yields them.
    ``size``: the image side the coefficients were computed from (default ``w * 2^J``), which fixes
    the sub-cell offset. Returns a new array/tensor of the same shape, dtype and device.
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    from scatstore.transforms.scattering import scattering_channels

    K = scattering_channels(J, L, max_order)
    if x.ndim < 3:
        raise ValueError(f"expected (..., K, h, w), got shape {tuple(x.shape)}")
    nch = x.shape[-3]
    if nch % K:
        raise ValueError(f"channel axis {nch} is not a multiple of K={K} (J={J}, L={L}, "
                         f"max_order={max_order})")
    p = channel_permutation(J, L, max_order)
    if nch != K:
        p = (np.arange(nch // K)[:, None] * K + p[None, :]).reshape(-1)
    shift, a = _shift_weight(J, x.shape[-1], size) if align != "none" else (0, 0.0)
    if align == "cell":
        a = 0.0
    if _is_torch(x):
        import torch

        idx = torch.as_tensor(p, device=x.device)
        xf = torch.index_select(x, -3, idx).flip(-1)
        if not shift:
            return xf
        sh = torch.cat([xf[..., :1], xf[..., :-1]], dim=-1)
        if a == 0.0:
            return sh
        return torch.lerp(sh, xf, a) if x.is_floating_point() else sh
    x = np.asarray(x)
    xf = np.take(x, p, axis=-3)[..., ::-1]
    if not shift:
        return np.ascontiguousarray(xf)
    sh = np.concatenate([xf[..., :1], xf[..., :-1]], axis=-1)
    if a == 0.0 or x.dtype.kind != "f":
        return sh
    return (sh + np.asarray(a, dtype=x.dtype) * (xf - sh)).astype(x.dtype, copy=False)


def random_flip(x, J: int, L: int = 8, max_order: int = 1, *, generator=None, p: float = 0.5,
                align: str = "interp", size: int | None = None):
    """Flip each sample of a torch batch ``(B, C*K, h, w)`` with probability ``p`` (on its device)."""
    import torch

    mask = torch.rand(x.shape[0], generator=generator) < p
    if not bool(mask.any()):
        return x
    mask = mask.to(x.device)
    flipped = flip_coefficients(x, J, L, max_order, align=align, size=size)
    return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), flipped, x)


def crop_cells(x, cells: int, *, generator=None, random: bool = True):
    """Crop ``cells`` whole coefficient cells off each spatial axis of ``(B, ..., h, w)``.

    ``random``: a per-sample offset drawn in ``0..cells`` on each axis (training); otherwise the
    centred crop (evaluation). Output ``(B, ..., h - cells, w - cells)``.
    """
    import torch

    if cells <= 0:
        return x
    h, w = x.shape[-2:]
    if cells >= min(h, w):
        raise ValueError(f"crop_cells={cells} leaves nothing of a {h}x{w} map")
    oh, ow = h - cells, w - cells
    if not random:
        t, l = cells // 2, cells // 2
        return x[..., t:t + oh, l:l + ow]
    B = x.shape[0]
    top = torch.randint(0, cells + 1, (B,), generator=generator).to(x.device)
    left = torch.randint(0, cells + 1, (B,), generator=generator).to(x.device)
    rows = (top[:, None] + torch.arange(oh, device=x.device)[None, :])  # (B, oh)
    cols = (left[:, None] + torch.arange(ow, device=x.device)[None, :])  # (B, ow)
    lead = x.shape[1:-2]
    xf = x.reshape(B, -1, h, w)
    ri = rows[:, None, :, None].expand(B, xf.shape[1], oh, w)
    xf = torch.gather(xf, 2, ri)
    ci = cols[:, None, None, :].expand(B, xf.shape[1], oh, ow)
    xf = torch.gather(xf, 3, ci)
    return xf.reshape(B, *lead, oh, ow)
