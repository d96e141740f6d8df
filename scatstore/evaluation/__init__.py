"""Evaluation of stored representations: what a representation keeps, measured.

* :mod:`scatstore.evaluation.probe` — a linear probe (logistic regression on pooled, log-compressed
  coefficients): accuracy in seconds on a CPU.
* :mod:`scatstore.evaluation.reconstruct` — images recovered from scattering coefficients by
  gradient descent on ``‖S(x̃) − S(x)‖²`` (what the coefficients preserve), with their PSNR.
"""
from __future__ import annotations

from .probe import LinearProbe, ProbeResult, fit_and_score, holdout_split, pooled_features

__all__ = ["LinearProbe", "ProbeResult", "fit_and_score", "holdout_split", "pooled_features"]
