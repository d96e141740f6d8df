"""Checking a requested torch device before any work starts.

Every stage that takes ``device=`` (the transform, the codec, the loader, training) calls
:func:`usable_device` first, so that ``--device cuda`` on a machine without a usable GPU fails
with one sentence instead of an assertion deep inside torch in the middle of a job.
"""
from __future__ import annotations


def usable_device(device) -> "torch.device":  # noqa: F821 - torch is imported lazily
    """``device`` (a string or torch.device) as a ``torch.device``; ``ValueError`` saying why
    it cannot be used on this machine (not a device name, a torch built without CUDA, no GPU
    visible, an index past the last GPU)."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) is built "
                             "without CUDA")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, "
                             "driver)")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ValueError(f"device {device!r}: this machine has {n} CUDA device(s)")
    return d
