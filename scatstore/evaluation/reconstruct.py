"""What scattering coefficients keep: images recovered from them by gradient descent.

Seed 000 ("information preservation") inverts order-1 scattering by minimising
``‖S(x̃) − S(x)‖²`` over the image ``x̃``. :func:`invert_scattering` does the same with the public
:class:`scatstore.Scattering2D` (its torch backend is differentiable), normalised by ``‖S(x)‖²``
so that one learning rate suits every J:

* start: the low-pass channel ``S0 = x ⋆ φ_J`` upsampled (bilinear) to the image size — part of
  ``S(x)`` itself, so nothing outside the coefficients is used;
* Adam on the pixels (``lr`` in [0, 1] units, cosine-decayed), the image clamped to [0, 1] after
  each step; ``steps`` iterations.

:func:`psnr_db` gives the PSNR (dB, peak 1.0) of a reconstruction against the original. What to
expect at 224² after 60 steps (measured on three demo images, docs/study.md): J=1 ≈ 29–41 dB,
J=2 ≈ 23, J=3 ≈ 18, J=4 ≈ 16, falling with J as detail finer than 2^J is reduced to its local
modulus. ``PSNR_FLOOR_J1`` is the floor the tests hold J=1 of a real photograph to (96², 40 steps).
"""
from __future__ import annotations

import math

import numpy as np
import torch

PSNR_FLOOR_J1 = 24.0


def differentiable_scattering(J: int, shape: tuple[int, int], L: int = 8, max_order: int = 1):
    """:class:`scatstore.Scattering2D` (torch backend): an input that requires grad goes through
    its differentiable path, so ``S(x̃)`` carries gradients to ``x̃``."""
    from scatstore.transforms.scattering import Scattering2D

    return Scattering2D(J=J, shape=tuple(shape), L=L, max_order=max_order)


def invert_scattering(images: torch.Tensor, J: int, L: int = 8, steps: int = 200,
                      lr: float = 0.02, S=None, progress=None) -> tuple[torch.Tensor, list[float]]:
    """Reconstruct ``images`` ((B, C, H, W) float in [0, 1]) from their order-1 scattering.

    Returns ``(x̃, losses)``: the reconstruction, same shape, in [0, 1], and the relative loss
    ``‖S(x̃) − S(x)‖² / ‖S(x)‖²`` at every step. ``S``: a differentiable transform (default
    :func:`differentiable_scattering`). ``progress``: optional callable ``(step, loss)``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    x = images.detach().to(torch.float32)
    B, C, H, W = x.shape
    S = S or differentiable_scattering(J, (H, W), L)
    with torch.no_grad():
        target = S(x)
        norm = target.pow(2).sum().clamp_min(1e-12)
        s0 = target[:, :, 0]  # (B, C, H/2^J, W/2^J): the low-pass of x
        init = torch.nn.functional.interpolate(s0, size=(H, W), mode="bilinear", align_corners=False)
    xt = init.clamp(0, 1).clone().requires_grad_(True)
    opt = torch.optim.Adam([xt], lr=lr)
    losses: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        opt.zero_grad(set_to_none=True)
        loss = (S(xt) - target).pow(2).sum() / norm
        loss.backward()
        opt.step()
        with torch.no_grad():
            xt.clamp_(0, 1)
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    return xt.detach(), losses


def psnr_db(a, b) -> float:
    """PSNR in dB of two images in [0, 1] (arrays or tensors of the same shape), peak 1.0."""
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
