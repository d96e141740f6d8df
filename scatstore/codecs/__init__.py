"""Learned compression: a compressive autoencoder (Theis et al. 2017 / Torfason et al. 2018)
with a per-channel factorized prior or a scale hyperprior (Ballé et al. 2018) frozen into
integer tables (the hyperprior's scale network into an integer network, hyper.py), entropy-coded
by constriction. docs/codec.md.

Public API::

    fit_codec(images, channels, beta, steps, ...) -> Codec     # train, then codec.save(path)
    load_codec(path, device="cpu") -> Codec                    # .hash .channels .decode_symbols
                                                               # .dequantize .decode_images
                                                               # .check_compatible(manifest)
    CaeMethod(codec_path, device="cpu")                        # the `cae` encode method
    CorruptBitstreamError, CodecMismatchError, CodecFileError
    psnr, ssim, ms_ssim                                        # on uint8 images

Heavy modules (torch, constriction) are imported on first use.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "fit_codec": "train",
    "CropSampler": "train",
    "center_crop": "train",
    "Codec": "codec",
    "load_codec": "codec",
    "CaeMethod": "codec",
    "CodecMismatchError": "codec",
    "CodecFileError": "fileformat",
    "CorruptBitstreamError": "bitstream",
    "EntropyTables": "bitstream",
    "psnr": "metrics",
    "ssim": "metrics",
    "ms_ssim": "metrics",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    try:
        mod = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'scatstore.codecs' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"scatstore.codecs.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
