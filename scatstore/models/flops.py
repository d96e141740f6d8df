"""Count multiply-accumulates of convolutions and linear layers (what papers call "FLOPs")."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of Conv2d and Linear layers for one sample of shape ``input_shape`` (no batch dim).

    BatchNorm, ReLU, pooling and additions are not counted, as in He et al.'s and Torfason et al.'s
    tables.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    try:  # a model built under ``torch.device("meta")`` is counted without computing anything
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
