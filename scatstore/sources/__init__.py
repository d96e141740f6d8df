"""Sources: find samples (ImageNet / COCO / plain folders), decode robustly, resize and crop.

Public API: :func:`discover` -> :class:`SourceIndex` of :class:`SourceItem`; :func:`decode_image`
(raises :class:`DecodeError`; :func:`decode_image_reduced` may decode a large JPEG at a reduced DCT
scale); :func:`resize_center_crop`, :func:`resize_keep_aspect`,
:func:`random_resized_crop` returning a :class:`Geometry`; :func:`prepare_item` frames one item's
variants for the encode engine (:class:`FrameSpec`); demo / trap datasets in
:mod:`scatstore.sources.demo_data`. See ``docs/sources.md``.
"""
from __future__ import annotations

from .decode import (DEFAULT_MAX_PIXELS, DecodeError, decode_image, decode_image_reduced,
                     sniff_format)
from .demo_data import make_coco_layout, make_imagenet_layout, make_trap_files
from .layouts import (IMAGE_EXTENSIONS, LAYOUTS, SourceIndex, SourceItem, discover, escape_key,
                      path_meta, source_key, unescape_key)
from .preprocess import (Geometry, decode_for_frame, random_resized_crop, resize_center_crop,
                         resize_keep_aspect, variant_rng)
from .samples import FrameSpec, prepare_item

__all__ = [
    "DEFAULT_MAX_PIXELS", "DecodeError", "decode_image", "decode_image_reduced", "sniff_format",
    "SourceItem", "SourceIndex", "discover", "escape_key", "unescape_key", "source_key", "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "Geometry", "resize_center_crop", "resize_keep_aspect", "random_resized_crop",
    "variant_rng", "decode_for_frame", "FrameSpec", "prepare_item", "path_meta",
    "make_imagenet_layout", "make_coco_layout", "make_trap_files",
]
