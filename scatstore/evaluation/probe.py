"""Linear probe: multinomial logistic regression on spatially pooled coefficients.

How much of what a classifier needs does a representation keep, measured in seconds on a CPU?
The probe answers with a *linear* read-out of fixed, pooled features:

* :func:`pooled_features` turns a batch of stored tensors into one feature vector per sample:
  scattering coefficients are log-compressed, ``log(ε + max(x, 0))`` with ``ε = 1e-4`` (their
  magnitudes span decades; the log makes a linear read-out of their ratios possible, as in
  Oyallon et al.'s linear experiments), then averaged over space (on a ``grid × grid`` partition,
  1 = global); latents and pixels are averaged over space as they are, with their root mean square
  beside the mean (the energy of a zero-mean channel).
* :class:`LinearProbe` fits ``softmax(W·z + b)`` on standardised features (zero mean, unit
  variance per feature, from the training set) by full-batch L-BFGS in float64 (SciPy's L-BFGS-B
  on an analytic gradient), with an L2 penalty ``λ/2·‖W‖²`` on the mean cross-entropy.
  Deterministic: W = 0 at the start, no mini-batches.

No GPU, no scikit-learn (SciPy comes with scikit-image): a few hundred L-BFGS iterations on an
(N, D) matrix take well under a second for N, D in the thousands.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LOG_EPS = 1e-4


def pooled_features(x: torch.Tensor, kind: str, grid: int = 1) -> torch.Tensor:
    """``(B, D)`` float64 features of a batch ``x`` (``(B, C, K, h, w)`` or ``(B, C, h, w)``).

    ``kind``: ``"scattering"`` (log-compressed, then pooled), ``"latent"`` or ``"pixels"``
    (pooled mean and root mean square per channel). ``grid``: pool over a ``grid × grid``
    partition of the map instead of globally (``grid`` cells per side, at most the map side).
    """
    if x.dim() == 5:
        x = x.flatten(1, 2)
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, h, w) or (B, C, K, h, w), got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    g = max(1, min(int(grid), x.shape[-1], x.shape[-2]))

    def pool(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(t, g).flatten(1)

    if kind == "scattering":
        return pool(torch.log(LOG_EPS + x.clamp_min(0)))
    if kind in ("latent", "pixels"):
        return torch.cat([pool(x), pool(x * x).sqrt()], dim=1)
    raise ValueError(f"unknown feature kind {kind!r} (scattering, latent, pixels)")


@dataclass
class ProbeResult:
    train_top1: float
    val_top1: float
    iterations: int
    features: int


class LinearProbe:
    """Multinomial logistic regression (see the module docstring)."""

    def __init__(self, l2: float = 1e-3, max_iter: int = 300, tol: float = 1e-7):
        if l2 < 0:
            raise ValueError("l2 must be >= 0")
        self.l2, self.max_iter, self.tol = float(l2), int(max_iter), float(tol)
        self.mean = self.scale = self.W = self.b = None
        self.iterations = 0

    def _standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.scale

    def fit(self, z: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
            num_classes: int | None = None) -> "LinearProbe":
        from scipy.optimize import minimize

        z = np.asarray(torch.as_tensor(z, dtype=torch.float64))
        y = np.asarray(torch.as_tensor(y, dtype=torch.long))
        if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
            raise ValueError(f"features (N, D) and N labels expected, got {z.shape} and {y.shape}")
        if not np.isfinite(z).all():
            raise ValueError("features contain NaN or Inf")
        k = int(num_classes or int(y.max()) + 1)
        n, d = z.shape
        self.mean = z.mean(0)
        self.scale = np.maximum(z.std(0), 1e-12)
        zs = self._standardise(z)
        onehot = np.zeros((n, k))
        onehot[np.arange(n), y] = 1.0
        l2 = self.l2

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            W, b = theta[: d * k].reshape(d, k), theta[d * k:]
            logits = zs @ W + b
            logits -= logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            loss = -(onehot * logp).sum() / n + 0.5 * l2 * (W * W).sum()
            g = (np.exp(logp) - onehot) / n
            return loss, np.concatenate([(zs.T @ g + l2 * W).ravel(), g.sum(0)])

        res = minimize(loss_grad, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": 1e-12})
        self.W, self.b = res.x[: d * k].reshape(d, k), res.x[d * k:]
        self.iterations = int(res.nit)
        return self

    def logits(self, z: torch.Tensor | np.ndarray) -> np.ndarray:
        if self.W is None:
            raise RuntimeError("fit the probe first")
        return self._standardise(np.asarray(torch.as_tensor(z, dtype=torch.float64))) @ self.W + self.b

    def predict(self, z) -> np.ndarray:
        return self.logits(z).argmax(1)

    def score(self, z, y) -> float:
        y = np.asarray(torch.as_tensor(y, dtype=torch.long))
        return float((self.predict(z) == y).mean()) if len(y) else float("nan")


def holdout_split(labels: np.ndarray, fraction: float = 0.25, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic stratified split: ``(train indices, held-out indices)``, about
    ``fraction`` of every class held out (at least one sample of a class with two or more)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1) if len(idx) > 1 else 0
        held.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def fit_and_score(z_train, y_train, z_val, y_val, num_classes: int | None = None,
                  l2: float = 1e-3) -> ProbeResult:
    """Fit a :class:`LinearProbe` on the training features and score both sets."""
    p = LinearProbe(l2=l2).fit(z_train, y_train, num_classes)
    return ProbeResult(train_top1=p.score(z_train, y_train), val_top1=p.score(z_val, y_val),
                       iterations=p.iterations, features=int(torch.as_tensor(z_train).shape[1]))
